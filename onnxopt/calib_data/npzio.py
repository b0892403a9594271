"""Reading ``.npz`` members without loading them, and writing ``.npz`` files one array at a time.

``np.load`` ignores ``mmap_mode`` for ``.npz`` archives and reads a whole member on access. Members written by
``np.savez`` are stored uncompressed, so their bytes sit at a fixed offset in the file and can be memory-mapped: a
source then reads only the samples of the batch it is building. Compressed members (``np.savez_compressed``) and
object arrays cannot be mapped and are read whole, one array at a time.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from onnxopt.errors import DataError

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"


class NpzArchive:
    """The arrays of one ``.npz`` file by key (member name without ``.npy``), memory-mapped where possible."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as archive:
                self._members = {info.filename[:-4]: info for info in archive.infolist()
                                 if info.filename.endswith(".npy")}
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"'{self.path}' is not a readable .npz file ({exc})") from None

    def keys(self) -> list[str]:
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def array(self, key: str) -> np.ndarray:
        """The array stored under ``key``: a read-only memory map for stored members, else loaded."""
        info = self._members[key]
        try:
            mapped = self._map(info)
            if mapped is not None:
                return mapped
            with zipfile.ZipFile(self.path) as archive, archive.open(info) as handle:
                return np.lib.format.read_array(handle, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"'{self.path}': cannot read array '{key}' ({exc})") from None

    def _map(self, info: zipfile.ZipInfo) -> np.ndarray | None:
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        with open(self.path, "rb") as handle:
            handle.seek(info.header_offset)
            header = handle.read(_LOCAL_HEADER.size)
            if len(header) != _LOCAL_HEADER.size:
                return None
            fields = _LOCAL_HEADER.unpack(header)
            if fields[0] != _LOCAL_MAGIC:
                return None
            handle.seek(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                return None
            offset = handle.tell()
        if dtype.hasobject or int(np.prod(shape)) == 0 or not shape:
            return None
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape,
                         order="F" if fortran else "C")


class NpzWriter:
    """Append arrays to an uncompressed ``.npz`` one by one (``np.savez`` needs them all in memory at once)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def add(self, key: str, array: np.ndarray) -> None:
        with self._zip.open(f"{key}.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["NpzArchive", "NpzWriter"]
