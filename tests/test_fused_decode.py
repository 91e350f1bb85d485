"""The fused-kernel decode step (quantref_mlx.fused_decode): what can be checked without a CUDA
GPU here (when it applies, its constants and RoPE angles), and, on a CUDA machine, its logits
against the plain graph's."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from quantref.generate import SamplerArgs
from quantref.model import rope_tables
from quantref.testing import random_model

mx = pytest.importorskip("mlx.core")
from quantref_mlx import fused_decode  # noqa: E402
from quantref_mlx.generate import Decoder, make_sampler  # noqa: E402
from quantref_mlx.model import from_oracle  # noqa: E402

CUDA = getattr(mx, "cuda", None) is not None and mx.cuda.is_available() \
    and mx.default_device().type == mx.DeviceType.gpu


@pytest.fixture(scope="module")
def models():
    """A small random model (no file, no tokenizer: it also runs where the test suite's
    dependencies are not all installed, such as the GPU machine) and its float MLX twin. Its
    head_dim of 32 and two query heads per KV head are not SmolLM2's 64 and three."""
    np_model = random_model(seed=5, vocab_size=512, dim=128, n_layers=3, n_heads=4,
                            n_kv_heads=2, head_dim=32, hidden_dim=256, rope_dim=32,
                            max_seq_len=1024)
    return np_model, from_oracle(np_model, weights="float")


@pytest.fixture(scope="module")
def quantized(models):
    """The same model, quantized as SmolLM2's file is: 4-bit layers, an 8-bit embedding."""
    return from_oracle(models[0], weights="quantized", bits=4, embed_bits=8)


def prefilled(model, kv="fp32", n=8, **options):
    cache = model.make_cache(kv, **options)
    ids = [1 + i * 7 % (model.args.vocab_size - 1) for i in range(n)]
    mx.eval(model.forward(ids, cache, last_only=True), cache.state())
    return cache


def test_which_models_and_caches_it_takes(models, quantized):
    _, m = models
    assert "empty cache" in fused_decode.supported(m, m.make_cache("fp32"))
    for kv, opts in (("q8_0", {}), ("q4_0", {})):
        assert "fp32 / fp16" in fused_decode.supported(m, prefilled(m, kv, **opts))
    # turbo_kv caches, any value type and k-window, are taken where the GPU is
    for opts in ({}, {"k_window": 4, "v": "q2", "score_path": "dequant"}):
        reason = fused_decode.supported(m, prefilled(m, "turbo_kv_4b", **opts))
        assert reason is None if CUDA else reason == "not on a CUDA GPU"
    two = from_oracle(models[0], weights="quantized", bits=2)
    assert "4 or 8 bits" in fused_decode.supported(two, prefilled(two))
    per_op = from_oracle(models[0], weights="float", sync="op")
    assert fused_decode.supported(per_op, prefilled(per_op)) == "per-op sync"
    for model, kv in ((m, "fp32"), (m, "fp16"), (quantized, "fp32"), (quantized, "fp16")):
        reason = fused_decode.supported(model, prefilled(model, kv))
        assert reason is None if CUDA else reason == "not on a CUDA GPU"


@pytest.mark.skipif(CUDA, reason="checks the refusal off CUDA")
def test_off_cuda_the_decoder_refuses_it_and_defaults_to_the_plain_graph(models):
    _, m = models
    sampler = make_sampler(SamplerArgs())
    cache = prefilled(m)
    with pytest.raises(ValueError, match="no fused decode step here: not on a CUDA GPU"):
        Decoder(m, cache, sampler, fused=True)
    assert not Decoder(m, cache, sampler).fused


def test_constants_are_exact_float32_literals():
    eps, scale = 1e-5, 1 / np.sqrt(64)
    text = fused_decode._constants(eps, scale, quantized=False)
    got = dict(re.findall(r"#define (FD_\w+) (\S+)f\n", text))
    assert float.fromhex(got["FD_EPS"]) == float(np.float32(eps))
    assert float.fromhex(got["FD_SCALE"]) == float(np.float32(scale))


@pytest.mark.parametrize("rope_dim_part, rope_scale, freqs", [(1, 1.0, False), (2, 4.0, True)])
def test_rope_angles_are_the_oracles(models, rope_dim_part, rope_scale, freqs):
    args = dataclasses.replace(models[0].args, rope_scale=rope_scale,
                               rope_dim=models[0].args.head_dim // rope_dim_part)
    factors = np.linspace(1.0, 8.0, args.rope_dim // 2).astype(np.float32) if freqs else None
    inv = fused_decode._inv_freq(args, factors)  # [head_dim // 2]
    positions = np.array([0, 1, 7, 100, 1000])
    cos, sin = rope_tables(positions, args, factors)  # [T, rope_dim // 2]
    # the kernel turns by float32(pos) * inv_freq in float32: its angles agree with the oracle's
    # float64 ones to float32 rounding of the angle (~1e-7 relative, 1e-4 rad at pos 1000)
    theta = positions[:, None].astype(np.float32) * inv[None, :]
    half = args.rope_dim // 2
    assert np.allclose(np.cos(theta[:, :half]), cos, atol=2e-4)
    assert np.allclose(np.sin(theta[:, :half]), sin, atol=2e-4)
    assert not theta[:, half:].any()  # pairs past rope_dim do not turn


@pytest.mark.skipif(not CUDA, reason="the fused kernels run on CUDA GPUs only")
@pytest.mark.parametrize("weights", ["float", "quantized"])
@pytest.mark.parametrize("kv", ["fp32", "fp16"])
@pytest.mark.parametrize("ctx", [20, 600])  # one attention block per head; split and merged
def test_fused_logits_match_the_plain_graph(models, quantized, weights, kv, ctx):
    m = models[1] if weights == "float" else quantized
    identity = lambda logits: logits  # noqa: E731 - hands the logits back
    plain, fused = prefilled(m, kv, ctx), prefilled(m, kv, ctx)
    dec = Decoder(m, fused, identity, fused=True)
    for t in (3, 17, 5, 99):
        want = m.forward(mx.array([t], mx.uint32), plain, last_only=True)
        got = dec(mx.array([t], mx.uint32))
        mx.eval(want, got, plain.state(), fused.state())
        want, got = np.array(want), np.array(got)
        # float32 sums in another order: parity's 1e-4 relative (fp16: the same rounded keys)
        assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    assert fused.length == plain.length == ctx + 4
