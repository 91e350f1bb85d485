"""``quantref convert IN.gguf OUT.gguf --type q8_0|f16|f32``: re-export a GGUF's tensors.

Works for any architecture: only tensors and ``general.file_type`` change; every other metadata
key is copied with its stored type. The tensor rule (llama.cpp's, for these targets):

- 1-D tensors (norms, biases, ``rope_freqs``) are written as F32, whatever the target;
- integer tensors (I8/I16/I32/I64) are copied unchanged (they are not weights to re-encode);
- every other tensor becomes the target type, except that for q8_0 a tensor whose row length
  is not a multiple of the Q8_0 block (32) falls back to F16;
- a tensor already in its output type is copied byte for byte (re-encoding would be the
  identity at best, and for Q8_0 could differ from the original encoder's choice).

Values go through float32: ``quantref.quants.dequantize`` then ``quantref.quants.quantize``,
a bounded number of rows at a time, so memory stays near one chunk rather than one model.
The output is written to a temporary file next to OUT and renamed only on success: after any
failure (bad input, KeyboardInterrupt, full disk) there is no new OUT and an existing OUT is
untouched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from . import gguf

__all__ = ["convert", "TARGET_TYPES", "FILE_TYPES", "output_qtype"]

Q = GGMLQuantizationType
# --type name -> tensor type of the converted weights.
TARGET_TYPES: dict[str, GGMLQuantizationType] = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
# --type name -> llama.cpp file type written to general.file_type.
FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,      # 0
    "f16": LlamaFileType.MOSTLY_F16,   # 1
    "q8_0": LlamaFileType.MOSTLY_Q8_0,  # 7
}
_INTEGER_TYPES = frozenset({Q.I8, Q.I16, Q.I32, Q.I64})
_CHUNK_ELEMENTS = 1 << 22  # rows are converted ~4M values (16 MB of float32) at a time


def output_qtype(info: gguf.TensorInfo, target: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type a tensor is written as when converting to ``target`` (the module's rule)."""
    if info.qtype in _INTEGER_TYPES:
        return info.qtype
    if len(info.shape) == 1:
        return Q.F32
    block_elems = GGML_QUANT_SIZES[target][0]
    if info.shape[-1] % block_elems:
        return Q.F16
    return target


def _converted_chunks(gf: gguf.GGUFFile, info: gguf.TensorInfo, out_type: GGMLQuantizationType) -> Iterator[np.ndarray]:
    """Yield the tensor re-encoded as ``out_type``, a block of whole rows at a time (uint8)."""
    from . import quants  # lazy, and looked up at call time so tests can patch it

    raw = gf.raw(info.name)
    if out_type == info.qtype:
        yield raw  # same encoding: copied from the map unchanged
        return
    rows = raw.reshape(-1, raw.shape[-1])  # [n_rows, row_bytes]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, info.shape[-1]))
    for start in range(0, rows.shape[0], rows_per_chunk):
        values = quants.dequantize(rows[start : start + rows_per_chunk], info.qtype)  # f32 [r, row_elems]
        encoded = quants.quantize(np.asarray(values, dtype=np.float32), out_type)
        yield np.ascontiguousarray(encoded).view(np.uint8)


def convert(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    qtype: str,
    *,
    progress: bool | None = None,
) -> Path:
    """Re-export ``in_path`` with its weights as ``qtype`` ("q8_0", "f16" or "f32").

    Returns ``Path(out_path)``. ``progress``: a tqdm bar over tensors (default: when stderr is
    a terminal). Raises ValueError for an unknown ``qtype`` or when OUT is IN, GGUFError for a
    malformed input, quants.UnsupportedQuantError (a ValueError) for a tensor type that has no
    dequantizer (checked before writing starts).
    """
    key = str(qtype).lower()
    if key not in TARGET_TYPES:
        raise ValueError(f"unknown target type {qtype!r}; choose one of {', '.join(TARGET_TYPES)}")
    target = TARGET_TYPES[key]
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.resolve() == out_path.resolve() or (
        out_path.exists() and in_path.exists() and os.path.samefile(in_path, out_path)
    ):
        raise ValueError(f"output {os.fspath(out_path)!r} is the input file; choose another path")
    if progress is None:
        progress = sys.stderr.isatty()

    with gguf.read(in_path) as gf:
        metadata: dict[str, Any] = dict(gf.metadata)
        types: dict[str, Any] = dict(gf.types)
        metadata["general.file_type"] = int(FILE_TYPES[key])
        types.setdefault("general.file_type", GGUFValueType.UINT32)

        from . import quants

        tensors = {}
        for name, info in gf.tensors.items():
            out_type = output_qtype(info, target)
            if out_type != info.qtype and info.qtype not in quants.BLOCKS:
                # Refused before anything is written, not gigabytes into the output.
                raise quants.UnsupportedQuantError(
                    info.qtype, f"{os.fspath(in_path)}: tensor {name!r}: conversion")
            # Bind loop variables now: the writer calls these lazily, one tensor at a time.
            tensors[name] = (lambda info=info, t=out_type: _converted_chunks(gf, info, t), out_type, info.shape)
        gguf.write(out_path, metadata, types, tensors, progress=progress, desc=f"convert -> {key}")
    return out_path
