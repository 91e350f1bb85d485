"""quantref.gguf: reading real and tiny GGUFs, cross-checked with gguf-py; every malformed-file
error on purpose; fuzzed headers; write/read round trips."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import gguf as gguf_py
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantref import gguf
from quantref.gguf import GGUFError
from quantref.testing import write_tiny_llama

# --------------------------------------------------------------------------------------------
# A byte-level GGUF builder, independent of the code under test, so that each malformed file is
# made on purpose and the offset of the bad field is known.


def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, V.STRING, _s(value))


def kv_arr(key: str, item_type: int, count: int, items: bytes) -> bytes:
    return kv(key, V.ARRAY, struct.pack("<IQ", item_type, count) + items)


def tinfo(name: str, ne: list[int], qtype: int, offset: int) -> bytes:
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset)


class Blob:
    """A GGUF assembled from parts; ``kv_at[i]`` / ``ti_at[i]`` are the parts' byte offsets."""

    def __init__(self, kvs: list[bytes], tis: list[bytes], data: bytes = b"", *, magic=b"GGUF",
                 version=3, n_tensors=None, n_kv=None, alignment=32):
        head = magic + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors,
                                   len(kvs) if n_kv is None else n_kv)
        self.kv_at, self.ti_at = [], []
        out = bytearray(head)
        for part in kvs:
            self.kv_at.append(len(out))
            out += part
        for part in tis:
            self.ti_at.append(len(out))
            out += part
        out += bytes(-len(out) % alignment)
        self.data_offset = len(out)
        out += data
        self.bytes = bytes(out)


def valid_parts() -> tuple[list[bytes], list[bytes], bytes]:
    """A small valid file: 4 keys, an F32 [2, 32] and a Q8_0 [2, 64] tensor."""
    kvs = [
        kv_str("general.architecture", "llama"),
        kv_u32("llama.block_count", 5),
        kv_arr("tokenizer.ggml.token_type", V.INT32, 3, struct.pack("<3i", 1, 2, 3)),
        kv_str("general.name", "tiny"),
    ]
    tis = [tinfo("w", [32, 2], Q.F32, 0), tinfo("q", [64, 2], Q.Q8_0, 256)]
    data = np.arange(64, dtype=np.float32).tobytes() + bytes(256 - 256) + bytes(2 * 2 * 34)
    return kvs, tis, data


