"""One temporary copy of a large model's weights, shared by every ONNX Runtime session made from its graph.

The quantize pass makes ORT sessions of its FP32 model at least twice: calibration (the graph with its activations
as outputs) and the placement search's timing. A model that goes to ORT as a file (above ``EXTERNAL_DATA_THRESHOLD``
for calibration, above ``placement.FILE_FROM_BYTES`` for timing) was written whole to a temporary folder for each:
on the 2.4 GB MLP of ``benchmarks/large_model.py`` two writes of 2.4 GB, 17 s of its 67 s search (profiled). Here the
weights go to the folder once and each session's graph is a small file beside them; and a weight whose bytes still
lie in the input's own external data file is not written at all where that file can be hard-linked into the folder
(the same filesystem). ORT refuses a symbolic link that leads out of the model's folder, so a link that fails means
a write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import onnx
import onnx_ir as ir

from onnxopt.modelio import tensor_proto_bytes, without_initializers

#: Initializers of fewer bytes stay inside the graph file.
INLINE_BELOW_BYTES = 1024
_ALIGN = 4096
_DATA_NAME = "weights.bin"


@dataclass(frozen=True)
class TensorSource:
    """Where a tensor's raw bytes lie in a file: ``length`` bytes from ``offset`` of ``path``."""

    path: Path
    offset: int
    length: int


def external_sources(model: ir.Model) -> dict[str, TensorSource]:
    """The initializers of ``model`` still read from an external data file, by name (absolute paths)."""
    sources = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.length is not None:
            sources[name] = TensorSource(Path(tensor.path).resolve(), int(tensor.offset or 0), int(tensor.length))
    return sources


class SharedWeights:
    """Files for ORT sessions of ``proto``'s graph, its weights written (or linked) once.

    ``proto``'s initializers must keep their bytes while this object lives (its graph outputs may change: each
    :meth:`model_file` writes the graph as it is then); ``sources`` says which of them are still in the input's
    external data files (:func:`external_sources`). Use as a context manager: the folder goes at exit.
    """

    def __init__(self, proto: onnx.ModelProto, sources: Mapping[str, TensorSource] | None = None):
        self.proto = proto
        self._sources = dict(sources or {})
        self._stack = contextlib.ExitStack()
        self._folder: Path | None = None
        self._data: BinaryIO | None = None
        #: name -> (data type, dims, external_data entries) of each weight placed in the folder
        self._placed: dict[str, tuple[int, tuple[int, ...], list[tuple[str, str]]]] = {}
        self._links: dict[Path, str | None] = {}
        self._files = 0
        #: Bytes of weights written to the folder, and bytes reached through links to the input's files.
        self.written_bytes = 0
        self.linked_bytes = 0

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Delete the folder (ORT sessions made from its files have read what they need by then)."""
        if self._data is not None:
            self._data.close()
            self._data = None
        self._stack.close()
        self._folder = None

    def model_file(self) -> Path:
        """``proto`` as it is now (its graph outputs included) as a model file in the folder, its large weights in
        the folder's data file or in linked input files; only weights not placed before are written."""
        folder = self._ensure_folder()
        skeleton = without_initializers(self.proto)
        for init in self.proto.graph.initializer:
            entry = skeleton.graph.initializer.add()
            refs = self._refs(init)
            if refs is None:
                entry.CopyFrom(init)
                continue
            entry.name, entry.data_type, entry.data_location = init.name, init.data_type, onnx.TensorProto.EXTERNAL
            entry.dims.extend(init.dims)
            for key, value in refs:
                item = entry.external_data.add()
                item.key, item.value = key, value
        if self._data is not None:
            self._data.flush()
        self._files += 1
        path = folder / f"model_{self._files}.onnx"
        path.write_bytes(skeleton.SerializeToString())
        return path

    # ------------------------------------------------------------------------------------------------------------
    def _ensure_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxopt-weights-")))
        return self._folder

    def _refs(self, init: onnx.TensorProto) -> list[tuple[str, str]] | None:
        """The external_data entries of ``init`` in the folder (placing it first), or None to keep it inline."""
        if not init.HasField("raw_data") or init.data_location == onnx.TensorProto.EXTERNAL:
            return None
        nbytes = tensor_proto_bytes(init)
        if nbytes is None or nbytes < INLINE_BELOW_BYTES:
            return None
        shape = (init.data_type, tuple(init.dims))
        placed = self._placed.get(init.name)
        if placed is not None and placed[:2] == shape:
            return placed[2]
        refs = self._linked(init.name, nbytes) or self._write(init)
        self._placed[init.name] = (*shape, refs)
        return refs

    def _linked(self, name: str, nbytes: int) -> list[tuple[str, str]] | None:
        source = self._sources.get(name)
        if source is None or source.length != nbytes:
            return None
        if source.path not in self._links:
            link = f"input_{len(self._links)}.bin"
            try:
                os.link(source.path, self._ensure_folder() / link)
            except OSError:  # another filesystem, no permission, a missing file: write the bytes instead
                link = None
            self._links[source.path] = link
        location = self._links[source.path]
        if location is None:
            return None
        self.linked_bytes += nbytes
        return [("location", location), ("offset", str(source.offset)), ("length", str(nbytes))]

    def _write(self, init: onnx.TensorProto) -> list[tuple[str, str]]:
        if self._data is None:
            self._data = open(self._ensure_folder() / _DATA_NAME, "wb")  # noqa: SIM115 - closed by close()
        data = self._data
        offset = -data.tell() % _ALIGN + data.tell()
        data.seek(offset)
        raw = init.raw_data
        data.write(raw)
        self.written_bytes += len(raw)
        return [("location", _DATA_NAME), ("offset", str(offset)), ("length", str(len(raw)))]


__all__ = ["INLINE_BELOW_BYTES", "SharedWeights", "TensorSource", "external_sources"]
