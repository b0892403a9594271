"""Loading and saving models with clear errors and atomic writes.

The in-memory representation of the pipeline is ``onnx_ir.Model``; ``onnx.ModelProto`` is produced on demand for
tools that need it (onnx.checker, onnxsim, ORT's quantizer). Models above the 2 GB protobuf limit are kept with
external data and handed to ONNX Runtime by path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import BadInputError

# Domains that ONNX Runtime's CPU build implements; a node in any other domain cannot be run or validated.
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.training"})
PROTOBUF_LIMIT = 2**31 - 1
# Above this many bytes of tensor data a model is written with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

ModelLike = "str | os.PathLike[str] | onnx.ModelProto | ir.Model"


@dataclass(frozen=True)
class InputSpec:
    """A graph input that the user must feed (initializers listed as inputs excluded)."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}[{dims}]:{self.dtype}"


def load_model(path: str | os.PathLike[str], *, check: bool = True) -> ir.Model:
    """Load an ONNX file (with its external data) or raise :class:`BadInputError` naming the file and the cause."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"model file '{path}' does not exist")
    if path.is_dir():
        raise BadInputError(f"model path '{path}' is a folder, not an ONNX file")
    if path.stat().st_size == 0:
        raise BadInputError(f"model file '{path}' is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, but also RuntimeWarning-like errors
        raise BadInputError(f"'{path}' is not an ONNX model (protobuf parse failed: {_short(exc)})") from None
    if proto.ir_version == 0 or not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise BadInputError(f"'{path}' is not an ONNX model (no graph or IR version found; truncated or another format)")
    _check_external_data_present(proto, path)
    try:
        model = ir.load(path)
        internalize(model)
    except Exception as exc:
        raise BadInputError(f"cannot read ONNX model '{path}': {_short(exc)}") from None
    if check:
        check_model(model, source=str(path))
    return model


def internalize(model: ir.Model) -> bool:
    """Read external tensors into memory when the whole model stays below the external-data threshold; True if any
    were read.

    A model exported with external data (torch's dynamo exporter writes one for any size) then takes the in-memory
    path of every tool: ORT's quantizer cannot follow relative data paths from the temporary folder it saves to
    (``optimize --pass quantize`` failed on such models: reports/large_model.md), and the checker and ORT sessions
    need no temporary copy of the model on disk. The cost is memory: the tensors are held, not mapped from the file.
    Larger models keep their tensors external and go to ORT by path.
    """
    if not has_external_tensors(model) or tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        return False
    ir.external_data.load_to_model(model)
    return True


def as_ir_model(model: "str | os.PathLike[str] | onnx.ModelProto | ir.Model") -> ir.Model:
    """Accept a path, a ModelProto or an ir.Model (the latter is returned as is)."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return load_model(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to a ModelProto (external tensors stay external where they were).

    onnx-ir writes a ``value_info`` entry for every initializer; the initializer already carries its type and shape,
    so those entries are dropped (2.7 KB of a 160 KB int8 ShuffleNetV2, where every byte counts against the FP32 file).
    """
    proto = ir.serde.serialize_model(model)
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    if any(info.name in initializers for info in graph.value_info):
        kept = [info for info in graph.value_info if info.name not in initializers]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return proto


def check_model(model: ir.Model, *, source: str = "model", serialized: bytes | None = None) -> None:
    """Structural checks a foreign export must pass before any pass touches it (``serialized``: the model's
    :func:`serialized_in_memory`, when the caller has it)."""
    function_domains = {function.domain for function in model.functions.values()}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in KNOWN_DOMAINS and node.domain not in function_domains:
            raise BadInputError(
                f"{source}: node '{node.name or node.op_type}' uses op '{node.op_type}' of unknown domain "
                f"'{node.domain}'; ONNX Runtime cannot run it, so onnxopt cannot validate any change to it"
            )
    try:
        run_checker(model, serialized)
    except Exception as exc:
        raise BadInputError(f"{source} fails the ONNX checker: {_short(exc)}") from None


def serialized_in_memory(model: ir.Model) -> bytes | None:
    """The serialized model where that is the whole model (no external tensors, below the external-data threshold),
    else None: one serialization that the checker, ORT and the size count share (each used to serialize the proto
    again: three times per validated step, 0.4 s of a 269 MB model's input snapshot)."""
    if has_external_tensors(model) or tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        return None
    return to_proto(model).SerializeToString()


def run_checker(model: ir.Model, serialized: bytes | None = None) -> None:
    """onnx.checker on the model; external tensors are checked through a temporary file, >2 GB models skipped.

    Large models are validated by the ORT load that follows every pass instead. ``serialized``: the model's
    :func:`serialized_in_memory`, when the caller has it.
    """
    if serialized is not None:
        onnx.checker.check_model(serialized, full_check=False)
        return
    if tensor_bytes(model) >= PROTOBUF_LIMIT:
        return
    if has_external_tensors(model):
        with model_file(model) as path:
            onnx.checker.check_model(str(path), full_check=False)
        return
    onnx.checker.check_model(to_proto(model), full_check=False)


def has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph inputs that need data, in graph order."""
    initializers = set(model.graph.initializers)
    specs = []
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        dims: list[int | str | None] = []
        for dim in value.shape or []:
            if isinstance(dim, int):
                dims.append(dim)
            else:
                dims.append(dim.value if isinstance(dim, ir.SymbolicDim) else None)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        specs.append(InputSpec(value.name or "", tuple(dims), np.dtype(dtype)))
    return specs


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of initializer data (external data included), for the 2 GB protobuf limit."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: str | os.PathLike[str], *, serialized: bytes | None = None) -> Path:
    """Write ``model`` atomically: nothing appears at ``path`` unless the whole write succeeds.

    Large models get their tensors in ``<name>.data`` beside the model, moved into place before the model file.
    ``serialized``: the model's :func:`serialized_in_memory`, when the caller has it (written as it is: ONNX's
    messages have no maps, so it is the deterministic serialization too).
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"output folder '{folder}' does not exist")
    _probe_writable(folder)
    external = tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    try:
        tmp_model = tmpdir / path.name
        data_name = f"{path.name}.data"
        if external:
            ir.save(model, tmp_model, external_data=data_name)
        elif serialized is not None:
            tmp_model.write_bytes(serialized)
        else:
            _save_in_memory(model, tmp_model)
        if external:
            os.replace(tmpdir / data_name, folder / data_name)
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _save_in_memory(model: ir.Model, target: Path) -> None:
    # Tensors that live in external files must be loaded so the saved model is self-contained.
    proto = to_proto(model)
    onnx.external_data_helper.load_external_data_for_model(proto, str(_base_dir(model)))
    target.write_bytes(proto.SerializeToString(deterministic=True))


