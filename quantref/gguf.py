"""The GGUF container: the one place where the file format is understood.

A GGUF file (versions 2 and 3, little-endian) is laid out as::

    header        magic "GGUF", u32 version, u64 tensor_count, u64 kv_count
    metadata      kv_count x (string key, u32 value type, value)
    tensor infos  tensor_count x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding       up to ``general.alignment`` (default 32)
    tensor data   each tensor at data_offset + offset; llama.cpp requires each offset to be
                  the sum of the earlier tensors' sizes, each padded to the alignment

where a string is (u64 byte length, UTF-8 bytes) and an array value is (u32 item type, u64 count,
items); arrays may nest. ``ne[0]`` is the row length (innermost dimension): this module reverses
the dimensions once, so every :class:`TensorInfo` shape is in NumPy order (outermost first).

:func:`read` parses the header with ``struct`` over a read-only memory map, checking every read
against the bytes that remain, so that a malformed or hostile file gives a :class:`GGUFError`
naming the file, the field and its byte offset: never a crash, a hang, or an allocation larger
than what the file's bytes can back (every count is bounded by the bytes remaining before
anything is allocated or looped over). By default it also refuses every file that llama.cpp's
loader refuses (``docs/gguf_validation.md`` lists its checks, one by one, and where quantref is
stricter or looser); ``read(path, strict=False)`` reads what gguf-py reads. Tensor data is not
copied: :meth:`GGUFFile.raw` returns views into the map.

:func:`write` writes through ``gguf.GGUFWriter`` into a temporary file in the destination folder
and renames it over the destination only on success. Metadata value types are preserved exactly,
so read -> write -> read gives equal ``metadata`` and ``types``.

Value types, as stored in :attr:`GGUFFile.types`: a scalar key maps to its
``gguf.GGUFValueType``; an array key maps to ``(GGUFValueType.ARRAY, item)`` where ``item`` is
the item type; for an array of arrays ``item`` is itself such a pair when every inner array has
the same type (``(ARRAY, (ARRAY, UINT8))``), or a list with one type per inner array when they
differ; an empty array of arrays records just ``ARRAY`` as its item type.
"""

from __future__ import annotations

import codecs
import mmap
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

