"""Reading ``.npz`` members without loading them, and writing ``.npz`` files one array at a time.

``np.load`` ignores ``mmap_mode`` for ``.npz`` archives and reads a whole member on access. Here a C-order member,
stored (``np.savez``) or compressed (``np.savez_compressed``), is read a block of rows at a time
(:meth:`NpzArchive.row_blocks`), so a pass over it holds one block; shapes come from the members' headers, without
reading their data. :meth:`NpzArchive.array` memory-maps a stored member (its bytes sit at a fixed offset in the
file) for readers that need the whole array; compressed and object arrays are then read whole.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zipfile
import zlib
from collections.abc import Generator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from onnxopt.errors import DataError

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"


class Header(NamedTuple):
    """What a member's ``.npy`` header says; ``offset`` is where its data start within the member."""

    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int


def _read_header(handle: BinaryIO) -> Header | None:
    """The ``.npy`` header at the handle's position (None for a format version this reader does not know)."""
    start = handle.tell()
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        return None
    return Header(tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype), handle.tell() - start)


def _read_into(handle: BinaryIO, target: memoryview, piece: int = 1 << 20) -> bool:
    """Fill ``target`` from ``handle`` a megabyte at a time (a zip member's ``read`` of the whole would hold the
    block twice; a plain file reads straight into it); False when the stream ends first."""
    filled = 0
    while filled < len(target):
        count = handle.readinto(target[filled:filled + piece])  # type: ignore[attr-defined]
        if not count:
            return False
        filled += count
    return True


def _blocks(handle: BinaryIO, header: Header, rows: int, what: str) -> Generator[np.ndarray, None, None]:
    """The array whose data start at the handle's position, ``rows`` rows at a time, each block in fresh memory."""
    for start in range(0, header.shape[0], rows):
        count = min(rows, header.shape[0] - start)
        block = np.empty((count, *header.shape[1:]), header.dtype)
        if not _read_into(handle, memoryview(block.reshape(-1).view(np.uint8))):
            raise DataError(f"{what} ends before row {start + count} of {header.shape[0]} (the file is truncated)")
        yield block


def _streamable(header: Header) -> bool:
    return bool(header.shape) and not header.fortran and not header.dtype.hasobject


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
        self._headers: dict[str, Header] = {}

    def keys(self) -> list[str]:
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def header(self, key: str) -> Header:
        """The shape and dtype of ``key``, read from its header alone (a compressed member is not decompressed), once:
        counting, planning and reading each ask for it."""
        if key in self._headers:
            return self._headers[key]
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(self._members[key]) as handle:
                header = _read_header(handle)
        except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"'{self.path}': cannot read array '{key}' ({exc})") from None
        if header is None:
            raise DataError(f"'{self.path}': array '{key}' has an .npy format version numpy cannot read")
        self._headers[key] = header
        return header

    def can_stream(self, key: str) -> bool:
        """Whether :meth:`row_blocks` can read ``key`` a block of rows at a time (C order, plain dtype, rank >= 1)."""
        return _streamable(self.header(key))

    def row_blocks(self, key: str, rows: int) -> Generator[np.ndarray, None, None]:
        """``key`` as consecutive blocks of ``rows`` rows along its first axis, read (and decompressed) in turn: one
        block in memory at a time, whatever the member's size (see :meth:`can_stream`). Plain reads rather than a
        memory map: a pass over a mapped file leaves every page it touched in the process's resident set. A stored
        member is read from the file at its offset (no CRC pass over it, no copy)."""
        header = self.header(key)
        try:
            stored = self._stored(self._members[key])
            with contextlib.ExitStack() as stack:
                if stored is not None:
                    handle: BinaryIO = stack.enter_context(open(self.path, "rb"))
                    handle.seek(stored[1])
                else:
                    archive = stack.enter_context(zipfile.ZipFile(self.path))
                    handle = stack.enter_context(archive.open(self._members[key]))
                    handle.read(header.offset)
                yield from _blocks(handle, header, rows, f"'{self.path}': array '{key}'")
        except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"'{self.path}': cannot read array '{key}' ({exc})") from None

    def array(self, key: str) -> np.ndarray:
        """The array stored under ``key``: a read-only memory map for stored members, else loaded."""
        info = self._members[key]
        try:
            mapped = self._map(info)
            if mapped is not None:
                return mapped
            with zipfile.ZipFile(self.path) as archive, archive.open(info) as handle:
                return np.lib.format.read_array(handle, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
            raise DataError(f"'{self.path}': cannot read array '{key}' ({exc})") from None

    def _map(self, info: zipfile.ZipInfo) -> np.ndarray | None:
        stored = self._stored(info)
        if stored is None:
            return None
        (shape, fortran, dtype, _), offset = stored
        if dtype.hasobject or int(np.prod(shape)) == 0 or not shape:
            return None
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=shape,
                         order="F" if fortran else "C")

    def _stored(self, info: zipfile.ZipInfo) -> tuple[Header, int] | None:
        """The header and the data's offset in the file of a stored (uncompressed, unencrypted) member, else None."""
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return None
        with open(self.path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(_LOCAL_HEADER.size)
            if len(local) != _LOCAL_HEADER.size:
                return None
            fields = _LOCAL_HEADER.unpack(local)
            if fields[0] != _LOCAL_MAGIC:
                return None
            handle.seek(info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10])
            header = _read_header(handle)
            return None if header is None else (header, handle.tell())


class NpyFile:
    """One ``.npy`` file behind :class:`NpzArchive`'s interface: one array, under the key ``np.savez`` gives an
    unnamed one, read a block of rows at a time or memory-mapped."""

    KEY = "arr_0"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                header = _read_header(handle)
        except (OSError, ValueError) as exc:
            raise DataError(f"'{self.path}' is not a readable .npy file ({exc})") from None
        if header is None:
            raise DataError(f"'{self.path}' is not a readable .npy file (unknown format version)")
        self._header = header

    def keys(self) -> list[str]:
        return [self.KEY]

    def __contains__(self, key: str) -> bool:
        return key == self.KEY

    def header(self, key: str) -> Header:
        return self._header

    def can_stream(self, key: str) -> bool:
        return _streamable(self._header)

    def row_blocks(self, key: str, rows: int) -> Generator[np.ndarray, None, None]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._header.offset)
                yield from _blocks(handle, self._header, rows, f"'{self.path}'")
        except (OSError, ValueError) as exc:
            raise DataError(f"'{self.path}': cannot read the array ({exc})") from None

    def array(self, key: str) -> np.ndarray:
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"'{self.path}' is not a readable .npy file ({exc})") from None


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


__all__ = ["Header", "NpyFile", "NpzArchive", "NpzWriter"]