def write_bytes(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def expect_error(path: Path, field: str, offset: int, message: str, **read_options) -> GGUFError:
    with pytest.raises(GGUFError) as info:
        gguf.read(path, **read_options)
    e = info.value
    assert e.path == path and e.offset == offset and field in e.field and message in e.message, str(e)
    assert str(e).startswith(f"{path}: ") and f"{e.field} at offset {offset}" in str(e)
    return e


# --------------------------------------------------------------------------------------------
# Reading the real default model


@pytest.fixture(scope="module")
def default_gf(default_model_path):
    with gguf.read(default_model_path) as gf:
        yield gf


@pytest.fixture(scope="module")
def default_reader(default_model_path):
    return gguf_py.GGUFReader(default_model_path)  # ~2 s: it loops over 100k array items


@pytest.mark.model
def test_default_model_header(default_gf):
    gf = default_gf
    assert gf.version == 3 and gf.alignment == 32 and gf.data_offset % 32 == 0
    assert len(gf.tensors) == 272
    counts = collections.Counter(t.qtype for t in gf.tensors.values())
    assert counts == {Q.Q4_1: 210, Q.F32: 61, Q.Q8_0: 1}

    md, types = gf.metadata, gf.types
    assert md["general.architecture"] == "llama" and types["general.architecture"] == V.STRING
    assert md["llama.block_count"] == 30 and types["llama.block_count"] == V.UINT32
    assert md["llama.embedding_length"] == 576
    assert md["llama.attention.head_count"] == 9 and md["llama.attention.head_count_kv"] == 3
    assert md["llama.rope.freq_base"] == 100000.0 and types["llama.rope.freq_base"] == V.FLOAT32
    # Stored as float32: the Python float is the float32 value exactly, not 1e-5.
    assert md["llama.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-5))
    assert md["general.file_type"] == 3  # MOSTLY_Q4_1
    assert md["tokenizer.ggml.add_bos_token"] is False and types["tokenizer.ggml.add_bos_token"] == V.BOOL
    assert types["tokenizer.ggml.tokens"] == (V.ARRAY, V.STRING)
    assert types["tokenizer.ggml.token_type"] == (V.ARRAY, V.INT32)
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and len(md["tokenizer.ggml.merges"]) == 48900
    assert md["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert md["tokenizer.ggml.merges"][0] == "Ġ t"
    assert all(type(t) is int for t in md["tokenizer.ggml.token_type"][:10])

    embd = gf.tensors["token_embd.weight"]
    assert embd.shape == (49152, 576) and embd.qtype == Q.Q8_0 and embd.n_elements == 49152 * 576
    assert gf.raw("token_embd.weight").shape == (49152, 576 // 32 * 34)
    assert gf.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)  # [out, in]
    assert gf.tensors["blk.0.ffn_up.weight"].shape == (1536, 576)
    assert gf.tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert gf.raw("blk.0.attn_norm.weight").shape == (576 * 4,)
    assert gf.raw("blk.0.attn_norm.weight").flags.writeable is False  # a read-only map


@pytest.mark.model
def test_default_model_matches_gguf_py(default_gf, default_reader):
    gf, r = default_gf, default_reader
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(gf.metadata) == list(fields)  # same keys, in file order
    for key, field in fields.items():
        want_types = [gf.types[key]] if not isinstance(gf.types[key], tuple) else list(gf.types[key])
        assert field.types == want_types, key
        assert gf.metadata[key] == field.contents(), key
    assert gf.data_offset == r.data_offset
    assert list(gf.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        info = gf.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert info.qtype == t.tensor_type and info.nbytes == t.n_bytes
        assert info.n_elements == t.n_elements and info.offset == t.data_offset
        ours, theirs = gf.raw(t.name), t.data.view(np.uint8)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), t.name


@pytest.mark.model
def test_default_model_tensor_dequantizes(default_gf):
    # tensor() = quantref.quants.dequantize of raw(), reshaped: compared with gguf.quants.
    for name in ("token_embd.weight", "blk.3.attn_q.weight", "blk.3.ffn_norm.weight"):
        info = default_gf.tensors[name]
        got = default_gf.tensor(name)
        assert got.dtype == np.float32 and got.shape == info.shape
        # gguf-py is slow on the 28M-value embedding: 1024 rows of 2-D tensors suffice.
        rows = slice(0, 1024) if len(info.shape) > 1 else slice(None)
        want = gguf_py.quants.dequantize(default_gf.raw(name)[rows], info.qtype)
        np.testing.assert_array_equal(got[rows], want)  # both compute the same float32 expression


@pytest.mark.model
def test_default_model_metadata_round_trip(default_gf, tmp_path):
    # Big arrays (49k strings, 49k int32) and every type of the real file survive write/read.
    names = ["blk.0.attn_norm.weight", "blk.0.attn_q.weight", "token_embd.weight"]
    tensors = {n: (default_gf.raw(n), default_gf.tensors[n].qtype, default_gf.tensors[n].shape) for n in names}
    out = gguf.write(tmp_path / "rt.gguf", default_gf.metadata, default_gf.types, tensors)
    with gguf.read(out) as back:
        assert back.metadata == default_gf.metadata and back.types == default_gf.types
        assert list(back.metadata) == list(default_gf.metadata)
        for n in names:
            assert back.tensors[n].shape == default_gf.tensors[n].shape
            assert np.array_equal(back.raw(n), default_gf.raw(n))


# --------------------------------------------------------------------------------------------
# Tiny files: layout, the builder, close()


def test_builder_file_is_valid(tmp_path):
    kvs, tis, data = valid_parts()
    blob = Blob(kvs, tis, data)
    path = write_bytes(tmp_path, blob.bytes)
    with gguf.read(path) as gf:
        assert gf.metadata == {"general.architecture": "llama", "llama.block_count": 5,
                               "tokenizer.ggml.token_type": [1, 2, 3], "general.name": "tiny"}
        assert gf.data_offset == blob.data_offset
        assert gf.tensors["w"] == gguf.TensorInfo("w", (2, 32), Q.F32, blob.data_offset, 256, 64)
        assert gf.tensors["q"].offset == blob.data_offset + 256 and gf.raw("q").shape == (2, 68)
        np.testing.assert_array_equal(gf.raw("w").view(np.float32).reshape(-1), np.arange(64))
    r = gguf_py.GGUFReader(path)  # the builder's file is also valid for gguf-py
    assert [t.name for t in r.tensors] == ["w", "q"]


def test_close_and_context_manager(tmp_path):
    path = write_bytes(tmp_path, Blob(*valid_parts()).bytes)
    gf = gguf.read(path)
    view = gf.raw("w")
    gf.close()
    assert gf.closed
    with pytest.raises(ValueError, match="closed"):
        gf.raw("w")
    assert view.view(np.float32).reshape(-1)[1] == 1.0  # outstanding views keep the map alive
    with gguf.read(path) as gf2:
        with pytest.raises(KeyError, match="no tensor named 'nope'"):
            gf2.raw("nope")
    assert gf2.closed


def test_version_2_is_read(tmp_path):
    path = write_bytes(tmp_path, Blob(*valid_parts(), version=2).bytes)
    with gguf.read(path) as gf:
        assert gf.version == 2 and list(gf.tensors) == ["w", "q"]


def test_tiny_llama_matches_gguf_py(tmp_path):
    path = write_tiny_llama(tmp_path / "t.gguf", qtype="q4_1", embedding_qtype="q8_0", rope_freqs=True)
    r = gguf_py.GGUFReader(path)
    with gguf.read(path) as gf:
        for key, field in r.fields.items():
            if not key.startswith("GGUF."):
                assert gf.metadata[key] == field.contents(), key
        for t in r.tensors:
            assert gf.tensors[t.name].shape == tuple(int(d) for d in reversed(t.shape))
            assert np.array_equal(gf.raw(t.name), t.data.view(np.uint8))


# --------------------------------------------------------------------------------------------
# Every malformed-file error, on purpose


@pytest.mark.parametrize("size", [0, 3, 10, 23])
def test_truncated_header(tmp_path, size):
    path = write_bytes(tmp_path, Blob(*valid_parts()).bytes[:size])
    expect_error(path, "header", 0, f"needs 24 bytes but only {size} remain")


def test_counts_that_cannot_fit(tmp_path):
    path = write_bytes(tmp_path, Blob(*valid_parts(), n_tensors=2**63).bytes)
    expect_error(path, "header tensor_count/kv_count", 8, "cannot fit")
    path = write_bytes(tmp_path, Blob(*valid_parts(), n_kv=10**6).bytes)
    expect_error(path, "header tensor_count/kv_count", 8, "cannot fit")


def test_truncated_in_metadata_and_tensor_infos(tmp_path):
    blob = Blob(*valid_parts())
    cut = blob.kv_at[3] + 8 + 4  # inside general.name's key
    expect_error(write_bytes(tmp_path, blob.bytes[:cut]), "key #3", blob.kv_at[3], "string length 12 runs past")
    cut = blob.ti_at[1] + 8 + 1 + 4 + 8  # after n_dims and one of two dims of tensor 'q'
    expect_error(write_bytes(tmp_path, blob.bytes[:cut]), "tensor 'q' dims", cut - 8, "needs 16 bytes")


def test_truncated_data(tmp_path):
    blob = Blob(*valid_parts())
    path = write_bytes(tmp_path, blob.bytes[:-1])
    e = expect_error(path, "tensor 'q' data", blob.ti_at[1] + 8 + 1 + 4 + 16 + 4, "runs past the end of the file")
    assert f"[{blob.data_offset + 256}, {blob.data_offset + 256 + 136})" in e.message


def test_tensor_data_past_end(tmp_path):
    # strict, an offset other than 0 for the first tensor breaks llama.cpp's layout rule first
    kvs, tis, data = valid_parts()
    tis[0] = tinfo("w", [32, 2], Q.F32, 1 << 20)
    blob = Blob(kvs, tis, data)
    expect_error(write_bytes(tmp_path, blob.bytes), "tensor 'w' data", blob.ti_at[0] + 8 + 1 + 4 + 16 + 4,
                 "runs past the end of the file", strict=False)


@pytest.mark.parametrize("ne, message", [
    ([2**32, 2**32], "product of dimensions [4294967296, 4294967296] overflows int64"),
    ([32, 2**31, 2**31, 4], "overflows int64"),
    ([2**63], "dimension 9223372036854775808 does not fit in int64"),
    ([2**20, 2**20], "exceeds the file size"),
])
def test_bad_dimensions(tmp_path, ne, message):
    kvs, tis, data = valid_parts()
    tis[0] = tinfo("blk.0.attn_q.weight", ne, Q.F32, 0)
    blob = Blob(kvs, tis, data)
    dims_at = blob.ti_at[0] + 8 + len("blk.0.attn_q.weight") + 4
    expect_error(write_bytes(tmp_path, blob.bytes), "tensor 'blk.0.attn_q.weight' dims", dims_at, message)


@pytest.mark.parametrize("n_dims", [0, 5, 2**32 - 1])
def test_n_dims_out_of_range(tmp_path, n_dims):
    kvs, tis, data = valid_parts()
    tis[0] = _s("w") + struct.pack("<I", n_dims) + struct.pack("<QQIQ", 32, 2, Q.F32, 0)
    blob = Blob(kvs, tis, data)
    expect_error(write_bytes(tmp_path, blob.bytes), "tensor 'w' n_dims", blob.ti_at[0] + 9,
                 f"n_dims {n_dims} is out of range 1..4")


@pytest.mark.parametrize("code", [4, 5, 31, 1000])  # 4, 5: removed Q4_2 / Q4_3
def test_unknown_tensor_type(tmp_path, code):
    kvs, tis, data = valid_parts()
    tis[1] = tinfo("q", [64, 2], code, 256)
    blob = Blob(kvs, tis, data)
    expect_error(write_bytes(tmp_path, blob.bytes), "tensor 'q' type", blob.ti_at[1] + 9 + 4 + 16,
                 f"unknown tensor type {code}")


def test_row_not_multiple_of_block(tmp_path):
    kvs, tis, data = valid_parts()
    tis[1] = tinfo("q", [48, 2], Q.Q8_0, 256)
    blob = Blob(kvs, tis, data)
    expect_error(write_bytes(tmp_path, blob.bytes), "tensor 'q' dims", blob.ti_at[1] + 9 + 4,
                 "row length 48 is not a multiple of the Q8_0 block size 32")


@pytest.mark.parametrize("n", [2**30, 2**40])  # 2**40: over llama.cpp's limit, so not strict
def test_string_length_past_end(tmp_path, n):
    kvs, tis, data = valid_parts()
    kvs[3] = kv("general.name", V.STRING, struct.pack("<Q", n) + b"tiny")
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[3] + 8 + len("general.name") + 4
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'general.name' value", at,
                 f"string length {n} runs past the end of the file", strict=n <= gguf.MAX_STRING_LENGTH)


@pytest.mark.parametrize("n", [1000, 2**63])
def test_tensor_name_length_past_end(tmp_path, n):
    kvs, tis, data = valid_parts()
    tis[0] = struct.pack("<Q", n) + tis[0][8:]
    blob = Blob(kvs, tis, data)
    expect_error(write_bytes(tmp_path, blob.bytes), "tensor #0 name", blob.ti_at[0], "runs past the end",
                 strict=n <= gguf.MAX_STRING_LENGTH)


@pytest.mark.parametrize("code", [13, 99, 2**32 - 1])
def test_unknown_value_type(tmp_path, code):
    kvs, tis, data = valid_parts()
    kvs[1] = kv("llama.block_count", code, struct.pack("<I", 5))
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[1] + 8 + len("llama.block_count")
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'llama.block_count' value type", at,
                 f"unknown value type {code}")


def test_unknown_array_item_type(tmp_path):
    kvs, tis, data = valid_parts()
    kvs[2] = kv_arr("tokenizer.ggml.token_type", 42, 3, struct.pack("<3i", 1, 2, 3))
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[2] + 8 + len("tokenizer.ggml.token_type") + 4
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'tokenizer.ggml.token_type' value item type", at,
                 "unknown value type 42")


