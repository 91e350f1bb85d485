"""The persistent decode step (one launch a token), on a CUDA GPU; CPU CI skips this file
(``tools/nvrtc_check.py`` compiles the kernel without a GPU).

    python -m pytest -q tests/test_persistent_decode_gpu.py      # on the GPU machine

It runs the fused step's own functions on the same block indices, so the checks are exact:
- its logits are the fused step's bit for bit, step after step, with one block per head and
  with split heads, fp32, fp16 and turbo_kv caches, and the caches it writes are the fused
  step's, byte for byte;
- its token is ``argmax`` of its logits;
- a bad token, or a grid that cannot be all resident, ends in a DecodeKernelError within a
  bounded time, never a hang, and the step works again afterwards;
- on the default model, 64 greedy tokens are the fused step's.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from quantref.testing import random_model

mx = pytest.importorskip("mlx.core")
from quantref_mlx import fused_decode as fd  # noqa: E402
from quantref_mlx import persistent_decode as pd  # noqa: E402
from quantref_mlx.generate import Decoder, greedy  # noqa: E402
from quantref_mlx.model import from_oracle  # noqa: E402

CUDA = getattr(mx, "cuda", None) is not None and mx.cuda.is_available() \
    and mx.default_device().type == mx.DeviceType.gpu
pytestmark = pytest.mark.skipif(not CUDA, reason="the persistent kernel runs on CUDA GPUs only")


@pytest.fixture(scope="module")
def model():
    """Random weights of SmolLM2's head shapes (head_dim 64, 3 query heads per KV head), 4-bit
    layers and an 8-bit embedding as SmolLM2's Q4_1 file."""
    np_model = random_model(seed=11, vocab_size=1000, dim=192, n_layers=3, n_heads=3,
                            n_kv_heads=1, head_dim=64, hidden_dim=512, rope_dim=64,
                            max_seq_len=4096)
    return from_oracle(np_model, weights="quantized", bits=4, embed_bits=8)


def prefilled(model, kv, n, **options):
    cache = model.make_cache(kv, **options)
    ids = [1 + i * 7 % (model.args.vocab_size - 1) for i in range(n)]
    logits = model.forward(ids, cache, last_only=True)
    mx.eval(logits, cache.state())
    return cache, greedy(logits)


CACHES = [("fp16", {}), ("fp32", {}), ("turbo_kv_4b", {}),
          ("turbo_kv_5b", dict(score_path="dequant", v="q4")),
          ("turbo_kv_3b", dict(score_path="fp32_codebook", v="fp32"))]


# Beyond Decoder's three (this model: 3 heads, 1 KV head; 132 blocks on the H200, so at most
# 44 splits a head, one round of the grid): "rows16", the rows form with a split per 16
# positions (ROW_KEYS is 64): 2 at context 20, 38 at 600 (the default takes 10); "rows8": 3 at
# 20, and at 600 the most, 44, of 14 positions each, the last empty (43 x 14 > 600);
# "rowsgroup", its attention a block per KV head and split for the KV head's query heads
# (fd_attend_group: float caches only), 38 splits at 600; "release", the fused form with the
# release / acquire grid barrier
STEPS = {"rows16": dict(form="rows", row_keys=16), "rows8": dict(form="rows", row_keys=8),
         "rowsgroup": dict(form="rows", row_group=True, row_keys=16),
         "release": dict(form="fused", sync="release")}
RUNS = [(kv, o, sync, ctx, cap) for kv, o in CACHES for ctx, cap in ((20, 256), (600, 1024))
        for sync in ("grid", "flags", "rows", *STEPS)
        if sync == "grid" or kv in ("fp16", "turbo_kv_4b") and not (
            sync == "rowsgroup" and kv.startswith("turbo"))]


@pytest.mark.parametrize("kv, options, sync, ctx, capacity", RUNS,
                         ids=[f"{k}-{'-'.join(o.values())}-{s}-{c}" for k, o, s, c, _ in RUNS])
