"""quantref.convert: re-exported tensors equal the dequantized input in the target encoding,
metadata is kept but for general.file_type, and a failure never leaves a partial OUT."""

from __future__ import annotations

import os

import gguf as gguf_py
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import quantref.quants
from quantref import gguf
from quantref.convert import FILE_TYPES, TARGET_TYPES, convert, output_qtype
from quantref.gguf import GGUFError
from quantref.testing import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory):
    # Mixed input like the default model (Q4_1 weights, Q8_0 embedding, F32 norms), plus an
    # untied output and rope_freqs.
    return write_tiny_llama(tmp_path_factory.mktemp("in") / "tiny.gguf", qtype="q4_1", embedding_qtype="q8_0",
                            tied_embeddings=False, rope_freqs=True)


def _same_metadata_but_file_type(src: gguf.GGUFFile, out: gguf.GGUFFile, key: str) -> None:
    assert out.metadata["general.file_type"] == FILE_TYPES[key] == {"f32": 0, "f16": 1, "q8_0": 7}[key]
    assert out.types == src.types and list(out.metadata) == list(src.metadata)
    assert {k: v for k, v in out.metadata.items() if k != "general.file_type"} == \
           {k: v for k, v in src.metadata.items() if k != "general.file_type"}


@pytest.mark.parametrize("key", ["f32", "f16", "q8_0"])
def test_tiny_to_each_target(tiny_q4, tmp_path, key):
    out_path = convert(tiny_q4, tmp_path / f"out-{key}.gguf", key, progress=False)
    with gguf.read(tiny_q4) as src, gguf.read(out_path) as out:
        _same_metadata_but_file_type(src, out, key)
        assert list(out.tensors) == list(src.tensors)
        for name, info in src.tensors.items():
            o = out.tensors[name]
            assert o.shape == info.shape, name
            x = src.tensor(name)  # the dequantized input, float32
            if len(info.shape) == 1:
                assert o.qtype == Q.F32
                np.testing.assert_array_equal(out.tensor(name), x)
            elif key == "f32":
                assert o.qtype == Q.F32
                np.testing.assert_array_equal(out.tensor(name), x)
            elif key == "f16":
                assert o.qtype == Q.F16
                assert out.raw(name).tobytes() == x.astype("<f2").tobytes()  # round to nearest even
            elif info.qtype == Q.Q8_0:  # already the target: copied unchanged
                assert o.qtype == Q.Q8_0 and out.raw(name).tobytes() == src.raw(name).tobytes()
            else:
                assert o.qtype == Q.Q8_0
                assert out.raw(name).tobytes() == gguf_py.quants.quantize(x, Q.Q8_0).tobytes(), name


def test_q8_0_falls_back_to_f16_for_odd_rows(tmp_path):
    src_path = write_tiny_llama(tmp_path / "odd.gguf", qtype="f32", hidden_dim=48)  # 48 % 32 != 0
    out_path = convert(src_path, tmp_path / "out.gguf", "q8_0")
    with gguf.read(src_path) as src, gguf.read(out_path) as out:
        down = out.tensors["blk.0.ffn_down.weight"]  # [dim, 48]: rows of 48
        assert down.shape == (64, 48) and down.qtype == Q.F16
        assert out.raw(down.name).tobytes() == src.tensor(down.name).astype("<f2").tobytes()
        up = out.tensors["blk.0.ffn_up.weight"]  # [48, dim]: rows of 64
        assert up.qtype == Q.Q8_0
        assert out.raw(up.name).tobytes() == gguf_py.quants.quantize(src.tensor(up.name), Q.Q8_0).tobytes()


def test_same_type_is_copied_and_special_tensors(tmp_path):
    # F16 weights to f16: bytes unchanged. A 1-D F16 tensor becomes F32; an I32 tensor is copied.
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)
    md = {"general.architecture": "custom", "general.file_type": 0, "custom.list": [1.5, 2.5]}
    types = {"general.architecture": V.STRING, "general.file_type": V.UINT32, "custom.list": (V.ARRAY, V.FLOAT64)}
    src_path = gguf.write(tmp_path / "in.gguf", md, types, {
        "w": (x.astype(np.float16), Q.F16, (4, 64)),
        "bias": (x[0].astype(np.float16), Q.F16, (64,)),
        "ids": (ids, Q.I32, (2, 4)),
    })
    out_path = convert(src_path, tmp_path / "out.gguf", "f16")
    with gguf.read(src_path) as src, gguf.read(out_path) as out:
        assert out.raw("w").tobytes() == src.raw("w").tobytes() and out.tensors["w"].qtype == Q.F16
        assert out.tensors["bias"].qtype == Q.F32
        np.testing.assert_array_equal(out.tensor("bias"), x[0].astype(np.float16).astype(np.float32))
        assert out.tensors["ids"].qtype == Q.I32 and out.raw("ids").tobytes() == ids.tobytes()
        _same_metadata_but_file_type(src, out, "f16")
    for info, want in [(gguf.TensorInfo("a", (3, 40), Q.Q4_K, 0, 0, 0), Q.F16),
                       (gguf.TensorInfo("b", (3, 64), Q.Q4_K, 0, 0, 0), Q.Q8_0),
                       (gguf.TensorInfo("c", (2, 3, 64), Q.F32, 0, 0, 0), Q.Q8_0),
                       (gguf.TensorInfo("d", (64,), Q.Q8_0, 0, 0, 0), Q.F32)]:
        assert output_qtype(info, TARGET_TYPES["q8_0"]) == want


