"""A disk cache of pass results, so a re-run or a parameter search computes each (model, pass, parameters) once.

The key is a SHA-256 of everything that decides a pass's output: the serialized input model, the pass name, its
parameters, a fingerprint of the calibration and evaluation data (every sample and label), the run settings a pass
may read (seed, input shapes, budgets, provider, threads, and the original model, which is distillation's teacher),
the host (CPU, flags, runtime versions: quantize's placement is timed) and the onnxopt version. An entry is
``<key>.onnx`` (the model after the pass) plus ``<key>.json`` (the pass's
notes and details), both written atomically; a half-written or unreadable entry is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from onnxopt import __version__
from onnxopt.hostinfo import host_info
from onnxopt.modelio import atomic_write_bytes, atomic_write_text, has_external_tensors, to_proto

if TYPE_CHECKING:  # pragma: no cover
    from onnxopt.calib_data.base import DataSource
    from onnxopt.pipeline.base import OnnxoptPass
    from onnxopt.pipeline.context import PassContext

#: Entries beyond this many bytes in total are evicted, least recently used first.
DEFAULT_MAX_BYTES = 2 * 1024**3
_ENTRY_FORMAT = 2  # 2: models with external tensors are no longer cached (entries of 1 may hold them)


def default_cache_dir() -> Path:
    """``$ONNXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxopt``, else ``~/.cache/onnxopt``."""
    if os.environ.get("ONNXOPT_CACHE_DIR"):
        return Path(os.environ["ONNXOPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxopt"


def model_digest(model: ir.Model) -> str:
    """SHA-256 of the deterministic serialization of ``model``."""
    return hashlib.sha256(to_proto(model).SerializeToString(deterministic=True)).hexdigest()


def data_fingerprint(data: DataSource | None, model: ir.Model, batch_size: int = 64) -> str:
    """SHA-256 over every sample (and label) of ``data`` as the model's inputs see it; "none" without data."""
    if data is None:
        return "none"
    from onnxopt.modelio import input_specs

    digest = hashlib.sha256(data.description.encode())
    for batch in data.iter_batches(input_specs(model), batch_size=batch_size):
        for name in sorted(batch.inputs):
            array = batch.inputs[name]
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
        if batch.labels is not None:
            digest.update(batch.labels.tobytes())
    return digest.hexdigest()


@dataclass
class CacheHit:
    model: ir.Model
    notes: list[str]
    details: dict[str, Any]


@dataclass
class PassCache:
    """Pass results under ``directory``; ``hits``/``misses`` count lookups of this instance."""

    directory: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    hits: int = 0
    misses: int = 0
    _context_digests: dict[int, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser()

    # ------------------------------------------------------------------------------------------------------------
    def key(self, pass_: OnnxoptPass, model: ir.Model, context: PassContext) -> str | None:
        """The cache key of running ``pass_`` on ``model`` within ``context`` (before the pass changes it); None for a
        model whose tensors live in external files (above the 1.8 GB external-data threshold): its serialization
        names the data file, not the data, so two different models could share a key, and an entry would be the
        size of the whole cache."""
        if has_external_tensors(model):
            return None
        payload = {
            "format": _ENTRY_FORMAT,
            "onnxopt": __version__,
            "model": model_digest(model),
            "pass": pass_.name,
            "class": f"{type(pass_).__module__}.{type(pass_).__qualname__}",
            "params": _canonical(pass_.params()),
            "context": self._context_digest(context, model),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def load(self, key: str) -> CacheHit | None:
        model_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text())
            model = ir.serde.deserialize_model(_load_proto(model_path))
        except Exception:  # noqa: BLE001 - a missing or damaged entry is a miss, never an error
            self.misses += 1
            return None
        for path in (model_path, meta_path):  # mark as recently used for eviction
            try:
                os.utime(path)
            except OSError:
                pass
        self.hits += 1
        return CacheHit(model, list(meta.get("notes", [])), dict(meta.get("details", {})))

    def store(self, key: str, pass_: OnnxoptPass, model: ir.Model) -> str | None:
        """Write an entry; returns None, or why it was not stored (e.g. the folder is not writable)."""
        model_path, meta_path = self._paths(key)
        if has_external_tensors(model):
            return "not cached: the model's tensors live in external files"
        try:
            model_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(model_path, to_proto(model).SerializeToString(deterministic=True))
            meta = {"pass": pass_.name, "params": _canonical(pass_.params()), "notes": list(pass_.notes),
                    "details": _canonical(pass_.details), "onnxopt": __version__}
            atomic_write_text(meta_path, json.dumps(meta, sort_keys=True))
        except Exception as exc:  # noqa: BLE001 - caching is an optimization: the run goes on without it
            return f"not cached: {type(exc).__name__}: {exc}"[:300]
        self._evict()
        return None

    def clear(self) -> int:
        """Remove every entry; returns how many files were removed."""
        removed = 0
        for path in self._entries():
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
        return removed

    # ------------------------------------------------------------------------------------------------------------
    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.directory / key[:2]
        return folder / f"{key}.onnx", folder / f"{key}.json"

    def _entries(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.glob("??/*") if p.suffix in (".onnx", ".json")]

    def _evict(self) -> None:
        entries = []
        for path in self._entries():
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                path.unlink()
                total -= size
            except OSError:
                pass

    def _context_digest(self, context: PassContext, model: ir.Model) -> str:
        """Data and settings fingerprint, computed once per context (hashing the data reads all of it)."""
        cached = self._context_digests.get(id(context))
        if cached is not None:
            return cached
        reference = context.original if context.original is not None else model
        payload = {
            "calib": data_fingerprint(context.calib, reference),
            "eval": data_fingerprint(context.eval, reference),
            "original": model_digest(context.original) if context.original is not None else None,
            "seed": context.seed,
            "input_shapes": {k: list(v) for k, v in sorted(context.input_shapes.items())},
            "budgets": dict(sorted(context.budgets.items())),
            "provider": context.provider,
            "threads": context.threads,
            # quantize's placement times int8 against FP32: its choice holds for this CPU and runtime only
            "host": host_info().describe(),
        }
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        self._context_digests[id(context)] = digest
        return digest


def _load_proto(path: Path) -> Any:
    import onnx

    proto = onnx.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _canonical(value: Any) -> Any:
    """JSON-safe, order-stable form of parameters and details (tuples -> lists, numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


__all__ = ["CacheHit", "PassCache", "data_fingerprint", "default_cache_dir", "model_digest"]