@pytest.mark.parametrize("item_type, count", [(V.INT32, 2**62), (V.INT32, 1000), (V.STRING, 2**64 - 1),
                                               (V.ARRAY, 2**40), (V.UINT8, 10**6)])
def test_array_count_past_end(tmp_path, item_type, count):
    kvs, tis, data = valid_parts()
    kvs[2] = kv_arr("tokenizer.ggml.token_type", item_type, count, struct.pack("<3i", 1, 2, 3))
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[2] + 8 + len("tokenizer.ggml.token_type") + 4 + 4
    # over llama.cpp's 2**30 items, or arrays of arrays: refused earlier unless strict=False
    strict = count <= gguf.MAX_ARRAY_ELEMENTS and item_type != V.ARRAY
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'tokenizer.ggml.token_type' value count", at,
                 f"array of {count} {V(item_type).name} items cannot fit", strict=strict)


def test_string_array_item_past_end(tmp_path):
    kvs, tis, data = valid_parts()
    items = _s("ab") + struct.pack("<Q", 2**33) + b"cd"
    kvs[2] = kv_arr("tokenizer.ggml.tokens", V.STRING, 2, items)
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[2] + 8 + len("tokenizer.ggml.tokens") + 4 + 12 + 10
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'tokenizer.ggml.tokens' value item 1", at,
                 f"string length {2**33} runs past", strict=False)  # 2**33 > llama.cpp's limit


@pytest.mark.parametrize("value", [0, 3, 48, 2**32 - 1])
def test_bad_alignment_value(tmp_path, value):
    kvs, tis, data = valid_parts()
    kvs.insert(1, kv_u32("general.alignment", value))
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[1] + 8 + len("general.alignment") + 4
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'general.alignment' value", at,
                 f"alignment {value} is not a power of two")


def test_alignment_of_wrong_type(tmp_path):
    kvs, tis, data = valid_parts()
    kvs.insert(1, kv("general.alignment", V.UINT64, struct.pack("<Q", 64)))
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[1] + 8 + len("general.alignment") + 4
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'general.alignment' value", at, "must be a UINT32")


def test_custom_alignment_is_used(tmp_path):
    kvs, tis, data = valid_parts()
    kvs.insert(1, kv_u32("general.alignment", 64))
    tis[1] = tinfo("q", [64, 2], Q.Q8_0, 256)
    blob = Blob(kvs, tis, data, alignment=64)
    with gguf.read(write_bytes(tmp_path, blob.bytes)) as gf:
        assert gf.alignment == 64 and gf.data_offset == blob.data_offset and gf.data_offset % 64 == 0


def test_invalid_utf8_and_bad_bool(tmp_path):
    kvs, tis, data = valid_parts()
    kvs[3] = kv("general.name", V.STRING, _s(b"ti\xffny"))
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[3] + 8 + len("general.name") + 4 + 8 + 2
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'general.name' value", at, "not valid UTF-8")

    kvs, tis, data = valid_parts()
    kvs[3] = kv("tokenizer.ggml.add_bos_token", V.BOOL, b"\x02")
    blob = Blob(kvs, tis, data)
    at = blob.kv_at[3] + 8 + len("tokenizer.ggml.add_bos_token") + 4
    expect_error(write_bytes(tmp_path, blob.bytes), "key 'tokenizer.ggml.add_bos_token' value", at,
                 "bool value 2 is not 0 or 1")


def test_nested_arrays_and_depth_limit(tmp_path):
    """Arrays of arrays: refused by llama.cpp (and by default), read as gguf-py reads them with
    strict=False, to a bounded depth."""
    inner = struct.pack("<IQ", V.UINT8, 2) + b"\x01\x02"
    kvs, tis, data = valid_parts()
    kvs[2] = kv_arr("nested", V.ARRAY, 2, inner + struct.pack("<IQ", V.STRING, 1) + _s("x"))
    path = write_bytes(tmp_path, Blob(kvs, tis, data).bytes)
    with pytest.raises(GGUFError, match="an array of arrays"):
        gguf.read(path)
    with gguf.read(path, strict=False) as gf:
        assert gf.metadata["nested"] == [[1, 2], ["x"]]
        assert gf.types["nested"] == (V.ARRAY, [(V.ARRAY, V.UINT8), (V.ARRAY, V.STRING)])

    deep = struct.pack("<IQ", V.UINT8, 0)
    for _ in range(gguf.MAX_ARRAY_DEPTH + 2):
        deep = struct.pack("<IQ", V.ARRAY, 1) + deep
    kvs[2] = kv("deep", V.ARRAY, deep)
    with pytest.raises(GGUFError, match="nested deeper than"):
        gguf.read(write_bytes(tmp_path, Blob(kvs, tis, data).bytes), strict=False)


# --------------------------------------------------------------------------------------------
# llama.cpp's GGUF loader, rule by rule (docs/gguf_validation.md). Each case is a file that
# breaks one rule only, and read() must refuse it naming the file, field and offset. The same
# files were given to llama.cpp itself (gguf_init_from_file and llama_model_loader's bounds
# check, tests/data/gguf_rules/llama_cpp_gguf_check.cpp); its verdicts are
# tests/data/gguf_rules/llama_cpp_verdicts.json (made by tests/data/gguf_rules/make_golden.py).

_HOLE = 2**30 + 1  # zero bytes (a sparse hole) spanned by a string or array over a 2**30 limit


@dataclasses.dataclass(frozen=True)
class Case:
    """A file (``build() -> (parts, offset of the bad field)``; a part is bytes, or an int: that
    many zero bytes, written as a sparse hole) and the error read() must give."""

    where: str  # the check in llama.cpp that refuses it ("" if llama.cpp accepts the file)
    field: str
    message: str
    build: Callable[[], tuple[list, int]]


LLAMA_CPP_RULES: dict[str, Case] = {}
STRICTER_THAN_LLAMA_CPP: dict[str, Case] = {}  # files llama.cpp loads and quantref refuses


def _case(table: dict, name: str, where: str, field: str, message: str):
    def register(build):
        table[name] = Case(where, field, message, build)
        return build
    return register


