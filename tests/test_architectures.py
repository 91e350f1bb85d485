"""Architectures other than plain llama: qwen2, qwen3, phi3, Llama 3 rope_freqs, gemma3.

Tiny random GGUFs of each (quantref.testing.write_tiny, in the layout llama.cpp's converter
writes) against llama.cpp's logits (tests/data/arch_logits.npz, made by
tests/data/make_arch_logits.py with llama-cpp-python 0.3.36), on both backends; gemma3's
sliding window on every KV cache type; and the real Gemma 3 270M against llama.cpp's
perplexity.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import quantref
from quantref import gguf
from quantref.cache import KV_TYPES
from quantref.model import ModelArgs, UnsupportedModelError, rope, rope_tables, window_mask
from quantref.testing import VOCAB_SIZE, write_tiny

TEST_DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(TEST_DATA))
from make_arch_logits import CASES, token_ids  # noqa: E402

HAVE_MLX = importlib.util.find_spec("mlx") is not None
REFERENCE = TEST_DATA / "arch_logits.npz"


@pytest.fixture(scope="module")
def reference():
    return np.load(REFERENCE)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("arch")
    return {case: write_tiny(d / f"{case}.gguf", **args) for case, args in CASES.items()}


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| over max |ref|: one scale for every logit of a case."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# llama.cpp's float32 arithmetic differs from ours in summation order (BLAS vs ggml's dot
# products, its RoPE angles accumulated in float32): measured <= 1.2e-6 relative. 1e-4 is the
# issue's bound. gemma3 differs more: ggml's CPU GELU is a float16 table lookup (input and
# output rounded to float16), where we evaluate the tanh formula as its CUDA kernels do:
# measured 2.9e-4 (2.3e-5 with the table emulated), so 1e-3 there.
TOLERANCE = {case: 1e-4 for case in CASES} | {"gemma3": 1e-3}


@pytest.mark.parametrize("case", list(CASES))
def test_numpy_matches_llama_cpp(case, tiny_paths, reference):
    m = quantref.load(tiny_paths[case])
    ids = reference[f"{case}/ids"]
    assert ids.tolist() == token_ids(case)
    logits = m.forward(ids)
    assert relative_error(logits, reference[f"{case}/logits"]) < TOLERANCE[case]


@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not installed")
@pytest.mark.parametrize("weights", ["float", "quantized"])
@pytest.mark.parametrize("case", list(CASES))
def test_mlx_matches_llama_cpp(case, weights, tiny_paths, reference):
    import mlx.core as mx

    import quantref_mlx

    # F32 files: "quantized" keeps nothing quantized (only Q4_0/Q4_1/Q8_0 are), so both
    # layouts compute with the same float32 weights; it exercises the loader's other path
    # (phi3's fused tensors read as one matrix each).
    m = quantref_mlx.load(tiny_paths[case], weights=weights)
    ids = reference[f"{case}/ids"]
    logits = np.array(m.forward(ids))
    assert relative_error(logits, reference[f"{case}/logits"]) < TOLERANCE[case]


# --- metadata --------------------------------------------------------------------------------

def test_architecture_options_from_metadata(tiny_paths):
    def args(case):
        with gguf.read(tiny_paths[case]) as gf:
            return ModelArgs.from_metadata(gf.metadata, list(gf.tensors), tiny_paths[case])

    a = args("gemma3")
    assert a.arch == "gemma3" and a.rope_neox and a.qk_norm and a.post_norms
    assert a.ffn_act == "gelu" and a.sliding_window == 8 and a.rope_base_swa == 10000.0
    assert a.swa_layers == (True, True, False)  # pattern 3: every third layer is global
    assert a.attn_scale == 1 / 8 and a.embed_scale == np.float32(math.sqrt(64))
    assert not a.llama_block
    assert args("qwen2").qkv_bias and not args("qwen2").tied_embeddings
    assert args("qwen3").qk_norm and args("qwen3").head_dim == 32
    assert args("phi3").fused_qkv and args("phi3").rope_neox
    llama = args("llama_rope_freqs")
    assert llama.llama_block and llama.options == {}
    assert set(a.options) >= {"sliding_window", "swa_layers", "rope_base_swa", "qk_norm"}


def test_gemma3_default_swa_pattern_is_every_sixth_layer(tmp_path):
    p = write_tiny(tmp_path / "g.gguf", arch="gemma3", n_layers=7, head_dim=16,
                   sliding_window=4)
    with gguf.read(p) as gf:
        a = ModelArgs.from_metadata(gf.metadata, list(gf.tensors), p)
    # llama_hparams::set_swa_pattern(6): il % 6 < 5 slides
    assert a.swa_layers == (True,) * 5 + (False, True)


def test_missing_architecture_tensor_is_named(tmp_path):
    src = write_tiny(tmp_path / "q.gguf", arch="qwen3")
    with gguf.read(src) as gf:
        tensors = {n: (np.array(gf.raw(n)), t.qtype, t.shape) for n, t in gf.tensors.items()
                   if n != "blk.1.attn_k_norm.weight"}
        gguf.write(tmp_path / "broken.gguf", gf.metadata, gf.types, tensors)
    with pytest.raises(UnsupportedModelError, match="blk.1.attn_k_norm.weight"):
        quantref.load(tmp_path / "broken.gguf")


def test_info_shows_architecture_and_options(tiny_paths, capsys):
    from quantref.cli import main

    assert main(["info", "--model", str(tiny_paths["gemma3"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "gemma3"
    assert info["options"]["sliding_window"] == 8 and info["options"]["swa_layers"] == [0, 1]
    assert main(["info", "--model", str(tiny_paths["qwen2"])]) == 0
    out = capsys.readouterr().out
    assert "architecture  qwen2" in out and "qkv_bias" in out and "rope_neox" in out
    assert main(["info", "--model", str(tiny_paths["gemma3"])]) == 0
    assert "(sliding window on 2 of 3 layers)" in capsys.readouterr().out


def test_info_refuses_an_unsupported_architecture_naming_the_supported(tmp_path, capsys):
    from quantref.cli import main

    src = write_tiny(tmp_path / "t.gguf", arch="qwen2")
    with gguf.read(src) as gf:
        md = dict(gf.metadata, **{"general.architecture": "mamba"})
        tensors = {n: (np.array(gf.raw(n)), t.qtype, t.shape) for n, t in gf.tensors.items()}
        gguf.write(tmp_path / "mamba.gguf", md, gf.types, tensors)
    assert main(["info", "--model", str(tmp_path / "mamba.gguf")]) == 1
    err = capsys.readouterr().err
    assert "general.architecture = 'mamba' is not supported" in err
    assert "supported: llama, qwen2, qwen3, phi3, gemma3" in err


# --- building blocks --------------------------------------------------------------------------

def test_neox_rope_turns_split_halves():
    args = ModelArgs(vocab_size=1, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                     hidden_dim=8, norm_eps=1e-5, rope_base=10000.0, rope_dim=8, rope_scale=1.0,
                     max_seq_len=16, tied_embeddings=True, rope_neox=True)
    x = np.random.default_rng(0).standard_normal((5, 1, 8)).astype(np.float32)
    cos, sin = rope_tables(np.arange(5), args)
    y = rope(x, cos, sin, neox=True)
    # pair i is (x[i], x[i + 4]): it keeps its length, and pair 0 turns by `position` radians
    pairs = lambda v: np.hypot(v[..., :4], v[..., 4:])  # noqa: E731
    np.testing.assert_allclose(pairs(y), pairs(x), rtol=1e-6)  # float32 rounding
    angle = np.arctan2(y[3, 0, 4], y[3, 0, 0]) - np.arctan2(x[3, 0, 4], x[3, 0, 0])
    assert math.isclose((angle + math.pi) % (2 * math.pi) - math.pi, 3.0, abs_tol=1e-5)
    # the same numbers as the adjacent-pair form on de-interleaved dims
    perm = np.array([0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(rope(x[..., perm], cos, sin)[..., np.argsort(perm)], y)


def test_window_mask_keeps_the_newest_window_keys():
    m = window_mask(T=3, L=10, window=4)  # queries at positions 7, 8, 9
    assert [np.flatnonzero(~row).tolist() for row in m] == [
        [4, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [6, 7, 8, 9]]  # (causal masking is separate)


# --- the sliding window on every cache type ---------------------------------------------------

@pytest.fixture(scope="module")
def one_window_layer(tmp_path_factory):
    """One gemma3 layer, all sliding (pattern 0), window 8, head_dim 128 (a whole turbo_kv
    block): its last position depends on the newest 8 tokens only."""
    p = write_tiny(tmp_path_factory.mktemp("swa") / "g.gguf", arch="gemma3", n_layers=1,
                   dim=64, n_heads=2, n_kv_heads=1, head_dim=128, hidden_dim=128,
                   sliding_window=8, sliding_window_pattern=0, seed=3)
    return p


def _two_texts(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """20 ids, and the same with the 12 oldest (outside the last position's window) changed."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB_SIZE, 20)
    other = ids.copy()
    other[:12] = rng.integers(3, VOCAB_SIZE, 12)
    return ids, other


@pytest.mark.parametrize("kv", KV_TYPES)
def test_window_evicts_old_tokens_of_every_cache_type(kv, one_window_layer):
    """Tokens that left the window have no effect on any cache type: the last position's
    logits are bit for bit those of a text whose old tokens differ, prefilled at once or
    decoded a token at a time. (Every cache type stores each token on its own, so masking
    them is what evicting them would give.)"""
    m = quantref.load(one_window_layer)
    ids, other = _two_texts(0)
    assert m.args.is_swa(0)
    last = m.forward(ids, m.make_cache(kv))[-1]
    np.testing.assert_array_equal(m.forward(other, m.make_cache(kv))[-1], last)
    # ... and they did count before they left it: position 11 sees tokens 4..11
    assert not np.array_equal(m.forward(ids[:12], m.make_cache(kv))[-1],
                              m.forward(other[:12], m.make_cache(kv))[-1])
    cache = m.make_cache(kv)
    m.forward(other[:10], cache)
    for t in other[10:]:
        step = m.forward([t], cache)[-1]
    # decode attends through the same stored keys; only BLAS's blocking of a 1-row vs a
    # 10-row product differs (reassociation): 1e-5 of the logits' scale
    np.testing.assert_allclose(step, last, rtol=0, atol=1e-5 * np.abs(last).max())


@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not installed")
@pytest.mark.parametrize("kv", KV_TYPES)
def test_mlx_window_evicts_old_tokens_of_every_cache_type(kv, one_window_layer):
    import mlx.core as mx

    import quantref_mlx

    m = quantref_mlx.load(one_window_layer, weights="float")
    oracle = quantref.load(one_window_layer)
    ids, other = _two_texts(1)
    last = np.array(m.forward(ids, m.make_cache(kv))[-1])
    # MLX's kernels may sum in another order for other inputs: 1e-5 of the logits' scale
    scale = np.abs(last).max()
    np.testing.assert_allclose(np.array(m.forward(other, m.make_cache(kv))[-1]), last,
                               rtol=0, atol=1e-5 * scale)
    cache = m.make_cache(kv)
    m.forward(other[:10], cache)
    for t in other[10:]:
        step = m.forward([int(t)], cache)
        mx.eval(step, *cache.state())
    np.testing.assert_allclose(np.array(step[-1]), last, rtol=0, atol=1e-5 * scale)
    # and the oracle agrees; compressed caches: quantizer rounding of near-tie values may
    # differ between the halves (float32 vs MLX's op order), so 1e-3 of the scale there
    want = oracle.forward(other, oracle.make_cache(kv))[-1]
    tol = 1e-5 if kv in ("fp32", "fp16") else 1e-3
    np.testing.assert_allclose(np.array(step[-1]), want, rtol=0, atol=tol * scale)


# --- generation ------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not installed")
@pytest.mark.parametrize("kv", ["fp32", "fp16"])
def test_generation_across_the_window_agrees_between_backends(kv, tiny_paths):
    """Greedy decoding on tiny gemma3 (window 8) well past the window: the same tokens from
    both halves (float caches, where the halves' logits agree to float32 rounding)."""
    import quantref_mlx
    from quantref.generate import generate
    from quantref_mlx.generate import generate as mlx_generate
    from quantref_mlx.generate import stream_generate

    path = tiny_paths["gemma3"]
    prompt = token_ids("gemma3")[:6]
    kwargs = dict(max_tokens=14, temp=0.0, kv=kv)
    ours = [r.token for r in quantref.stream_generate(quantref.load(path), prompt, **kwargs)]
    m = quantref_mlx.load(path, weights="float")
    theirs = [r.token for r in stream_generate(m, prompt, **kwargs)]
    assert len(ours) == 14 and ours == theirs
    assert generate(quantref.load(path), prompt, **kwargs) == mlx_generate(m, prompt, **kwargs)


@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not installed")
@pytest.mark.parametrize("kv", ["fp32", "q8_0"])
def test_compiled_decode_step_masks_the_window(kv, tiny_paths):
    """The compiled step (fixed-capacity buffers, the position an array) builds the window
    mask from that array: its logits past the window are the plain graph's."""
    import mlx.core as mx

    import quantref_mlx
    from quantref_mlx.generate import Decoder

    m = quantref_mlx.load(tiny_paths["gemma3"], weights="float")
    ids = token_ids("gemma3")
    plain, compiled = m.make_cache(kv), m.make_cache(kv)
    for c in (plain, compiled):
        mx.eval(m.forward(ids[:5], c), *c.state())
    identity = lambda logits: logits  # noqa: E731 - hands the logits back
    dec = Decoder(m, compiled, identity, compiled=True, fused=False)
    assert dec.compiled and not dec.fused
    for t in ids[5:20]:  # positions 5..19: the window of 8 slides past the prompt
        want = m.forward(mx.array([t], mx.uint32), plain, last_only=True)
        got = dec(mx.array([t], mx.uint32))
        mx.eval(want, got, *plain.state(), *compiled.state())
        want, got = np.array(want), np.array(got)
        # the same arithmetic over a longer, masked buffer: float32 reassociation only
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not installed")
@pytest.mark.parametrize("case", [c for c in CASES if c != "llama_rope_freqs"])
def test_the_fused_cuda_step_is_refused_for_other_architectures(case, tiny_paths):
    """The fused decode kernels compute llama's block: ModelArgs.llama_block says where they
    may run, and the decoder's choice (fused_decode.supported) names the architecture."""
    import mlx.core as mx

    import quantref_mlx
    from quantref_mlx.fused_decode import supported

    m = quantref_mlx.load(tiny_paths[case], weights="float")
    assert not m.args.llama_block
    cache = m.make_cache("fp32")
    mx.eval(m.forward(token_ids(case)[:4], cache), *cache.state())
    assert case.split("_")[0] in supported(m, cache)


# --- the real Gemma 3 270M --------------------------------------------------------------------

# llama.cpp's perplexity of the F32 export of this file's weights on ppl_1k.txt (BOS added, one
# pass of 1023 tokens), as the issue states it; the bound is 0.01.
LLAMA_CPP_PPL = 10.0194


@pytest.fixture(scope="module")
def gemma_oracle_ppl(gemma_model_path, ppl_1k_text):
    m = quantref.load(gemma_model_path)
    return quantref.perplexity(m, ppl_1k_text, progress=False)


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_perplexity_matches_llama_cpp(gemma_oracle_ppl):
    r = gemma_oracle_ppl
    assert r.tokens == 1023
    assert abs(r.ppl - LLAMA_CPP_PPL) < 0.01


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MLX, reason="mlx is not installed")
def test_gemma3_mlx_perplexity_matches_the_oracle(gemma_model_path, ppl_1k_text,
                                                  gemma_oracle_ppl):
    import quantref_mlx
    from quantref_mlx.perplexity import perplexity

    m = quantref_mlx.load(gemma_model_path, weights="float")
    r = perplexity(m, ppl_1k_text, progress=False)
    assert r.tokens == gemma_oracle_ppl.tokens
    assert abs(r.ppl / gemma_oracle_ppl.ppl - 1) < 5e-4  # the bound: 0.05%


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_chat_prompt_and_generation_on_both_backends(gemma_model_path):
    """--chat on Gemma: the release's template (the file has none), BOS once, the turn
    markers as single special tokens; a few greedy tokens the same from both halves."""
    from quantref.generate import encode_prompt

    m = quantref.load(gemma_model_path)
    tok = m.tokenizer
    assert tok.chat_template is not None and "<start_of_turn>" in tok.chat_template
    ids = encode_prompt(tok, "What is the capital of France?", chat=True)
    start, end = tok.tokens.index("<start_of_turn>"), tok.tokens.index("<end_of_turn>")
    assert ids[:2] == [tok.bos_id, start] and ids.count(tok.bos_id) == 1
    assert ids[-5] == end and ids[-3] == start  # ...<end_of_turn>\n<start_of_turn>model\n
    assert tok.decode(ids[-2:]) == "model\n"
    assert tok.is_eog(end)  # a reply ends at <end_of_turn>, as llama.cpp's EOG list says
    ours = [r.token for r in quantref.stream_generate(m, ids, max_tokens=4)]
    if HAVE_MLX:
        import quantref_mlx
        from quantref_mlx.generate import stream_generate

        mm = quantref_mlx.load(gemma_model_path, weights="float")
        assert [r.token for r in stream_generate(mm, ids, max_tokens=4)] == ours