def test_file_type_added_when_missing(tmp_path):
    src_path = gguf.write(tmp_path / "in.gguf", {"general.architecture": "x"}, {"general.architecture": V.STRING},
                          {"w": (np.ones((2, 32), np.float32), Q.F32, (2, 32))})
    with gguf.read(convert(src_path, tmp_path / "out.gguf", "Q8_0")) as out:
        assert out.metadata["general.file_type"] == 7 and out.types["general.file_type"] == V.UINT32
        assert out.tensors["w"].qtype == Q.Q8_0


@pytest.mark.parametrize("failure", [RuntimeError("simulated failure"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_output(tiny_q4, tmp_path, monkeypatch, failure, existing):
    out = tmp_path / "out.gguf"
    if existing:
        out.write_bytes(b"an earlier model")
    calls = []
    real_quantize = quantref.quants.quantize

    def failing_quantize(x, qtype):
        calls.append(qtype)
        if len(calls) == 5:  # a few tensors in: the header and some data are already written
            raise failure
        return real_quantize(x, qtype)

    monkeypatch.setattr(quantref.quants, "quantize", failing_quantize)
    with pytest.raises(type(failure)):
        convert(tiny_q4, out, "q8_0")
    assert len(calls) == 5
    assert [p.name for p in tmp_path.iterdir()] == (["out.gguf"] if existing else [])
    if existing:
        assert out.read_bytes() == b"an earlier model"


def test_bad_input_leaves_no_output(tiny_q4, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_q4.read_bytes()[:5000])  # header cut short
    with pytest.raises(GGUFError, match="broken.gguf"):
        convert(broken, tmp_path / "out.gguf", "f16")
    assert [p.name for p in tmp_path.iterdir()] == ["broken.gguf"]


def test_refuses_same_file_and_unknown_type(tiny_q4, tmp_path):
    before = tiny_q4.read_bytes()
    with pytest.raises(ValueError, match="is the input file"):
        convert(tiny_q4, tiny_q4, "f16")
    link = tmp_path / "link.gguf"
    os.symlink(tiny_q4, link)
    with pytest.raises(ValueError, match="is the input file"):
        convert(tiny_q4, link, "f16")
    hard = tmp_path / "hard.gguf"
    os.link(tiny_q4, hard)
    with pytest.raises(ValueError, match="is the input file"):
        convert(hard, tiny_q4, "f16")
    with pytest.raises(ValueError, match="unknown target type 'q4_0'"):
        convert(tiny_q4, tmp_path / "o.gguf", "q4_0")
    assert tiny_q4.read_bytes() == before and not (tmp_path / "o.gguf").exists()


def test_progress_bar(tiny_q4, tmp_path, capsys):
    convert(tiny_q4, tmp_path / "o.gguf", "f16", progress=True)
    err = capsys.readouterr().err
    assert "convert -> f16" in err and "22/22" in err  # 2 x 9 block tensors + 4 others
    convert(tiny_q4, tmp_path / "p.gguf", "f16", progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.model
@pytest.mark.slow
def test_default_model_to_f32(default_model_path, tmp_path):
    out_path = convert(default_model_path, tmp_path / "smol-f32.gguf", "f32")
    with gguf.read(default_model_path) as src, gguf.read(out_path) as out:
        _same_metadata_but_file_type(src, out, "f32")
        assert list(out.tensors) == list(src.tensors)
        for name, info in src.tensors.items():
            assert out.tensors[name].qtype == Q.F32 and out.tensors[name].shape == info.shape
            # The F32 bytes are the dequantized original exactly.
            np.testing.assert_array_equal(out.raw(name).view(np.float32), src.tensor(name), err_msg=name)


@pytest.mark.model
@pytest.mark.slow
def test_gemma_to_q8_0(gemma_model_path, tmp_path):
    out_path = convert(gemma_model_path, tmp_path / "gemma-q8_0.gguf", "q8_0")
    with gguf.read(gemma_model_path) as src, gguf.read(out_path) as out:
        assert src.metadata["general.architecture"] == "gemma3"
        _same_metadata_but_file_type(src, out, "q8_0")
        assert {n: t.shape for n, t in out.tensors.items()} == {n: t.shape for n, t in src.tensors.items()}
        assert list(out.tensors) == list(src.tensors)
        for name, info in src.tensors.items():
            assert out.tensors[name].qtype == (Q.F32 if len(info.shape) == 1 else Q.Q8_0), name
        # A Q4_K, a Q6_K and a Q5_0 tensor: re-encoded from their dequantized values.
        for qtype in (Q.Q4_K, Q.Q6_K, Q.Q5_0):
            name = next(n for n, t in src.tensors.items() if t.qtype == qtype)
            want = gguf_py.quants.quantize(src.tensor(name), Q.Q8_0)
            assert out.raw(name).tobytes() == want.tobytes(), name


def test_type_without_dequantizer_is_refused_before_writing(tmp_path):
    md, types = {"general.architecture": "x"}, {"general.architecture": V.STRING}
    src_path = gguf.write(tmp_path / "in.gguf", md, types, {
        "ok": (np.ones((2, 32), np.float32), Q.F32, (2, 32)),
        "iq": (np.zeros((2, 36), np.uint8), Q.IQ4_NL, (2, 64)),  # 2 blocks of 18 bytes a row
    })
    with pytest.raises(quantref.quants.UnsupportedQuantError, match="tensor 'iq'.*IQ4_NL") as info:
        convert(src_path, tmp_path / "out.gguf", "q8_0")
    assert info.value.qtype == Q.IQ4_NL
    assert [p.name for p in tmp_path.iterdir()] == ["in.gguf"]