def write_parts(path: Path, parts: list) -> Path:
    with open(path, "wb") as f:
        for part in parts:
            if isinstance(part, int):
                f.seek(part, os.SEEK_CUR)  # a hole: reads as zeros, takes no disk space
            else:
                f.write(part)
        f.truncate()
    return path


def parts_digest(parts: list) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(b"hole %d;" % part if isinstance(part, int) else part)
    return h.hexdigest()


def _blob(kvs=None, tis=None, data=None, **kw) -> Blob:
    vkvs, vtis, vdata = valid_parts()
    return Blob(vkvs if kvs is None else kvs, vtis if tis is None else tis,
                vdata if data is None else data, **kw)


def _with_kv(entry: bytes, index: int = 4) -> tuple[Blob, int]:
    """The valid file with ``entry`` as KV ``index``; returns it and the entry's offset."""
    kvs, tis, data = valid_parts()
    kvs.insert(index, entry)
    blob = Blob(kvs, tis, data)
    return blob, blob.kv_at[index]


def _with_hole(head: bytes, tail: bytes = b"") -> tuple[list, int]:
    """The valid file plus a last KV that spans a hole: ``head`` (up to the long string or
    array's items), ``_HOLE`` zero bytes, ``tail``. Returns (parts, offset of ``head``)."""
    kvs, tis, data = valid_parts()
    start = b"GGUF" + struct.pack("<IQQ", 3, len(tis), len(kvs) + 1) + b"".join(kvs)
    rest = tail + b"".join(tis)
    rest += bytes(-(len(start) + len(head) + _HOLE + len(rest)) % 32) + data
    return [start + head, _HOLE, rest], len(start)


def _ti(blob: Blob, i: int, part: str, name_len: int = 1, n_dims: int = 2) -> int:
    """Offset of a part of tensor info ``i`` in ``blob``."""
    dims = blob.ti_at[i] + 8 + name_len + 4
    return {"name": blob.ti_at[i], "n_dims": dims - 4, "dims": dims, "type": dims + 8 * n_dims,
            "offset": dims + 8 * n_dims + 4}[part]


W = tinfo("w", [32, 2], Q.F32, 0)  # valid_parts' first tensor: 256 bytes at 0
W_DATA = np.arange(64, dtype=np.float32).tobytes()
Q_DATA = bytes(2 * 2 * 34)  # valid_parts' second tensor: Q8_0 [2, 64], 136 bytes


@_case(LLAMA_CPP_RULES, "file shorter than the header", "gguf.cpp: failed to read magic / header",
       "header", "needs 24 bytes")
def _():
    return [_blob().bytes[:3]], 0


@_case(LLAMA_CPP_RULES, "magic", "gguf.cpp: invalid magic characters", "header magic",
       "bad magic b'GGML'")
def _():
    return [_blob(magic=b"GGML").bytes], 0


@_case(LLAMA_CPP_RULES, "version 0", "gguf.cpp: bad GGUF version", "header version",
       "version 0 is invalid")
def _():
    return [_blob(version=0).bytes], 4


@_case(LLAMA_CPP_RULES, "version of the other byte order",
       "gguf.cpp: (version & 0x0000FFFF) == 0 (endianness)", "header version", "big-endian")
def _():
    return [_blob(version=3 << 24).bytes], 4


@_case(LLAMA_CPP_RULES, "version 1", "gguf.cpp: GGUFv1 is no longer supported", "header version",
       "GGUFv1 is no longer supported")
def _():
    return [_blob(version=1).bytes], 4


@_case(LLAMA_CPP_RULES, "version over 3", "gguf.cpp: version > GGUF_VERSION", "header version",
       "newer than 3")
def _():
    return [_blob(version=4).bytes], 4


@_case(LLAMA_CPP_RULES, "tensor count negative as int64",
       "gguf.cpp: number of tensors must be in [0, SIZE_MAX/sizeof(gguf_tensor_info)]",
       "header tensor_count/kv_count", "cannot fit")
def _():
    return [_blob(n_tensors=2**63).bytes], 8


@_case(LLAMA_CPP_RULES, "key count negative as int64",
       "gguf.cpp: number of key value pairs must be in [0, SIZE_MAX/sizeof(gguf_kv)]",
       "header tensor_count/kv_count", "cannot fit")
def _():
    return [_blob(n_kv=2**63).bytes], 8


@_case(LLAMA_CPP_RULES, "key over GGUF_MAX_STRING_LENGTH",
       "gguf.cpp: gguf_reader::read(std::string): string length exceeds maximum", "key #4",
       "string length 1073741825 exceeds llama.cpp's maximum 1073741824")
def _():
    # a key of 2**30 + 1 NUL bytes (valid UTF-8), then a UINT32 value
    return _with_hole(struct.pack("<Q", _HOLE), struct.pack("<II", V.UINT32, 7))


@_case(LLAMA_CPP_RULES, "string value over GGUF_MAX_STRING_LENGTH",
       "gguf.cpp: gguf_reader::read(std::string): string length exceeds maximum",
       "key 'a.long' value", "string length 1073741825 exceeds llama.cpp's maximum")
def _():
    parts, at = _with_hole(_s("a.long") + struct.pack("<IQ", V.STRING, _HOLE))
    return parts, at + len(_s("a.long")) + 4


@_case(LLAMA_CPP_RULES, "string array item over GGUF_MAX_STRING_LENGTH",
       "gguf.cpp: gguf_reader::read(std::string): string length exceeds maximum",
       "key 'a.strs' value item 1", "string length 1073741825 exceeds llama.cpp's maximum")
def _():
    head = _s("a.strs") + struct.pack("<IIQ", V.ARRAY, V.STRING, 2) + _s("ok") + struct.pack("<Q", _HOLE)
    parts, at = _with_hole(head)
    return parts, at + len(head) - 8


@_case(LLAMA_CPP_RULES, "string past the end of the file",
       "gguf.cpp: string length exceeds remaining file size", "key 'general.name' value",
       "string length 1000000 runs past the end")
def _():
    kvs, tis, data = valid_parts()
    kvs[3] = kv("general.name", V.STRING, struct.pack("<Q", 10**6) + b"tiny")
    blob = Blob(kvs, tis, data)
    return [blob.bytes], blob.kv_at[3] + 8 + len("general.name") + 4


@_case(LLAMA_CPP_RULES, "empty key", "gguf.cpp: key is empty", "key #4", "empty key")
def _():
    blob, at = _with_kv(kv_u32("", 1))
    return [blob.bytes], at


@_case(LLAMA_CPP_RULES, "duplicate key", "gguf.cpp: duplicate key", "key 'llama.block_count'",
       "duplicate key")
def _():
    blob, at = _with_kv(kv_u32("llama.block_count", 6))
    return [blob.bytes], at


@_case(LLAMA_CPP_RULES, "unknown value type", "gguf.cpp: key has invalid GGUF type",
       "key 'a.x' value type", "unknown value type 13")
def _():
    blob, at = _with_kv(kv("a.x", 13, struct.pack("<I", 5)))
    return [blob.bytes], at + 8 + 3


@_case(LLAMA_CPP_RULES, "unknown array item type", "gguf.cpp: key has invalid GGUF type",
       "key 'a.x' value item type", "unknown value type 13")
def _():
    blob, at = _with_kv(kv_arr("a.x", 13, 1, b"\0"))
    return [blob.bytes], at + 8 + 3 + 4


@_case(LLAMA_CPP_RULES, "array of arrays", "gguf.cpp: key has invalid GGUF type (ARRAY items)",
       "key 'a.x' value item type", "an array of arrays")
