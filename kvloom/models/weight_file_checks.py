"""A GGUF file's header walked with every count, length and offset bounded by the file's size.

The readers behind kvloom trust the header: gguf's GGUFReader loops over an
array's claimed length even past the end of the file (a count of 2**40 never
finishes and keeps allocating), transformers' reader fails with raw struct
errors. This walk reads nothing it has not first checked against the bytes
that are left, so a truncated or lying file becomes a WeightsError naming the
file and the field before either reader sees it. Safetensors needs no such
walk: the library checks its header against the file before reading (and
kvloom/models/safetensors_weights.py turns its errors into WeightsError).
"""
from __future__ import annotations

import mmap
import os
import struct

from gguf.constants import GGML_QUANT_SIZES

from kvloom.errors import WeightsError

_VERSIONS = (2, 3)
# metadata value type -> width in bytes (u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64); 8 is string, 9 array
_SCALAR_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MIN_KV_BYTES = 8 + 4 + 1           # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dim count, type, offset
_MAX_DIMS = 4                       # ggml's GGML_MAX_DIMS
_MAX_NESTING = 4                    # arrays of arrays: the readers recurse once per level
_DEFAULT_ALIGNMENT = 32
_BLOCKS = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}  # ggml type -> (values, bytes) a block


class _Header:
    def __init__(self, path: str, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, what: str):
        raise WeightsError(f"GGUF file {self.path} is corrupt or truncated: {what}")

    def take(self, n: int, what: str) -> int:
        """Start of the next n bytes, if the file has them."""
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, the file has {self.size - self.pos} left")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def text(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at offset {start} is not UTF-8")

    def count(self, n: int, each: int, what: str) -> None:
        """A claimed count of items of at least `each` bytes must fit in what is left."""
        if n * each > self.size - self.pos:
            self.fail(f"{what} claims {n} items, more than the {self.size - self.pos} bytes left can hold")

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_WIDTH:
            self.take(_SCALAR_WIDTH[vtype], what)
        elif vtype == _STRING:
            self.text(what)
        elif vtype == _ARRAY:
            etype, n = self.u32(f"the element type of {what}"), self.u64(f"the length of {what}")
            if etype in _SCALAR_WIDTH:
                self.take(n * _SCALAR_WIDTH[etype], f"{what} ({n} values)")
            elif etype == _STRING:
                self.count(n, 8, what)
                self._skip_strings(n, what)
            elif etype == _ARRAY and depth < _MAX_NESTING:
                self.count(n, 12, what)
                for _ in range(n):
                    self.skip_value(_ARRAY, what, depth + 1)
            else:
                self.fail(f"{what} is an array of unknown or too deeply nested type {etype}")
        else:
            self.fail(f"{what} has unknown value type {vtype}")

    def _skip_strings(self, n: int, what: str) -> None:
        # Inline: a vocabulary is ~10^5 strings, read at every start. Decoded too: transformers' reader
        # decodes them all and reports a bad one as "not a valid JSON file".
        buf, size, pos = self.buf, self.size, self.pos
        for i in range(n):
            if size - pos < 8:
                self.fail(f"string {i} of {what} starts past the end of the file")
            end = pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
            if end > size:
                self.fail(f"string {i} of {what} runs past the end of the file")
            try:
                buf[pos + 8:end].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"string {i} of {what} is not UTF-8")
            pos = end
        self.pos = pos


def check_gguf(path: str) -> None:
    """Raise WeightsError unless the header's every count, length, type and tensor extent fits the file."""
    try:
        size = os.path.getsize(path)
        if size < 24:
            raise WeightsError(f"GGUF file {path} is {size} bytes, too short for a GGUF header (truncated?)")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk(_Header(path, buf, size))
    except OSError as e:
        raise WeightsError(f"cannot read GGUF file {path}: {e}") from e


def _walk(h: _Header) -> None:
    if h.buf[:4] != b"GGUF":
        h.fail("it does not start with the GGUF magic bytes (not a GGUF file?)")
    h.pos = 4
    version = h.u32("the version")
    if version not in _VERSIONS:
        h.fail(f"version {version} (kvloom reads GGUF v2 and v3, little-endian)")
    n_tensors, n_kv = h.u64("the tensor count"), h.u64("the metadata count")
    h.count(n_kv, _MIN_KV_BYTES, "the metadata table")
    alignment = _DEFAULT_ALIGNMENT
    keys: set[str] = set()
    for i in range(n_kv):
        key = h.text(f"metadata key {i}")
        if key in keys:
            h.fail(f"metadata key {key!r} appears twice")
        keys.add(key)
        vtype = h.u32(f"the type of {key!r}")
        if key == "general.alignment":
            if vtype != _UINT32:
                h.fail(f"general.alignment has type {vtype}, not uint32")
            alignment = h.u32(key)
            if alignment == 0 or alignment & (alignment - 1):
                h.fail(f"general.alignment {alignment} is not a power of two")
        else:
            h.skip_value(vtype, repr(key))

    h.count(n_tensors, _MIN_TENSOR_INFO_BYTES, "the tensor table")
    extents: list[tuple[int, int, str]] = []
    for i in range(n_tensors):
        name = h.text(f"the name of tensor {i}")
        n_dims = h.u32(f"the dimension count of {name!r}")
        if n_dims > _MAX_DIMS:
            h.fail(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = struct.unpack_from(f"<{n_dims}Q", h.buf, h.take(8 * n_dims, f"the dimensions of {name!r}"))
        ggml_type = h.u32(f"the type of {name!r}")
        offset = h.u64(f"the data offset of {name!r}")
        if ggml_type not in _BLOCKS:
            h.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        block, block_bytes = _BLOCKS[ggml_type]
        if dims and dims[0] % block:
            h.fail(f"tensor {name!r}: rows of {dims[0]} values are not whole {block}-value blocks")
        elements = 1
        for d in dims:
            elements *= d
        extents.append((offset, elements // block * block_bytes, name))

    data_start = -(-h.pos // alignment) * alignment
    extents.sort()
    seen: set[str] = set()
    prev_end, prev_name = 0, None
    for offset, nbytes, name in extents:
        if name in seen:
            h.fail(f"tensor {name!r} appears twice")
        seen.add(name)
        if offset < prev_end:
            h.fail(f"tensors {prev_name!r} and {name!r} overlap")
        if data_start + offset + nbytes > h.size:
            h.fail(f"tensor {name!r} ({nbytes} bytes at data offset {offset}) runs past the end of the "
                   f"file ({h.size} bytes)")
        prev_end, prev_name = offset + nbytes, name