def _base_dir(model: ir.Model) -> Path:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return Path(tensor.base_dir)
    return Path(".")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically (reports, recipes)."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise BadInputError(f"output folder '{folder}' does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise BadInputError(f"cannot write into '{folder}': {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def check_output_path(output: str | os.PathLike[str], *inputs: str | os.PathLike[str]) -> Path:
    """Refuse an output that would overwrite an input, or that cannot be written."""
    out = Path(output)
    for source in inputs:
        if Path(source).exists() and out.exists() and os.path.samefile(out, source):
            raise BadInputError(f"output path '{out}' is the input model; choose another path (inputs are never modified)")
        if Path(os.path.abspath(out)) == Path(os.path.abspath(source)):
            raise BadInputError(f"output path '{out}' is the input model; choose another path (inputs are never modified)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"output folder '{folder}' does not exist")
    if out.is_dir():
        raise BadInputError(f"output path '{out}' is a folder; give a file name ending in .onnx")
    _probe_writable(folder)
    return out


def _probe_writable(folder: Path) -> None:
    """Create and remove a file: permission bits alone do not tell (root, read-only mounts, /proc)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxopt-probe-", dir=folder)
    except OSError as exc:
        raise BadInputError(f"output folder '{folder}' is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_TENSOR_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                       "string_data")


def serialized_size(model: ir.Model, serialized: bytes | None = None) -> int:
    """Size in bytes of the model as it would be written to disk (``serialized``: its :func:`serialized_in_memory`)."""
    if serialized is not None:
        return len(serialized)
    if tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        # the weights' bytes, and the graph without them (tensors held in memory would otherwise count twice)
        proto = to_proto(model)
        for tensor in proto.graph.initializer:
            if not onnx.external_data_helper.uses_external_data(tensor):
                for field in _TENSOR_DATA_FIELDS:
                    tensor.ClearField(field)
        return tensor_bytes(model) + proto.ByteSize()
    proto = to_proto(model)
    onnx.external_data_helper.load_external_data_for_model(proto, str(_base_dir(model)))
    return proto.ByteSize()


def _check_external_data_present(proto: onnx.ModelProto, path: Path) -> None:
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = path.parent / info.get("location", "")
        if not location.is_file():
            raise BadInputError(
                f"model '{path}' stores tensor '{tensor.name}' in external file '{info.get('location')}', "
                f"which is missing (expected at '{location}')"
            )
        needed = int(info.get("offset", 0)) + int(info.get("length", 0) or 0)
        if needed > location.stat().st_size:
            raise BadInputError(
                f"external data file '{location}' is truncated: tensor '{tensor.name}' needs {needed} bytes, "
                f"the file has {location.stat().st_size}"
            )


@contextlib.contextmanager
def model_file(model: ir.Model) -> Iterator[Path]:
    """A temporary on-disk copy for tools that need a path (ORT with external data, onnxsim on large models)."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as tmp:
        target = Path(tmp) / "model.onnx"
        if tensor_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            ir.save(model, target, external_data="model.onnx.data")
            release_mapped(model)
        else:
            _save_in_memory(model, target)
        yield target


def proto_tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializer data, from dims and types: ``ByteSize()`` serializes the message, and
    fails above 2 GB."""
    return sum(size for size in map(tensor_proto_bytes, proto.graph.initializer) if size is not None)


def tensor_proto_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of ``tensor``'s data from its dims and type (reading ``raw_data`` would copy it; 4-bit types count a
    byte each); None for strings, UNDEFINED and types newer than this onnx (ORT reports those, if it matters)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except KeyError:
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def with_tensor_data(model: ir.Model) -> onnx.ModelProto:
    """``to_proto(model)`` with every external tensor's bytes read into the proto, whatever its size.

    A protobuf message over 2 GB cannot be serialized, but it can be held and edited in memory: ORT's quantizer
    rewrites a model that way (it loads one when asked for ``use_external_data_format``); ORT sessions get the proto
    through :func:`proto_file`, shape inference a copy without the weights (:func:`without_initializers`).
    """
    proto = to_proto(model)
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        value = model.graph.initializers.get(init.name)
        if value is None or value.const_value is None:
            continue
        init.raw_data = value.const_value.tobytes()
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
    release_mapped(model)
    return proto


def release_mapped(model: ir.Model) -> None:
    """Unmap the files of ``model``'s external tensors (each maps its file again when next read): pages read once
    through a mapping otherwise stay in this process's resident memory, a second copy of a model over 2 GB."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.release()


@contextlib.contextmanager
def proto_file(proto: onnx.ModelProto) -> Iterator[Path]:
    """``proto`` written to a temporary folder, its large initializers in an external data file, for ONNX Runtime
    above the 2 GB limit of one serialized message (:class:`onnxopt.shared_weights.SharedWeights` for one file).
    ``proto`` is not changed: the file gets a skeleton copy (every field but the initializers) and the tensors are
    written one at a time, so no second copy of the model is made."""
    from onnxopt.shared_weights import SharedWeights  # it builds on this module

    with SharedWeights(proto) as files:
        yield files.model_file()


def without_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of every field of ``proto`` but its main graph's initializers: a large model's structure, cheaply."""
    skeleton = onnx.ModelProto()
    copy_fields(skeleton, proto, skip="graph")
    copy_fields(skeleton.graph, proto.graph, skip="initializer")
    return skeleton


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """``graph``'s nodes and, after each, those of the subgraphs in its attributes (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_nodes(sub)


def copy_fields(target: Any, source: Any, *, skip: str) -> None:
    """Set every field of message ``target`` but ``skip`` to ``source``'s (cleared where ``source`` has none)."""
    for field in target.DESCRIPTOR.fields:
        if field.name != skip:
            target.ClearField(field.name)
    for field, value in source.ListFields():
        if field.name != skip:
            _copy_field(target, field, value)


def _copy_field(target: Any, field: Any, value: Any) -> None:
    if getattr(field, "is_repeated", None) or getattr(field, "label", None) == 3:  # protobuf 7 / older
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
