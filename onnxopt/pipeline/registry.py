"""Pass registry: recipe names -> pass classes, with parameter validation and coercion from strings."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from onnxopt.errors import RecipeError
from onnxopt.pipeline.base import OnnxoptPass

_REGISTRY: dict[str, type[OnnxoptPass]] = {}
# Passes defined in modules that import heavy dependencies register lazily: name -> "module:Class".
_LAZY: dict[str, str] = {}


def register(cls: type[OnnxoptPass]) -> type[OnnxoptPass]:
    """Class decorator that makes a pass available to recipes under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no recipe name")
    _REGISTRY[cls.name] = cls
    return cls


def register_lazy(name: str, target: str) -> None:
    """Make ``name`` resolve to ``module:Class`` on first use (keeps torch out of start-up)."""
    _LAZY[name] = target


def available() -> list[str]:
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_LAZY))


def get(name: str) -> type[OnnxoptPass]:
    _load_builtins()
    if name not in _REGISTRY and name in _LAZY:
        import importlib

        module, _, cls_name = _LAZY[name].partition(":")
        _REGISTRY[name] = getattr(importlib.import_module(module), cls_name)
    if name not in _REGISTRY:
        raise RecipeError(f"unknown pass '{name}' (available: {', '.join(available())})")
    return _REGISTRY[name]


def create(name: str, params: dict[str, Any] | None = None) -> OnnxoptPass:
    """Instantiate pass ``name``; unknown parameters and uncoercible values raise :class:`RecipeError`."""
    cls = get(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in (params or {}).items():
        key = key.replace("-", "_")
        if key not in fields:
            raise RecipeError(
                f"pass '{name}' has no parameter '{key}' (parameters: {', '.join(sorted(fields)) or 'none'})"
            )
        kwargs[key] = coerce(value, hints.get(key, Any), f"{name}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"pass '{name}': {exc}") from None


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a recipe/CLI value into the annotated type (str -> int/float/bool/list/dict)."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise RecipeError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple) or annotation in (list, tuple):
        items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
        if items is None:
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        converted = [coerce(item.strip() if isinstance(item, str) else item, inner, where) for item in items]
        return tuple(converted) if (origin or annotation) is tuple else converted
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return dict(value)
        raise RecipeError(f"{where}: expected a mapping, got {value!r}")
    return value


def _load_builtins() -> None:
    # Importing the passes package registers every built-in pass (light ones eagerly, torch ones lazily).
    import onnxopt.passes  # noqa: F401