def test_logits_are_the_fused_steps_bit_for_bit(model, kv, options, sync, ctx, capacity):
    identity = lambda logits: logits  # noqa: E731 - hands the logits back
    fused_cache, y = prefilled(model, kv, ctx, **options)
    fused_cache.reserve(capacity)  # the same capacity, so the same splits per head
    fused = Decoder(model, fused_cache, identity, fused=True, compiled=False)
    pers_cache, _ = prefilled(model, kv, ctx, **options)
    pers_cache.reserve(capacity)
    pers = Decoder(model, pers_cache, greedy, persistent=sync if sync not in STEPS else True)
    if sync in STEPS:
        pers.persistent = pd.PersistentStep(model, fd.TurboSpec.of(pers_cache), **STEPS[sync])
    assert pers_cache.capacity == fused_cache.capacity == capacity
    token = y
    for _ in range(12):
        want = fused(token)
        got = pers(token)
        _, nxt, logits = pers._next  # the kernel's next int32 [4 + steps], this token's logits
        mx.eval(want, got, nxt, logits)
        logits, want = np.array(logits), np.array(want).reshape(-1)
        exact = pers.persistent.warps == fd.ATTEND_WARPS and pers.persistent.form == "fused"
        if exact:  # the same sums in the same order
            np.testing.assert_array_equal(logits, want)
        else:  # 8 warps a block (PersistentStep._probe), or the rows form: sums in another
            # order, ~1e-6 of the largest logit as the fused step against the plain graph; a
            # turbo_kv key that lands on a codebook boundary may flip an index: 1e-3 bounds
            # that (the fused step's own decode test, test_fused_decode_gpu.py)
            tol = 1e-3 if kv.startswith("turbo") else 4e-6
            assert np.max(np.abs(logits - want)) <= tol * np.max(np.abs(want))
            token = mx.array(np.array([np.argmax(want)], np.uint32))
        # its token: the first index of the largest logit; none of the launch's steps failed
        assert int(np.array(got)[0]) == int(np.argmax(logits))
        assert int(np.array(nxt)[1]) == 0 and int(np.array(nxt)[0]) >= 0
        if exact:
            token = mx.array(np.array(got).astype(np.uint32))
    assert pers_cache.length == fused_cache.length == ctx + 12
    # the same bytes written where the fused step's (all layers when bit for bit; else the
    # first, whose keys and values come before any attention)
    layers = model.args.n_layers if exact else 1
    for layer in range(layers):
        for mine, theirs in zip(pers_cache.stored(layer), fused_cache.stored(layer)):
            np.testing.assert_array_equal(np.array(mine[0]), np.array(theirs[0]))


def greedy_decoder(model, cache, form, steps, warps):
    """Decoder(persistent=form) with a greedy sampler, ``steps`` tokens a launch."""
    dec = Decoder(model, cache, greedy, persistent=form)
    dec.persistent = pd.PersistentStep(model, fd.TurboSpec.of(cache), steps=steps,
                                       form=dec.persistent.form, sync=dec.persistent.sync,
                                       warps=warps)
    return dec


def test_decoder_takes_steps_tokens_a_launch_with_a_greedy_sampler_only(model):
    """One token a launch by default; ``steps`` with a greedy sampler; 1 with any other."""
    from quantref.generate import SamplerArgs
    from quantref_mlx.generate import make_sampler

    sampled = make_sampler(SamplerArgs(temp=0.7))
    for sampler, steps, want in ((greedy, 1, 1), (greedy, pd.STEPS, pd.STEPS),
                                 (sampled, pd.STEPS, 1)):
        cache, _ = prefilled(model, "fp16", 4)
        assert Decoder(model, cache, sampler, persistent=True,
                       steps=steps).persistent.steps == want


# (kv, form, warps): the rows form with float caches (16 warps), and where the looping kernel
# takes more than 128 registers a thread, 8 warps for both launches, so that the sums are the same
LAUNCHES = [("fp16", "rows", 16), ("fp32", "rows", 16), ("turbo_kv_4b", "rows", 8),
            ("fp16", "grid", 8)]


@pytest.mark.parametrize("kv, form, warps", LAUNCHES, ids=["-".join(map(str, x)) for x in LAUNCHES])
def test_tokens_of_one_launch_are_those_of_one_launch_each(model, kv, form, warps):
    """Decoder's greedy launches decode STEPS tokens each (the kernel feeding its own argmax
    back in): the same computation as one launch a token, so the same logits bit for bit and
    the same tokens, across launches (20 tokens: 8 + 8 + 4), and the same cache bytes; a token
    that is not the one handed out (mid-launch) starts a new launch from it, as it would."""
    assert pd.STEPS > 1
    runs = {}
    for steps in (pd.STEPS, 1):
        cache, y = prefilled(model, kv, 40)
        dec = greedy_decoder(model, cache, form, steps, warps)
        tokens, logits = [], []
        for _ in range(20):
            y = dec(y)
            tokens.append(dec.check(y.item()))
            logits.append(np.array(dec._next[2]))
        runs[steps] = tokens, logits, cache
    (t8, l8, c8), (t1, l1, c1) = runs[pd.STEPS], runs[1]
    assert t8 == t1
    for a, b in zip(l8, l1):
        np.testing.assert_array_equal(a, b)
    assert c8.length == c1.length == 60
    for layer in range(model.args.n_layers):
        for mine, theirs in zip(c8.stored(layer), c1.stored(layer)):
            np.testing.assert_array_equal(np.array(mine[0]), np.array(theirs[0]))
    runs = {}
    for steps in (pd.STEPS, 1):
        cache, y = prefilled(model, kv, 40)
        dec = greedy_decoder(model, cache, form, steps, warps)
        for _ in range(3):
            y = dec(y)
        first = dec.check(y.item())
        y = dec(mx.array([(first + 1) % model.args.vocab_size], mx.uint32))  # the caller's own
        runs[steps] = first, dec.check(y.item()), np.array(dec._next[2]), cache.length
    (f8, n8, z8, len8), (f1, n1, z1, len1) = runs[pd.STEPS], runs[1]
    assert (f8, n8, len8) == (f1, n1, len1) and len8 == 44
    np.testing.assert_array_equal(z8, z1)