def _():
    blob, at = _with_kv(kv_arr("a.x", V.ARRAY, 1, struct.pack("<IQ", V.UINT8, 1) + b"\1"))
    return [blob.bytes], at + 8 + 3 + 4


@_case(LLAMA_CPP_RULES, "array over GGUF_MAX_ARRAY_ELEMENTS",
       "gguf.cpp: gguf_reader::read(std::vector): n > GGUF_MAX_ARRAY_ELEMENTS",
       "key 'a.bytes' value count", "array of 1073741825 items exceeds llama.cpp's maximum")
def _():
    parts, at = _with_hole(_s("a.bytes") + struct.pack("<IIQ", V.ARRAY, V.UINT8, _HOLE))
    return parts, at + len(_s("a.bytes")) + 4 + 4


@_case(LLAMA_CPP_RULES, "array past the end of the file",
       "gguf.cpp: gguf_reader::read(std::vector): nbytes_remain < n * sizeof(T)",
       "key 'a.x' value count", "cannot fit")
def _():
    blob, at = _with_kv(kv_arr("a.x", V.INT32, 10**6, b"\0" * 8))
    return [blob.bytes], at + 8 + 3 + 4 + 4


@_case(LLAMA_CPP_RULES, "value past the end of the file", "gguf.cpp: failed to read key-value pairs",
       "key 'general.name' value", "needs 8 bytes")
def _():
    blob = _blob()
    at = blob.kv_at[3] + 8 + len("general.name") + 4
    return [blob.bytes[: at + 5]], at


@_case(LLAMA_CPP_RULES, "general.alignment not UINT32",
       "gguf.cpp: key general.alignment must be of type u32", "key 'general.alignment' value",
       "must be a UINT32")
def _():
    blob, at = _with_kv(kv("general.alignment", V.UINT64, struct.pack("<Q", 32)), 1)
    return [blob.bytes], at + 8 + len("general.alignment") + 4


@_case(LLAMA_CPP_RULES, "alignment 0", "gguf.cpp: alignment is not a power of 2",
       "key 'general.alignment' value", "alignment 0 is not a power of two")
def _():
    blob, at = _with_kv(kv_u32("general.alignment", 0), 1)
    return [blob.bytes], at + 8 + len("general.alignment") + 4


@_case(LLAMA_CPP_RULES, "alignment not a power of 2", "gguf.cpp: alignment is not a power of 2",
       "key 'general.alignment' value", "alignment 48 is not a power of two")
def _():
    blob, at = _with_kv(kv_u32("general.alignment", 48), 1)
    return [blob.bytes], at + 8 + len("general.alignment") + 4


@_case(LLAMA_CPP_RULES, "tensor name of GGML_MAX_NAME bytes or more",
       "gguf.cpp: tensor name is too long", f"tensor '{'é' * 32}' name", "name of 64 bytes")
def _():
    # 32 two-byte characters: the limit is on bytes, not characters
    blob = _blob(tis=[tinfo("é" * 32, [32, 2], Q.F32, 0), tinfo("q", [64, 2], Q.Q8_0, 256)])
    return [blob.bytes], blob.ti_at[0]


@_case(LLAMA_CPP_RULES, "duplicate tensor name", "gguf.cpp: duplicate tensor name",
       "tensor 'w' name", "duplicate tensor name")
def _():
    blob = _blob(tis=[W, tinfo("w", [64, 2], Q.Q8_0, 256)])
    return [blob.bytes], blob.ti_at[1]


@_case(LLAMA_CPP_RULES, "n_dims over GGML_MAX_DIMS",
       "gguf.cpp: tensor has invalid number of dimensions", "tensor 'q' n_dims",
       "n_dims 5 is out of range")
def _():
    blob = _blob(tis=[W, tinfo("q", [64, 2, 1, 1, 1], Q.Q8_0, 256)])
    return [blob.bytes], _ti(blob, 1, "n_dims")


@_case(LLAMA_CPP_RULES, "dimension negative as int64",
       "gguf.cpp: dimension has invalid number of elements", "tensor 'q' dims",
       "does not fit in int64")
def _():
    blob = _blob(tis=[W, tinfo("q", [64, 2**64 - 2], Q.Q8_0, 256)])
    return [blob.bytes], _ti(blob, 1, "dims")


@_case(LLAMA_CPP_RULES, "element count over INT64_MAX",
       "gguf.cpp: incorrect shape for a tensor may cause overflow errors", "tensor 'w' dims",
       "overflows int64")
def _():
    # [2**62, 2**62, 0] has no elements, but llama.cpp's running product overflows at step 2
    blob = _blob(tis=[tinfo("w", [2**62, 2**62, 0], Q.F32, 0), tinfo("q", [64, 2], Q.Q8_0, 0)],
                 data=Q_DATA)
    return [blob.bytes], _ti(blob, 0, "dims")


@_case(LLAMA_CPP_RULES, "tensor type out of range", "gguf.cpp: tensor has invalid ggml type",
       "tensor 'q' type", "unknown tensor type 43")
def _():
    blob = _blob(tis=[W, tinfo("q", [64, 2], 43, 256)])
    return [blob.bytes], _ti(blob, 1, "type")


@_case(LLAMA_CPP_RULES, "removed tensor type (Q4_2)",
       "gguf.cpp: not a multiple of block size (0)", "tensor 'q' type", "unknown tensor type 4")
def _():
    blob = _blob(tis=[W, tinfo("q", [64, 2], 4, 256)])
    return [blob.bytes], _ti(blob, 1, "type")


@_case(LLAMA_CPP_RULES, "row not a multiple of the block size",
       "gguf.cpp: elements per row not a multiple of block size", "tensor 'q' dims",
       "row length 48 is not a multiple of the Q8_0 block size 32")
def _():
    blob = _blob(tis=[W, tinfo("q", [48, 2], Q.Q8_0, 256)], data=W_DATA + bytes(2 * 34 + 24))
    return [blob.bytes], _ti(blob, 1, "dims")


@_case(LLAMA_CPP_RULES, "tensor info past the end of the file",
       "gguf.cpp: failed to read tensor info", "tensor 'q' dims", "needs 16 bytes")
def _():
    blob = _blob()
    return [blob.bytes[: _ti(blob, 1, "dims") + 8]], _ti(blob, 1, "dims")


@_case(LLAMA_CPP_RULES, "data section past the end of the file",
       "gguf.cpp: failed to seek to beginning of data section", "tensor data",
       "past the end of the file")
def _():
    # one tensor of no elements; the file ends right after the (unpadded) tensor table
    blob = _blob(tis=[tinfo("e", [0], Q.F32, 0)], data=b"")
    end = _ti(blob, 0, "offset", n_dims=1) + 8
    assert end % 32
    return [blob.bytes[:end]], end


@_case(LLAMA_CPP_RULES, "two tensors at offset 0 (overlapping)",
       "gguf.cpp: tensor has offset X, expected Y", "tensor 'q' offset",
       "data offset 0, expected 256")
def _():
    blob = _blob(tis=[W, tinfo("q", [64, 2], Q.Q8_0, 0)])
    return [blob.bytes], _ti(blob, 1, "offset")


@_case(LLAMA_CPP_RULES, "a gap between tensors", "gguf.cpp: tensor has offset X, expected Y",
       "tensor 'q' offset", "data offset 288, expected 256")
def _():
    blob = _blob(tis=[W, tinfo("q", [64, 2], Q.Q8_0, 288)], data=W_DATA + bytes(32) + Q_DATA)
    return [blob.bytes], _ti(blob, 1, "offset")