__all__ = [
    "GGUFError",
    "GGUFFile",
    "TensorInfo",
    "TypeSpec",
    "read",
    "write",
    "DEFAULT_ALIGNMENT",
    "MAX_DIMS",
    "MAX_ARRAY_DEPTH",
    "MAX_ARRAY_ELEMENTS",
    "MAX_NAME",
    "MAX_STRING_LENGTH",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is refused, as llama.cpp does
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # nested arrays: bounded so a hostile file cannot exhaust the Python stack
INT64_MAX = 2**63 - 1  # ggml stores dimensions and element counts as int64
# llama.cpp's limits (ggml/src/gguf.cpp, ggml/include/ggml.h), enforced by read(strict=True)
MAX_STRING_LENGTH = 1 << 30  # GGUF_MAX_STRING_LENGTH: bytes of one string (key, value, name)
MAX_ARRAY_ELEMENTS = 1 << 30  # GGUF_MAX_ARRAY_ELEMENTS: items of one array
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name has at most MAX_NAME - 1 bytes

# A type descriptor: a scalar GGUFValueType, or (ARRAY, item descriptor), or for an array of
# arrays with differing inner types (ARRAY, [descriptor per item]).
TypeSpec = Union[GGUFValueType, tuple]

_T = GGUFValueType
# Fixed-size value types: (struct format, NumPy dtype); BOOL is one byte that must be 0 or 1.
_FIXED: dict[GGUFValueType, tuple[struct.Struct, np.dtype]] = {
    _T.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    _T.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    _T.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    _T.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    _T.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    _T.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    _T.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    _T.BOOL: (struct.Struct("<B"), np.dtype("<u1")),
    _T.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    _T.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    _T.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")

# Smallest possible encodings, used to bound counts by the bytes that remain.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_MIN_ITEM_BYTES = {**{t: s.size for t, (s, _) in _FIXED.items()}, _T.STRING: 8, _T.ARRAY: 4 + 8}


class GGUFError(ValueError):
    """A malformed GGUF file. ``str()`` names the file, the field and its byte offset."""

    def __init__(self, path: str | os.PathLike[str], field: str, offset: int, message: str):
        self.path = Path(path)
        self.field = field
        self.offset = offset
        self.message = message
        super().__init__(f"{os.fspath(path)}: {field} at offset {offset}: {message}")

    def __reduce__(self):  # keep the exception picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.path, self.field, self.offset, self.message))


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    shape: NumPy order (outermost first; ``shape[-1]`` is GGUF's ``ne[0]``, the row length).
    offset: absolute byte offset of the tensor's data in the file.
    """

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    offset: int
    nbytes: int
    n_elements: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (``shape[-1]`` elements) in this tensor's encoding."""
        block_elems, block_bytes = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block_elems * block_bytes


# Strings longer than this are decoded a chunk at a time: CPython's UTF-8 decoder reserves room
# for the whole input up front, so a corrupt length over megabytes of non-text would otherwise
# allocate that much before the first invalid byte is seen.
_DECODE_CHUNK = 4096


class _BadUTF8(Exception):
    def __init__(self, offset: int, reason: str):
        self.offset, self.reason = offset, reason


def _decode_utf8(buf: Any, start: int, n: int) -> str:
    """Decode ``buf[start:start + n]`` as UTF-8; raises _BadUTF8 with the absolute offset."""
    if n <= _DECODE_CHUNK:
        try:
            return str(buf[start : start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise _BadUTF8(start + e.start, e.reason) from None
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts = []
    end = start + n
    for a in range(start, end, _DECODE_CHUNK):
        b = min(a + _DECODE_CHUNK, end)
        pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
        try:
            parts.append(decoder.decode(buf[a:b], final=b == end))
        except UnicodeDecodeError as e:
            raise _BadUTF8(a - pending + e.start, e.reason) from None
    return "".join(parts)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure is a GGUFError."""

    __slots__ = ("buf", "size", "pos", "path", "strict")

    def __init__(self, buf: Any, path: str | os.PathLike[str], strict: bool = True):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path
        self.strict = strict  # llama.cpp's rules (see read())

    def error(self, field: str, message: str, offset: int | None = None) -> GGUFError:
        return GGUFError(self.path, field, self.pos if offset is None else offset, message)

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, field: str) -> None:
        if n > self.size - self.pos:
            raise self.error(
                field,
                f"needs {n} bytes but only {self.size - self.pos} remain (file size {self.size}): "
                "truncated file or corrupt length",
            )

    def unpack(self, fmt: struct.Struct, field: str) -> Any:
        self.need(fmt.size, field)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def string(self, field: str) -> str:
        start = self.pos
        n = self.unpack(_U64, field)
        if self.strict and n > MAX_STRING_LENGTH:
            raise self.error(field, f"string length {n} exceeds llama.cpp's maximum "
                             f"{MAX_STRING_LENGTH} (GGUF_MAX_STRING_LENGTH)", start)
        if n > self.size - self.pos:
            raise self.error(
                field,
                f"string length {n} runs past the end of the file "
                f"({self.size - self.pos} bytes remain)",
                start,
            )
        try:
            s = _decode_utf8(self.buf, self.pos, n)
        except _BadUTF8 as e:
            raise self.error(field, f"string is not valid UTF-8 ({e.reason})", e.offset) from None
        self.pos += n
        return s

    def value_type(self, field: str) -> GGUFValueType:
        start = self.pos
        code = self.unpack(_U32, field)
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.error(field, f"unknown value type {code}", start) from None


def _parse_value(cur: _Cursor, vtype: GGUFValueType, field: str, depth: int) -> tuple[Any, TypeSpec]:
    """Parse one value of type ``vtype`` at the cursor; returns (Python value, type descriptor)."""
    if vtype == _T.STRING:
        return cur.string(field), vtype
    if vtype == _T.ARRAY:
        return _parse_array(cur, field, depth)
    fmt, _ = _FIXED[vtype]
    start = cur.pos
    value = cur.unpack(fmt, field)
    if vtype == _T.BOOL:
        if value > 1:
            raise cur.error(field, f"bool value {value} is not 0 or 1", start)
        value = bool(value)
    return value, vtype


def _parse_array(cur: _Cursor, field: str, depth: int) -> tuple[list, TypeSpec]:
    """Parse an array body (u32 item type, u64 count, items) nested ``depth`` arrays deep."""
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.error(field, f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
    item_at = cur.pos
    item_type = cur.value_type(f"{field} item type")
    if cur.strict and item_type == _T.ARRAY:
        raise cur.error(f"{field} item type", "an array of arrays, which llama.cpp refuses "
                        "(read(strict=False) reads it, as gguf-py does)", item_at)
    count_at = cur.pos
    count = cur.unpack(_U64, f"{field} count")
    if cur.strict and count > MAX_ARRAY_ELEMENTS:
        raise cur.error(f"{field} count", f"array of {count} items exceeds llama.cpp's maximum "
                        f"{MAX_ARRAY_ELEMENTS} (GGUF_MAX_ARRAY_ELEMENTS)", count_at)
    if count > cur.remaining // _MIN_ITEM_BYTES[item_type]:
        raise cur.error(
            f"{field} count",
            f"array of {count} {item_type.name} items cannot fit in the {cur.remaining} bytes "
            "that remain",
            count_at,
        )

    if item_type in _FIXED:
        # One vectorized read; count * itemsize was just checked to fit.
        _, dtype = _FIXED[item_type]
        start = cur.pos
        items = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=start)
        cur.pos += count * dtype.itemsize
        if item_type == _T.BOOL:
            bad = items > 1
            if bad.any():
                i = int(bad.argmax())
                raise cur.error(f"{field} item {i}", f"bool value {items[i]} is not 0 or 1", start + i)
            values = (items != 0).tolist()
        else:
            values = items.tolist()
        del items  # release the buffer export promptly (the map can only close without them)
        return values, (_T.ARRAY, item_type)

    if item_type == _T.STRING:
        return _parse_string_array(cur, count, field), (_T.ARRAY, _T.STRING)

    # Array of arrays: each item is an array body with its own item type and count.
    values, specs = [], []
    for i in range(count):
        value, spec = _parse_array(cur, f"{field} item {i}", depth + 1)
        values.append(value)
        specs.append(spec)
    if not specs:
        return values, (_T.ARRAY, _T.ARRAY)
    same = all(spec == specs[0] for spec in specs)
    return values, (_T.ARRAY, specs[0] if same else specs)


def _parse_string_array(cur: _Cursor, count: int, field: str) -> list[str]:
    """Parse ``count`` strings. The loop is bounded: each string takes at least 8 bytes."""
    buf, size, pos = cur.buf, cur.size, cur.pos
    limit = MAX_STRING_LENGTH if cur.strict else 1 << 64
    unpack_len = _U64.unpack_from
    out: list[str] = []
    append = out.append
    try:
        for _ in range(count):
            if pos + 8 > size:
                raise GGUFError(cur.path, f"{field} item {len(out)}", pos,
                                f"string length needs 8 bytes but only {size - pos} remain")
            (n,) = unpack_len(buf, pos)
            pos += 8
            if n > limit:
                raise GGUFError(cur.path, f"{field} item {len(out)}", pos - 8,
                                f"string length {n} exceeds llama.cpp's maximum "
                                f"{MAX_STRING_LENGTH} (GGUF_MAX_STRING_LENGTH)")
            if n > size - pos:
                raise GGUFError(cur.path, f"{field} item {len(out)}", pos - 8,
                                f"string length {n} runs past the end of the file "
                                f"({size - pos} bytes remain)")
            append(str(buf[pos : pos + n], "utf-8") if n <= _DECODE_CHUNK else _decode_utf8(buf, pos, n))
            pos += n
    except UnicodeDecodeError as e:
        raise GGUFError(cur.path, f"{field} item {len(out)}", pos + e.start,
                        f"string is not valid UTF-8 ({e.reason})") from None
    except _BadUTF8 as e:
        raise GGUFError(cur.path, f"{field} item {len(out)}", e.offset,
                        f"string is not valid UTF-8 ({e.reason})") from None
    cur.pos = pos
    return out


class GGUFFile:
    """A parsed GGUF file with its tensor data memory-mapped (read-only, never copied).

    Use as a context manager or call :meth:`close`. Arrays returned by :meth:`raw` are views into
    the map; they stay valid after ``close()`` (the mapping is released when the last one dies).
    """

    path: Path
    version: int
    alignment: int
    metadata: dict[str, Any]
    types: dict[str, TypeSpec]
    tensors: dict[str, TensorInfo]
    data_offset: int  # absolute offset of the (aligned) tensor data section
    file_size: int

    def __init__(
        self, path: Path, version: int, alignment: int, metadata: dict[str, Any],
        types: dict[str, TypeSpec], tensors: dict[str, TensorInfo], data_offset: int,
        mapping: mmap.mmap | None, file_size: int,
    ):
        self.path = path
        self.version = version
        self.alignment = alignment
        self.metadata = metadata
        self.types = types
        self.tensors = tensors
        self.data_offset = data_offset
        self.file_size = file_size
        self._mmap = mapping
        # One base array over the map; raw() slices it, so close() only has to drop this one.
        self._data = np.frombuffer(mapping, dtype=np.uint8) if mapping is not None else np.zeros(0, np.uint8)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.tensors)} tensors"
        return f"<GGUFFile {os.fspath(self.path)!r} v{self.version}, {len(self.metadata)} keys, {state}>"

    @property
    def closed(self) -> bool:
        return self._data is None

    def close(self) -> None:
        """Release the memory map (deferred while views returned by raw() are alive)."""
        self._data = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # raw() views still alive: the map is released when they are collected
            self._mmap = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{os.fspath(self.path)}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's encoded bytes: uint8 view into the map, shaped ``[*shape[:-1], row_bytes]``."""
        info = self._info(name)
        if self._data is None:
            raise ValueError(f"{os.fspath(self.path)}: GGUF file is closed")
        start = info.offset
        flat = self._data[start : start + info.nbytes]
        return flat.reshape(*info.shape[:-1], info.row_bytes)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, shape ``TensorInfo.shape`` (NumPy order)."""
        from .quants import dequantize  # lazy: quants is heavier and not needed to read headers

        info = self._info(name)
        values = dequantize(self.raw(name), info.qtype)
        return np.asarray(values, dtype=np.float32).reshape(info.shape)


def read(path: str | os.PathLike[str], strict: bool = True) -> GGUFFile:
    """Parse a GGUF v2/v3 file; tensor data stays in a read-only memory map.

    ``strict`` (default): refuse every file that llama.cpp's loader refuses (``gguf.cpp``'s
    ``gguf_init_from_reader`` and ``llama_model_loader``'s bounds check; the list, rule by rule,
    is ``docs/gguf_validation.md``): besides what is malformed outright, an empty key, an array
    of arrays, a string or array over llama.cpp's 2**30 limits, a tensor name of 64 bytes or
    more, and tensor data that does not start exactly where the previous tensor's padded data
    ends (so no two tensors overlap). ``strict=False`` reads what gguf-py's ``GGUFReader``
    reads: those five are allowed (any aligned offset, overlaps included), everything else is
    still checked.

    Raises GGUFError (naming the file, the field and its byte offset) for any malformed content
    and OSError when the file cannot be opened.
    """
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if file_size else None
    # The parser reads through a memoryview so that strings decode straight from the map
    # (slicing an mmap would copy the bytes first).
    view = memoryview(mapping if mapping is not None else b"")
    try:
        return _parse(path, view, mapping, file_size, strict)
    except BaseException:
        view.release()  # before close(): an export would keep the map open
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass
        raise
    finally:
        view.release()


def _parse(path: Path, view: memoryview, mapping: mmap.mmap | None, file_size: int,
           strict: bool) -> GGUFFile:
    cur = _Cursor(view, path, strict)

    # Header.
    cur.need(_HEADER.size, "header")
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(cur.buf, 0)
    if magic != GGUF_MAGIC:
        raise cur.error("header magic", f"bad magic {magic!r}, expected {GGUF_MAGIC!r}", 0)
    if version not in SUPPORTED_VERSIONS:
        # llama.cpp's four cases, in its order
        if version == 0:
            hint = " (version 0 is invalid)"
        elif version & 0xFFFF == 0:
            hint = (" (a big-endian GGUF, which is not supported)"
                    if (version >> 24) in SUPPORTED_VERSIONS else
                    " (the low 16 bits are 0: a file of the other byte order?)")
        elif version == 1:
            hint = " (GGUFv1 is no longer supported, as in llama.cpp)"
        else:
            hint = f" (newer than {max(SUPPORTED_VERSIONS)})"
        raise cur.error(
            "header version", f"unsupported GGUF version {version}{hint}; "
            f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))}", 4,
        )
    cur.pos = _HEADER.size
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > cur.remaining:
        raise cur.error(
            "header tensor_count/kv_count",
            f"{n_tensors} tensors and {n_kv} keys cannot fit in the {cur.remaining} bytes "
            "after the header",
            8,
        )

    # Metadata.
    metadata: dict[str, Any] = {}
    types: dict[str, TypeSpec] = {}
    alignment_at = 0
    for i in range(n_kv):
        key_at = cur.pos
        key = cur.string(f"key #{i}")
        if strict and not key:
            raise cur.error(f"key #{i}", "empty key (llama.cpp refuses it)", key_at)
        if key in metadata:
            raise cur.error(f"key {key!r}", "duplicate key", key_at)
        vtype = cur.value_type(f"key {key!r} value type")
        if key == "general.alignment":
            alignment_at = cur.pos
        metadata[key], types[key] = _parse_value(cur, vtype, f"key {key!r} value", 0)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        at = alignment_at
        if types["general.alignment"] != _T.UINT32:
            raise cur.error("key 'general.alignment' value", "must be a UINT32, found "
                            f"{_describe(types['general.alignment'])}", at)
        alignment = metadata["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            raise cur.error("key 'general.alignment' value",
                            f"alignment {alignment} is not a power of two", at)

    # Tensor infos (offsets relative to the data section until it is known).
    entries: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int, int, int, int]] = []
    names: set[str] = set()
    expected_offset = 0  # strict: where the next tensor's data must start (llama.cpp's ctx->size)
    for i in range(n_tensors):
        name_at = cur.pos
        name = cur.string(f"tensor #{i} name")
        field = f"tensor {name!r}"
        if strict and len(name.encode("utf-8")) >= MAX_NAME:
            raise cur.error(f"{field} name", f"name of {len(name.encode('utf-8'))} bytes is too "
                            f"long: llama.cpp's limit is {MAX_NAME - 1} (GGML_MAX_NAME - 1)",
                            name_at)
        if name in names:
            raise cur.error(f"{field} name", "duplicate tensor name", name_at)
        names.add(name)
        dims_at = cur.pos
        n_dims = cur.unpack(_U32, f"{field} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.error(f"{field} n_dims", f"n_dims {n_dims} is out of range 1..{MAX_DIMS}", dims_at)
        dims_at = cur.pos
        cur.need(8 * n_dims, f"{field} dims")
        ne = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        for d in ne:
            if d > INT64_MAX:  # llama.cpp reads int64 and refuses a negative one
                raise cur.error(f"{field} dims", f"dimension {d} does not fit in int64", dims_at)
        # llama.cpp's test: the running product, left to right, skipping factors 0 and 1, stays
        # within int64 (so [2**62, 2**62, 0] is refused although its product is 0)
        n_elements = ne[0]
        for d in ne[1:]:
            if d > 1 and INT64_MAX // d < n_elements:
                raise cur.error(f"{field} dims",
                                f"product of dimensions {list(ne)} overflows int64", dims_at)
            n_elements *= d
        type_at = cur.pos
        code = cur.unpack(_U32, f"{field} type")
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError:
            raise cur.error(f"{field} type", f"unknown tensor type {code}", type_at) from None
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        if ne[0] % block_elems:
            raise cur.error(
                f"{field} dims",
                f"row length {ne[0]} is not a multiple of the {qtype.name} block size {block_elems}",
                dims_at,
            )
        nbytes = n_elements // block_elems * block_bytes
        if nbytes > file_size:
            raise cur.error(f"{field} dims", f"tensor of {nbytes} bytes exceeds the file size {file_size}",
                            dims_at)
        offset_at = cur.pos
        offset = cur.unpack(_U64, f"{field} offset")
        if strict and offset != expected_offset:
            raise cur.error(f"{field} offset", f"data offset {offset}, expected {expected_offset}: "
                            "llama.cpp requires each tensor's data to start where the previous "
                            f"tensor's, padded to the alignment {alignment}, ends", offset_at)
        if offset % alignment:
            raise cur.error(f"{field} offset",
                            f"data offset {offset} is not a multiple of the alignment {alignment}", offset_at)
        expected_offset += -(-nbytes // alignment) * alignment
        entries.append((name, tuple(reversed(ne)), qtype, offset, nbytes, n_elements, offset_at))

    data_offset = -(-cur.pos // alignment) * alignment
    if n_tensors and data_offset > file_size:
        raise cur.error("tensor data", f"the data section starts at {data_offset} (the tensor "
                        f"table padded to the alignment {alignment}), past the end of the file "
                        f"(size {file_size})", cur.pos)
    tensors: dict[str, TensorInfo] = {}
    for name, shape, qtype, offset, nbytes, n_elements, offset_at in entries:
        start = data_offset + offset
        if start + nbytes > file_size:
            raise cur.error(
                f"tensor {name!r} data",
                f"data [{start}, {start + nbytes}) runs past the end of the file (size {file_size})",
                offset_at,
            )
        tensors[name] = TensorInfo(name, shape, qtype, start, nbytes, n_elements)

    return GGUFFile(path, version, alignment, metadata, types, tensors, data_offset, mapping, file_size)


def _describe(spec: TypeSpec) -> str:
    if isinstance(spec, tuple):
        return f"ARRAY of {_describe(spec[1])}"
    if isinstance(spec, list):
        return "[" + ", ".join(_describe(s) for s in spec) + "]"
    return GGUFValueType(spec).name


# ---------------------------------------------------------------------------------------------
# Writing

TensorData = Union[np.ndarray, Callable[[], Union[np.ndarray, Iterable[np.ndarray]]]]

_NATURAL_DTYPES = {
    GGMLQuantizationType.F32: np.dtype("<f4"),
    GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"),
    GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"),
    GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}


class _Encoded(bytes):
    """A metadata value already encoded (value type prefix included) by :func:`_encode_value`."""


class _Writer(GGUFWriter):
    # GGUFWriter lays out the file; values are handed over pre-encoded so that every type
    # (nested arrays, empty arrays, 64-bit and 8-bit ints) is written exactly as described.
    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: Any = None) -> bytes:
        if isinstance(val, _Encoded):
            return bytes(val)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _as_value_type(t: Any, where: str) -> GGUFValueType:
    try:
        return GGUFValueType(t)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: {t!r} is not a GGUF value type") from None


def _encode_value(value: Any, spec: Any, where: str) -> bytes:
    """Encode ``value`` as type ``spec`` with its u32 type prefix (as a KV value is stored)."""
    if isinstance(spec, tuple):
        if len(spec) != 2 or _as_value_type(spec[0], where) != _T.ARRAY:
            raise ValueError(f"{where}: array type must be (GGUFValueType.ARRAY, item type), got {spec!r}")
        return _U32.pack(_T.ARRAY) + _encode_array(value, spec[1], where)
    vtype = _as_value_type(spec, where)
    if vtype == _T.ARRAY:
        raise ValueError(f"{where}: array type must be (GGUFValueType.ARRAY, item type), got {spec!r}")
    return _U32.pack(vtype) + _encode_scalar(value, vtype, where)


def _encode_scalar(value: Any, vtype: GGUFValueType, where: str) -> bytes:
    if vtype == _T.STRING:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a str for STRING, got {type(value).__name__}")
        data = value.encode("utf-8")
        return _U64.pack(len(data)) + data
    fmt, _ = _FIXED[vtype]
    if vtype == _T.BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{where}: expected a bool for BOOL, got {value!r}")
        return fmt.pack(bool(value))
    if vtype in (_T.FLOAT32, _T.FLOAT64):
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"{where}: {value!r} is not a valid {vtype.name}")
    try:
        return fmt.pack(value)
    except (struct.error, OverflowError) as e:
        raise ValueError(f"{where}: {value!r} does not fit in {vtype.name} ({e})") from None


def _encode_array(values: Any, item_spec: Any, where: str) -> bytes:
    """Encode an array body: u32 item type, u64 count, items."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"{where}: expected a list for an ARRAY, got {type(values).__name__}")
    n = len(values)
    if isinstance(item_spec, (tuple, list)):
        # Array of arrays: one descriptor for every item, or one per item.
        specs = list(item_spec) if isinstance(item_spec, list) else [item_spec] * n
        if len(specs) != n:
            raise ValueError(f"{where}: {len(specs)} item types given for {n} nested arrays")
        parts = [_U32.pack(_T.ARRAY), _U64.pack(n)]
        for i, (v, s) in enumerate(zip(values, specs)):
            if not (isinstance(s, tuple) and len(s) == 2 and _as_value_type(s[0], where) == _T.ARRAY):
                raise ValueError(f"{where}[{i}]: nested item type must be (ARRAY, item type), got {s!r}")
            parts.append(_encode_array(v, s[1], f"{where}[{i}]"))
        return b"".join(parts)

    item_type = _as_value_type(item_spec, where)
    head = _U32.pack(item_type) + _U64.pack(n)
    if item_type == _T.ARRAY:
        if n:
            raise ValueError(f"{where}: a non-empty array of arrays needs its inner types, "
                             "e.g. (ARRAY, (ARRAY, UINT8))")
        return head
    if item_type == _T.STRING:
        parts = [head]
        for i, s in enumerate(values):
            if not isinstance(s, str):
                raise ValueError(f"{where}[{i}]: expected a str, got {type(s).__name__}")
            data = s.encode("utf-8")
            parts.append(_U64.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    if n == 0:
        return head
    _, dtype = _FIXED[item_type]
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{where}: expected a flat list of {item_type.name}, got shape {arr.shape}")
    kind = arr.dtype.kind
    if item_type == _T.BOOL:
        if kind != "b":
            raise ValueError(f"{where}: expected bools for an ARRAY of BOOL")
    elif item_type in (_T.FLOAT32, _T.FLOAT64):
        if kind not in "iuf":
            raise ValueError(f"{where}: expected numbers for an ARRAY of {item_type.name}")
        if item_type == _T.FLOAT32:
            finite = arr[np.isfinite(arr)] if kind == "f" else arr
            if finite.size and np.abs(finite).max() > np.finfo(np.float32).max:
                raise ValueError(f"{where}: values do not fit in FLOAT32")
    else:
        if kind not in "iu":
            # NumPy widens a list mixing int64 and uint64-only values to float64 (or object):
            # such lists are accepted when every item really is an integer.
            if kind not in "fO" or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values
            ):
                raise ValueError(f"{where}: expected integers for an ARRAY of {item_type.name}")
            arr = np.array(values, dtype=object)
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise ValueError(f"{where}: values outside the {item_type.name} range "
                             f"[{info.min}, {info.max}]")
    return head + arr.astype(dtype).tobytes()


def _tensor_plan(name: str, data: TensorData, qtype: Any, shape: Any) -> tuple[GGMLQuantizationType, tuple[int, ...], int]:
    """Validate one tensor to write; returns (qtype, NumPy shape, nbytes)."""
    if not isinstance(name, str) or len(name.encode("utf-8")) >= MAX_NAME:
        raise ValueError(f"tensor {name!r}: a name must be a str of at most {MAX_NAME - 1} UTF-8 "
                         "bytes (llama.cpp's GGML_MAX_NAME - 1)")
    try:
        qtype = GGMLQuantizationType(qtype)
    except (ValueError, TypeError):
        raise ValueError(f"tensor {name!r}: unknown tensor type {qtype!r}") from None
    shape = tuple(int(d) for d in shape)
    if not 1 <= len(shape) <= MAX_DIMS or any(d < 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape} must have 1..{MAX_DIMS} non-negative dims")
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_elems:
        raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                         f"{qtype.name} block size {block_elems}")
    nbytes = int(np.prod(shape, dtype=object)) // block_elems * block_bytes
    if isinstance(data, np.ndarray):
        _check_chunk(name, data, qtype)
        if data.nbytes != nbytes:
            raise ValueError(f"tensor {name!r}: {data.nbytes} bytes given, {qtype.name} {shape} "
                             f"needs {nbytes}")
    elif not callable(data):
        raise ValueError(f"tensor {name!r}: data must be an ndarray or a callable returning them")
    return qtype, shape, nbytes


def _check_chunk(name: str, chunk: Any, qtype: GGMLQuantizationType) -> np.ndarray:
    if not isinstance(chunk, np.ndarray):
        raise ValueError(f"tensor {name!r}: expected ndarray data, got {type(chunk).__name__}")
    if chunk.dtype == np.uint8:
        return chunk
    natural = _NATURAL_DTYPES.get(qtype)
    if natural is None or chunk.dtype.newbyteorder("<") != natural:
        raise ValueError(f"tensor {name!r}: {chunk.dtype} data for a {qtype.name} tensor "
                         "(give encoded bytes as uint8)")
    return chunk.astype(natural, copy=False)


def write(
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    types: Mapping[str, Any],
    tensors: Mapping[str, tuple[TensorData, Any, Any]],
    *,
    progress: bool = False,
    desc: str = "writing",
) -> Path:
    """Write a GGUF v3 file atomically (temporary file in the same folder, then ``os.replace``).

    metadata: key -> value (int, float, bool, str, list), written in this order.
    types: key -> value type for every metadata key (see the module docstring).
    tensors: name -> (data, qtype, shape), written in this order. ``shape`` is NumPy order.
        ``data`` is the encoded tensor: uint8 bytes of any shape (e.g. what ``raw()`` or
        ``gguf.quants.quantize`` gives), or an array of the type's own dtype (float32 for F32,
        float16 for F16, ...); or a callable returning such an array or an iterable of chunks
        whose bytes concatenate to the tensor, called only when the tensor is written (so a
        converter holds one tensor, or one chunk, at a time).
    progress: show a tqdm bar over tensors.

    ``general.alignment``, when present, must be a UINT32 power of two and sets the alignment.
    Raises ValueError naming the key or tensor for any value that cannot be written as given.
    On any failure (including KeyboardInterrupt) the temporary file is removed and an existing
    ``path`` is left untouched.
    """
    path = Path(path)
    missing = [k for k in metadata if k not in types]
    extra = [k for k in types if k not in metadata]
    if missing or extra:
        raise ValueError(f"metadata and types must have the same keys: no type for {missing}, "
                         f"no value for {extra}")
    for k in metadata:
        try:
            k.encode("utf-8")
        except (AttributeError, UnicodeEncodeError):
            raise ValueError(f"key {k!r}: keys must be str encodable as UTF-8") from None
        if not k:
            raise ValueError("an empty key: llama.cpp refuses a file with one")
    encoded = {k: _Encoded(_encode_value(v, types[k], f"key {k!r}")) for k, v in metadata.items()}

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if (_as_value_type(types["general.alignment"], "key 'general.alignment'") != _T.UINT32
                or alignment <= 0 or alignment & (alignment - 1)):
            raise ValueError(f"general.alignment must be a UINT32 power of two, got {alignment!r}")

    plans = {name: _tensor_plan(name, data, qtype, shape) for name, (data, qtype, shape) in tensors.items()}

    arch = metadata.get("general.architecture", "")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    writer = None
    try:
        writer = _Writer(tmp, arch=str(arch))
        writer.kv_data[0].clear()  # drop the architecture key the constructor adds: ours are exact
        writer.data_alignment = alignment
        for key, value in encoded.items():
            spec = types[key]
            writer.add_key_value(key, value, _T.ARRAY if isinstance(spec, tuple) else GGUFValueType(spec))
        for name, (qtype, shape, nbytes) in plans.items():
            block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
            row_bytes = shape[-1] // block_elems * block_bytes
            # Byte shape (row length in bytes) + raw_dtype: GGUFWriter turns it back into `shape`.
            writer.add_tensor_info(name, (*shape[:-1], row_bytes), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())  # the data section starts aligned

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(tensors), desc=desc, unit="tensor")
        try:
            for name, (data, _, _) in tensors.items():
                qtype, shape, nbytes = plans[name]
                chunks = data() if callable(data) else data
                if isinstance(chunks, np.ndarray):
                    chunks = (chunks,)
                written = 0
                for chunk in chunks:
                    chunk = _check_chunk(name, chunk, qtype)
                    written += chunk.nbytes
                    if written > nbytes:
                        break
                    chunk.tofile(fout)
                if written != nbytes:
                    raise ValueError(f"tensor {name!r}: data gave {written} bytes, "
                                     f"{qtype.name} {shape} needs {nbytes}")
                writer.write_padding(fout, nbytes)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        writer.flush()
        os.fsync(fout.fileno())
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual new-file mode
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    if sys.platform == "win32":
        return 0
    mask = os.umask(0)
    os.umask(mask)
    return mask