def test_a_token_outside_the_vocabulary_is_an_error_not_a_read_out_of_bounds(model):
    cache, _ = prefilled(model, "fp16", 10)
    dec = Decoder(model, cache, greedy, persistent=True)
    y = dec(mx.array([model.args.vocab_size + 5], mx.uint32))
    with pytest.raises(pd.DecodeKernelError, match="outside the vocabulary"):
        dec.check(y.item())
    y = dec(mx.array([3], mx.uint32))  # and the step goes on
    assert 0 <= dec.check(y.item()) < model.args.vocab_size


@pytest.mark.parametrize("sync", ["grid", "release", "flags"])
def test_a_grid_that_cannot_be_resident_fails_in_bounded_time(model, sync):
    """Twice as many 512-thread blocks as SMs: the kernel needs 128 registers a thread, so one
    block fills an SM and half the grid waits for the other half to finish; the first barrier
    gives up after WAIT_NS and every block returns."""
    cache, _ = prefilled(model, "fp16", 10)
    dec = Decoder(model, cache, greedy, persistent=True)
    good = pd.PersistentStep(model)
    dec.persistent = pd.PersistentStep(model, blocks=2 * good.blocks, sync=sync)
    start = time.perf_counter()
    y = dec(mx.array([3], mx.uint32))
    # (a block of the second wave that finds the flag already set may report "an earlier
    # launch failed" in its place)
    with pytest.raises(pd.DecodeKernelError, match="grid barrier waited longer|earlier launch"):
        dec.check(y.item())
    # one WAIT_NS for the first wave, and the second wave returns at once (the error flag)
    assert time.perf_counter() - start < 3 * pd.WAIT_NS / 1e9 + 5
    dec.persistent = good  # a resident grid works again
    y = dec(mx.array([3], mx.uint32))
    assert 0 <= dec.check(y.item()) < model.args.vocab_size


@pytest.mark.model
def test_default_model_greedy_tokens_are_the_fused_steps(default_model_path):
    """64 greedy tokens of the default model, persistent against fused: the same sums in the
    same order, so the same tokens."""
    import quantref_mlx

    model = quantref_mlx.load(default_model_path)
    prompt = model.tokenizer.encode("The capital of France is")
    out = {}
    for name, opts in (("fused", {}), ("persistent", dict(persistent="grid"))):  # fused form
        cache, y = prefilled_ids(model, prompt)
        dec = Decoder(model, cache, greedy, **opts)
        tokens = []
        for _ in range(64):
            y = dec(y)
            tokens.append(dec.check(y.item()))
        out[name] = tokens
    assert out["persistent"] == out["fused"]


def prefilled_ids(model, ids):
    cache = model.make_cache("fp16")
    logits = model.forward(ids, cache, last_only=True)
    y = greedy(logits)
    mx.eval(y, cache.state())
    return cache, y


def test_sampled_tokens_are_the_fused_steps(model):
    """A sampler other than greedy reads the persistent step's logits and feeds its own token to
    the next launch: with the fused form's logits (the fused step's bit for bit) and the same
    seed, the same tokens."""
    from quantref.generate import SamplerArgs, SamplerRNG
    from quantref_mlx.generate import make_sampler

    args = SamplerArgs(temp=0.8, top_k=40, top_p=0.95)
    out = {}
    for name, opts in (("fused", dict(fused=True)), ("persistent", dict(persistent="grid"))):
        cache, y = prefilled(model, "fp16", 30)
        dec = Decoder(model, cache, make_sampler(args, SamplerRNG(7)), **opts)
        tokens = []
        for _ in range(16):
            y = dec(y)
            tokens.append(dec.check(int(y.item())))
        out[name] = tokens
    assert out["persistent"] == out["fused"]