@_case(LLAMA_CPP_RULES, "tensors out of table order", "gguf.cpp: tensor has offset X, expected Y",
       "tensor 'q' offset", "data offset 256, expected 0")
def _():
    blob = _blob(tis=[tinfo("q", [64, 2], Q.Q8_0, 256), W], data=W_DATA + Q_DATA)
    return [blob.bytes], _ti(blob, 0, "offset")


@_case(LLAMA_CPP_RULES, "offset not a multiple of the alignment",
       "gguf.cpp: tensor has offset X, expected Y", "tensor 'q' offset",
       "data offset 264, expected 256")
def _():
    blob = _blob(tis=[W, tinfo("q", [64, 2], Q.Q8_0, 264)], data=W_DATA + bytes(8) + Q_DATA)
    return [blob.bytes], _ti(blob, 1, "offset")


@_case(LLAMA_CPP_RULES, "tensor data past the end of the file",
       "llama-model-loader.h: tensor data is not within the file bounds", "tensor 'q' data",
       "runs past the end of the file")
def _():
    blob = _blob()
    return [blob.bytes[:-1]], _ti(blob, 1, "offset")


@_case(STRICTER_THAN_LLAMA_CPP, "string not UTF-8", "", "key 'a.name' value",
       "not valid UTF-8")
def _():
    blob, at = _with_kv(kv("a.name", V.STRING, _s(b"ti\xffny")))
    return [blob.bytes], at + 8 + len("a.name") + 4 + 8 + 2


@_case(STRICTER_THAN_LLAMA_CPP, "bool other than 0 or 1", "", "key 'a.flag' value",
       "bool value 2 is not 0 or 1")
def _():
    blob, at = _with_kv(kv("a.flag", V.BOOL, b"\x02"))
    return [blob.bytes], at + 8 + len("a.flag") + 4


@_case(STRICTER_THAN_LLAMA_CPP, "tensor of 0 dimensions", "", "tensor 'w' n_dims",
       "n_dims 0 is out of range 1..4")
def _():
    # llama.cpp reads a 0-dimension tensor as one element [1, 1, 1, 1]
    scalar = _s("w") + struct.pack("<IIQ", 0, Q.F32, 0)
    blob = _blob(tis=[scalar, tinfo("q", [64, 2], Q.Q8_0, 32)],
                 data=struct.pack("<f", 1.5) + bytes(28) + Q_DATA)
    return [blob.bytes], blob.ti_at[0] + 8 + 1


def _golden_verdicts() -> dict:
    path = Path(__file__).parent / "data" / "gguf_rules" / "llama_cpp_verdicts.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", list(LLAMA_CPP_RULES))
def test_llama_cpp_rule(tmp_path, name):
    case = LLAMA_CPP_RULES[name]
    parts, at = case.build()
    expect_error(write_parts(tmp_path / "rule.gguf", parts), case.field, at, case.message)


@pytest.mark.parametrize("name", list(STRICTER_THAN_LLAMA_CPP))
def test_stricter_than_llama_cpp(tmp_path, name):
    case = STRICTER_THAN_LLAMA_CPP[name]
    parts, at = case.build()
    path = write_parts(tmp_path / "rule.gguf", parts)
    expect_error(path, case.field, at, case.message)
    expect_error(path, case.field, at, case.message, strict=False)  # gguf-py's rules, too


def test_the_cases_get_llama_cpps_verdicts():
    """Every case file is the one llama.cpp judged (same bytes), llama.cpp refuses each rule's
    file and loads each stricter-than-llama.cpp file and the valid file."""
    golden = _golden_verdicts()
    cases = {**LLAMA_CPP_RULES, **STRICTER_THAN_LLAMA_CPP, **GOLDEN_VALID}
    assert set(golden) == set(cases)
    for name, case in cases.items():
        parts, _ = case.build()
        assert golden[name]["sha256"] == parts_digest(parts), name
        want = "refused" if name in LLAMA_CPP_RULES else "accepted"
        assert golden[name]["verdict"] == want, (name, golden[name])


GOLDEN_VALID = {
    "valid": Case("", "", "", lambda: ([_blob().bytes], 0)),
    "tensor name of 63 bytes": Case("", "", "", lambda: ([_blob(tis=[
        tinfo("n" * 63, [32, 2], Q.F32, 0), tinfo("q", [64, 2], Q.Q8_0, 256)]).bytes], 0)),
}


@pytest.mark.parametrize("name", list(GOLDEN_VALID))
def test_files_llama_cpp_loads_are_read(tmp_path, name):
    parts, _ = GOLDEN_VALID[name].build()
    with gguf.read(write_parts(tmp_path / "ok.gguf", parts)) as gf:
        assert len(gf.tensors) == 2


# the rules llama.cpp adds to gguf-py's: with strict=False these files are read
_LLAMA_CPP_ONLY = ["empty key", "array of arrays", "tensor name of GGML_MAX_NAME bytes or more",
                   "two tensors at offset 0 (overlapping)", "a gap between tensors",
                   "tensors out of table order"]


@pytest.mark.parametrize("name", _LLAMA_CPP_ONLY)
def test_not_strict_reads_what_gguf_py_reads(tmp_path, name):
    parts, _ = LLAMA_CPP_RULES[name].build()
    path = write_parts(tmp_path / "rule.gguf", parts)
    with gguf.read(path, strict=False) as gf:
        r = gguf_py.GGUFReader(path)
        assert [t.name for t in r.tensors] == list(gf.tensors)
        for t in r.tensors:
            assert gf.raw(t.name).tobytes() == t.data.tobytes()


def test_issue_overlap_case_is_refused_and_was_readable(tmp_path):
    """Issue 10's example: two tensors whose data overlap, both at offset 0."""
    parts, at = LLAMA_CPP_RULES["two tensors at offset 0 (overlapping)"].build()
    path = write_parts(tmp_path / "overlap.gguf", parts)
    expect_error(path, "tensor 'q' offset", at, "data offset 0, expected 256")
    with gguf.read(path, strict=False) as gf:
        assert gf.tensors["q"].offset == gf.tensors["w"].offset  # what strict=False allows


@pytest.mark.model
def test_real_models_pass_every_rule(default_model_path, gemma_model_path):
    for p in (default_model_path, gemma_model_path):
        with gguf.read(p) as gf:
            assert gf.tensors


def test_error_is_a_value_error_and_pickles(tmp_path):
    import pickle

    path = write_bytes(tmp_path, b"GGML" + bytes(40))
    with pytest.raises(ValueError) as info:
        gguf.read(path)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.offset == 0


# --------------------------------------------------------------------------------------------
# Fuzzing real headers: nothing but GGUFError escapes, nothing hangs, bounded allocation

_NASTY_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _structure_offsets(reader: gguf_py.GGUFReader, size: int) -> list[int]:
    """Byte offsets near each key's / tensor info's start, where lengths, types and counts live."""
    starts = [f.offset for f in reader.fields.values()] + [t.field.offset for t in reader.tensors]
    return sorted({o for s in starts for o in range(s, s + 48) if o < size})


def _mutations(size: int, hot: list[int]):
    position = st.one_of(st.sampled_from(hot), st.integers(0, size - 1))
    one_byte = st.tuples(position, st.integers(0, 255).map(lambda b: bytes([b])))
    u64 = st.tuples(position, st.sampled_from(_NASTY_U64).map(lambda v: struct.pack("<Q", v)))
    return st.lists(st.one_of(one_byte, u64), min_size=1, max_size=4)


