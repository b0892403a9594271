"""Recipes: which passes run, in which order, with which parameters.

One recipe has three equivalent spellings:

* a YAML or TOML file::

      # recipe.yaml                       # recipe.toml
      passes:                             [[passes]]
        - normalize: {min_opset: 13}      name = "normalize"
        - name: normalize                 min_opset = 13
          params: {simplify: false}

  plus optional top-level ``seed``, ``input_shapes`` ({name: [dims]}) and ``budgets`` ({name: limit});
* CLI flags: ``--pass normalize --pass "normalize:min_opset=13,simplify=false"``;
* Python: ``[NormalizePass(min_opset=13)]`` or ``Recipe.from_list([...])``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.errors import RecipeError
from onnxopt.pipeline import registry
from onnxopt.pipeline.base import OnnxoptPass

DEFAULT_PASSES: tuple[str, ...] = ("normalize",)


@dataclass
class PassSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def build(self) -> OnnxoptPass:
        return registry.create(self.name, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "params": dict(self.params)}


@dataclass
class Recipe:
    passes: list[PassSpec]
    seed: int | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)
    source: str = "default"

    @classmethod
    def default(cls) -> "Recipe":
        return cls([PassSpec(name) for name in DEFAULT_PASSES])

    def build(self) -> list[OnnxoptPass]:
        """Instantiate every pass; unknown passes or parameters raise RecipeError before any work starts."""
        return [spec.build() for spec in self.passes]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "passes": [spec.to_dict() for spec in self.passes]}

    # --- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file '{path}' does not exist")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".toml":
                data = _load_toml(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:
            raise RecipeError(f"recipe '{path}' cannot be parsed: {str(exc).splitlines()[0]}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Any, source: str = "mapping") -> "Recipe":
        if isinstance(data, list):
            data = {"passes": data}
        if not isinstance(data, dict) or "passes" not in data:
            raise RecipeError(f"recipe {source}: expected a mapping with a 'passes' list")
        unknown = set(data) - {"passes", "seed", "input_shapes", "budgets"}
        if unknown:
            raise RecipeError(f"recipe {source}: unknown key(s) {', '.join(sorted(unknown))}")
        if not isinstance(data["passes"], list) or not data["passes"]:
            raise RecipeError(f"recipe {source}: 'passes' must be a non-empty list")
        specs = [_spec_from_entry(entry, source, index) for index, entry in enumerate(data["passes"])]
        shapes = {str(k): tuple(int(d) for d in v) for k, v in (data.get("input_shapes") or {}).items()}
        budgets = {str(k): float(v) for k, v in (data.get("budgets") or {}).items()}
        seed = data.get("seed")
        recipe = cls(specs, int(seed) if seed is not None else None, shapes, budgets, source)
        recipe.build()  # validate names and parameters now
        return recipe

    @classmethod
    def from_cli(cls, pass_flags: Sequence[str]) -> "Recipe":
        specs = [parse_pass_flag(flag) for flag in pass_flags]
        recipe = cls(specs, source="command line")
        recipe.build()
        return recipe

    @classmethod
    def from_list(cls, items: Iterable[OnnxoptPass | PassSpec | str | dict[str, Any]]) -> "Recipe":
        specs = []
        for index, item in enumerate(items):
            if isinstance(item, OnnxoptPass):
                specs.append(PassSpec(item.name, item.params()))
            elif isinstance(item, PassSpec):
                specs.append(item)
            else:
                specs.append(_spec_from_entry(item, "list", index))
        return cls(specs, source="python")


_PARAM_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w-]*\s*=)")


def parse_pass_flag(flag: str) -> PassSpec:
    """``name`` or ``name:key=value,key=value`` (a value may itself hold commas: ``exclude=a,b``)."""
    name, _, rest = flag.partition(":")
    name = name.strip()
    if not name:
        raise RecipeError(f"--pass '{flag}': missing pass name")
    params: dict[str, Any] = {}
    if rest.strip():
        for item in _PARAM_SPLIT.split(rest):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise RecipeError(f"--pass '{flag}': parameter '{item}' must look like key=value")
            params[key.strip()] = value.strip()
    return PassSpec(name, params)


def _spec_from_entry(entry: Any, source: str, index: int) -> PassSpec:
    if isinstance(entry, str):
        return PassSpec(entry)
    if isinstance(entry, dict) and "name" in entry:
        params = dict(entry.get("params") or {})
        params.update({k: v for k, v in entry.items() if k not in ("name", "params")})
        return PassSpec(str(entry["name"]), params)
    if isinstance(entry, dict) and len(entry) == 1:
        (name, params), = entry.items()
        if params is not None and not isinstance(params, dict):
            raise RecipeError(f"recipe {source}: parameters of pass '{name}' must be a mapping")
        return PassSpec(str(name), dict(params or {}))
    raise RecipeError(f"recipe {source}: entry {index + 1} of 'passes' is not a pass name or mapping: {entry!r}")


def _load_toml(text: str) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)