def _apply(base: bytes, edits, cut: int | None) -> bytes:
    data = bytearray(base)
    for pos, patch in edits:
        data[pos : pos + len(patch)] = patch[: max(0, len(data) - pos)]
    return bytes(data[:cut] if cut is not None else data)


def _read_only_gguf_errors(data: bytes, *, trace: bool = False) -> int:
    """Read ``data`` as a GGUF file: only GGUFError may escape. Returns the tracemalloc peak
    of the read (0 unless ``trace``)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.gguf"
        path.write_bytes(data)
        if trace:
            tracemalloc.start()
        try:
            with gguf.read(path) as gf:
                for name in gf.tensors:  # a file that parses must give views of the right size
                    assert gf.raw(name).nbytes == gf.tensors[name].nbytes
        except GGUFError:
            pass
        finally:
            peak = tracemalloc.get_traced_memory()[1] if trace else 0
            tracemalloc.stop()
    return peak


@pytest.fixture(scope="module")
def tiny_header(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", qtype="q8_0", rope_freqs=True)
    data = path.read_bytes()
    return data, _structure_offsets(gguf_py.GGUFReader(path), len(data))


@pytest.fixture(scope="module")
def default_prefix(default_model_path, default_reader):
    with open(default_model_path, "rb") as f:
        data = f.read(2 << 20)  # the whole 1.7 MB header and the start of the tensor data
    return data, _structure_offsets(default_reader, len(data))


# Deadline: one parse takes milliseconds (tiny) to ~0.1 s (2 MB header, ~1.5 s under
# tracemalloc); a runaway loop over a corrupted count would blow far past 5 s.
_FUZZ = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


@_FUZZ
@given(data=st.data())
def test_fuzz_tiny_model(tiny_header, data):
    base, hot = tiny_header
    edits = data.draw(_mutations(len(base), hot))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(base))))
    peak = _read_only_gguf_errors(_apply(base, edits, cut), trace=True)
    assert peak < len(base), f"peak allocation {peak} >= file size {len(base)}"


@pytest.mark.model
@settings(max_examples=20, deadline=5000, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_default_model_header(default_prefix, data):
    base, hot = default_prefix
    edits = data.draw(_mutations(len(base), hot))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(base))))
    _read_only_gguf_errors(_apply(base, edits, cut))


def _with_count(base: bytes, reader, key: str, count: int) -> tuple[bytes, int]:
    field = reader.fields[key]
    count_at = field.offset + 8 + len(key) + 4 + 4  # key length, key, ARRAY, item type
    assert struct.unpack_from("<Q", base, count_at)[0] == len(field.data)
    return _apply(base, [(count_at, struct.pack("<Q", count))], None), count_at


@pytest.mark.model
@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"])
@pytest.mark.parametrize("count", [2**64 - 1, 2**40, 2**24])
def test_huge_array_counts_refused(default_prefix, default_reader, key, count, tmp_path):
    # The counts of the real file's big arrays replaced by values the file cannot back.
    data, count_at = _with_count(default_prefix[0], default_reader, key, count)
    # over 2**30, llama.cpp's item limit refuses it first; else the bytes that remain do
    with pytest.raises(GGUFError, match="cannot fit|exceeds llama.cpp's maximum") as info:
        gguf.read(write_bytes(tmp_path, data))
    assert info.value.offset == count_at and key in info.value.field


@pytest.mark.model
@pytest.mark.parametrize("count", [2**64 - 1, 2**24, 2**18])
def test_huge_token_count_allocates_little(default_prefix, default_reader, count, tmp_path):
    # Refused before any item is read: only the ~20 small keys before the tokens array are
    # allocated, far below the 2 MB file (tracemalloc makes parsing ~20x slower, hence only
    # this first big array; the tiny-model fuzz bounds allocation for every field).
    data, _ = _with_count(default_prefix[0], default_reader, "tokenizer.ggml.tokens", count)
    path = write_bytes(tmp_path, data)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match="cannot fit|exceeds llama.cpp's maximum"):
            gguf.read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(data) // 4, peak


# --------------------------------------------------------------------------------------------
# Writing


def _all_types_metadata() -> tuple[dict, dict]:
    md = {
        "general.architecture": "llama",
        "u8": 255, "i8": -128, "u16": 65535, "i16": -32768, "u32": 2**32 - 1, "i32": -(2**31),
        "f32": float(np.float32(3.4e38)), "bool": True, "str": "héllo ✓", "empty": "",
        "u64": 2**64 - 1, "i64": -(2**63), "f64": 1e300,
        "a.u8": [0, 255], "a.i8": [-128, 127], "a.u16": [1], "a.i16": [-1], "a.u32": [2**32 - 1],
        "a.i32": [1, -2], "a.f32": [0.5, -1.25], "a.bool": [True, False], "a.str": ["a", "", "ü"],
        "a.u64": [2**64 - 1], "a.i64": [-(2**63)], "a.f64": [1e-300], "a.empty": [],
        "a.nested": [[1, 2], [3]], "a.mixed": [[True], ["x", "y"], []], "a.none": [],
    }
    types = {
        "general.architecture": V.STRING,
        "u8": V.UINT8, "i8": V.INT8, "u16": V.UINT16, "i16": V.INT16, "u32": V.UINT32, "i32": V.INT32,
        "f32": V.FLOAT32, "bool": V.BOOL, "str": V.STRING, "empty": V.STRING,
        "u64": V.UINT64, "i64": V.INT64, "f64": V.FLOAT64,
        "a.u8": (V.ARRAY, V.UINT8), "a.i8": (V.ARRAY, V.INT8), "a.u16": (V.ARRAY, V.UINT16),
        "a.i16": (V.ARRAY, V.INT16), "a.u32": (V.ARRAY, V.UINT32), "a.i32": (V.ARRAY, V.INT32),
        "a.f32": (V.ARRAY, V.FLOAT32), "a.bool": (V.ARRAY, V.BOOL), "a.str": (V.ARRAY, V.STRING),
        "a.u64": (V.ARRAY, V.UINT64), "a.i64": (V.ARRAY, V.INT64), "a.f64": (V.ARRAY, V.FLOAT64),
        "a.empty": (V.ARRAY, V.UINT32),
        "a.nested": (V.ARRAY, (V.ARRAY, V.INT16)),
        "a.mixed": (V.ARRAY, [(V.ARRAY, V.BOOL), (V.ARRAY, V.STRING), (V.ARRAY, V.FLOAT64)]),
        "a.none": (V.ARRAY, V.ARRAY),
    }
    return md, types


def test_round_trip_every_value_type(tmp_path):
    md, types = _all_types_metadata()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    tensors = {
        "f32": (x, Q.F32, (3, 64)),
        "f16": (x.astype(np.float16), Q.F16, (3, 64)),
        "q8": (gguf_py.quants.quantize(x, Q.Q8_0), Q.Q8_0, (3, 64)),
        "q41_3d": (gguf_py.quants.quantize(x.reshape(3, 1, 64), Q.Q4_1), Q.Q4_1, (3, 1, 64)),
        "empty": (np.zeros(0, np.uint8), Q.F32, (0, 8)),
    }
    path = gguf.write(tmp_path / "all.gguf", md, types, tensors)
    with pytest.raises(GGUFError, match="an array of arrays"):  # llama.cpp refuses a.nested
        gguf.read(path)
    with gguf.read(path, strict=False) as gf:
        assert gf.metadata == md and gf.types == types and list(gf.metadata) == list(md)
        assert gf.version == 3
        assert {n: (t.qtype, t.shape) for n, t in gf.tensors.items()} == {
            n: (q, s) for n, (_, q, s) in tensors.items()}
        for name, (data, _, _) in tensors.items():
            assert gf.raw(name).tobytes() == np.ascontiguousarray(data).tobytes(), name
            assert gf.tensors[name].offset % 32 == 0
        # Read -> write -> read again: identical bytes.
        again = gguf.write(tmp_path / "again.gguf", gf.metadata, gf.types,
                           {n: (gf.raw(n), t.qtype, t.shape) for n, t in gf.tensors.items()})
    assert again.read_bytes() == path.read_bytes()


def test_written_file_reads_in_gguf_py_with_custom_alignment(tmp_path):
    md = {"general.architecture": "llama", "general.alignment": 64, "x": [1.5, 2.5]}
    types = {"general.architecture": V.STRING, "general.alignment": V.UINT32, "x": (V.ARRAY, V.FLOAT32)}
    a = np.arange(3 * 32, dtype=np.float32).reshape(3, 32)
    path = gguf.write(tmp_path / "a.gguf", md, types, {"a": (a, Q.F32, a.shape), "b": (a[:1], Q.F32, (1, 32))})
    r = gguf_py.GGUFReader(path)
    assert r.alignment == 64 and r.fields["x"].contents() == [1.5, 2.5]
    np.testing.assert_array_equal(r.tensors[0].data, a)
    with gguf.read(path) as gf:
        assert gf.alignment == 64 and all(t.offset % 64 == 0 for t in gf.tensors.values())
        assert gf.data_offset == r.data_offset


_INT_RANGES = {V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1), V.UINT16: (0, 2**16 - 1),
               V.INT16: (-(2**15), 2**15 - 1), V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1),
               V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1)}


def _value_of(vtype: V):
    if vtype in _INT_RANGES:
        return st.integers(*_INT_RANGES[vtype])
    if vtype == V.FLOAT32:
        return st.floats(width=32, allow_nan=False)
    if vtype == V.FLOAT64:
        return st.floats(allow_nan=False)
    if vtype == V.BOOL:
        return st.booleans()
    return st.text(max_size=20)


_scalar_types = st.sampled_from([t for t in V if t != V.ARRAY])


@st.composite
def _typed_value(draw):
    vtype = draw(_scalar_types)
    if draw(st.booleans()):
        return draw(_value_of(vtype)), vtype
    items = draw(st.lists(_value_of(vtype), max_size=12))
    return items, (V.ARRAY, vtype)


@settings(max_examples=25, deadline=None)  # each example writes (and fsyncs) a file
@given(entries=st.dictionaries(st.text(min_size=1, max_size=12), _typed_value(), max_size=8))
def test_round_trip_property(entries):
    md = {k: v for k, (v, _) in entries.items()}
    types = {k: t for k, (_, t) in entries.items()}
    with tempfile.TemporaryDirectory() as d:
        path = gguf.write(Path(d) / "p.gguf", md, types, {})
        with gguf.read(path) as gf:
            assert gf.metadata == md and gf.types == types and gf.tensors == {}
        assert os.listdir(d) == ["p.gguf"]


@pytest.mark.parametrize("md, types, message", [
    ({"a": 256}, {"a": V.UINT8}, "does not fit in UINT8"),
    ({"a": -1}, {"a": V.UINT64}, "does not fit in UINT64"),
    ({"a": 1.5}, {"a": V.INT32}, "not a valid INT32"),
    ({"a": 1e39}, {"a": V.FLOAT32}, "does not fit in FLOAT32"),
    ({"a": "x"}, {"a": V.BOOL}, "expected a bool"),
    ({"a": 3}, {"a": V.STRING}, "expected a str"),
    ({"a": [1, 300]}, {"a": (V.ARRAY, V.UINT8)}, "outside the UINT8 range"),
    ({"a": [1.5]}, {"a": (V.ARRAY, V.INT32)}, "expected integers"),
    ({"a": ["x", 1]}, {"a": (V.ARRAY, V.STRING)}, "expected a str"),
    ({"a": [[1]]}, {"a": (V.ARRAY, V.ARRAY)}, "needs its inner types"),
    ({"a": [1]}, {"a": V.ARRAY}, "array type must be"),
    ({"a": 1}, {"a": 77}, "not a GGUF value type"),
    ({"a": 1}, {}, "no type for ['a']"),
    ({"general.alignment": 48}, {"general.alignment": V.UINT32}, "power of two"),
])
def test_write_refuses_bad_metadata(tmp_path, md, types, message):
    with pytest.raises(ValueError) as info:
        gguf.write(tmp_path / "bad.gguf", md, types, {})
    assert message in str(info.value)
    assert "'a'" in str(info.value) or "alignment" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tensor, message", [
    ((np.zeros((2, 30), np.float32), Q.F32, (2, 31)), "needs 248"),
    ((np.zeros((2, 34), np.uint8), Q.Q8_0, (2, 48)), "not a multiple of the Q8_0 block size 32"),
    ((np.zeros((2, 32), np.float64), Q.F32, (2, 32)), "float64 data for a F32 tensor"),
    ((np.zeros(4, np.uint8), 1234, (1,)), "unknown tensor type"),
    ((np.zeros(0, np.uint8), Q.F32, (1, 1, 1, 1, 0)), "1..4 non-negative dims"),
])
def test_write_refuses_bad_tensors(tmp_path, tensor, message):
    with pytest.raises(ValueError, match="tensor 'w'") as info:
        gguf.write(tmp_path / "bad.gguf", {}, {}, {"w": tensor})
    assert message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_what_llama_cpp_refuses(tmp_path):
    with pytest.raises(ValueError, match="empty key"):
        gguf.write(tmp_path / "k.gguf", {"": 1}, {"": V.UINT32}, {})
    x = np.zeros((1, 32), np.float32)
    with pytest.raises(ValueError, match="at most 63 UTF-8 bytes"):
        gguf.write(tmp_path / "n.gguf", {}, {}, {"é" * 32: (x, Q.F32, (1, 32))})
    path = gguf.write(tmp_path / "ok.gguf", {}, {}, {"é" * 31 + "n": (x, Q.F32, (1, 32))})
    with gguf.read(path) as gf:  # 63 bytes: llama.cpp's longest name
        assert list(gf.tensors) == ["é" * 31 + "n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf"]


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_write_leaves_existing_file(tmp_path, failure):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")

    def explode():
        yield np.zeros(64, np.uint8)
        raise failure

    tensors = {"ok": (np.zeros((1, 32), np.float32), Q.F32, (1, 32)), "boom": (explode, Q.F32, (1, 32))}
    with pytest.raises(type(failure)):
        gguf.write(out, {"general.architecture": "llama"}, {"general.architecture": V.STRING}, tensors)
    assert out.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_chunked_tensor_data_and_short_data(tmp_path):
    a = np.arange(4 * 32, dtype=np.float32).reshape(4, 32)
    chunks = lambda: iter([a[:1], a[1:3], a[3:]])  # noqa: E731
    path = gguf.write(tmp_path / "c.gguf", {}, {}, {"a": (chunks, Q.F32, a.shape)})
    with gguf.read(path) as gf:
        np.testing.assert_array_equal(gf.raw("a").view(np.float32), a)
    with pytest.raises(ValueError, match="tensor 'a': data gave 384 bytes"):
        gguf.write(tmp_path / "d.gguf", {}, {}, {"a": (lambda: a[:3], Q.F32, a.shape)})
    assert not (tmp_path / "d.gguf").exists()
