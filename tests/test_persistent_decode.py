"""The persistent decode step's host side, on any machine (the kernel itself:
tests/test_persistent_decode_gpu.py, on a CUDA GPU): bad options are clear errors at
construction, and where no CUDA GPU is, ``supported`` says why instead of a launch failing."""

from __future__ import annotations

import numpy as np
import pytest

from quantref.testing import random_model

pytest.importorskip("mlx.core")
from quantref_mlx import persistent_decode as pd  # noqa: E402
from quantref_mlx.model import from_oracle  # noqa: E402


@pytest.fixture(scope="module")
def model():
    np_model = random_model(seed=3, vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                            head_dim=32, hidden_dim=128, rope_dim=32, max_seq_len=256)
    return from_oracle(np_model, weights="quantized", bits=4, embed_bits=8)


@pytest.mark.parametrize("options, field", [
    (dict(sync="barrier"), "sync"), (dict(form="columns"), "form"),
    (dict(row_keys=-1), "row_keys"), (dict(row_unroll=0), "row_unroll"),
    (dict(steps=0), "steps"), (dict(steps=65), "steps"), (dict(steps=2, times=True), "steps"),
    (dict(steps=2, sync="flags"), "steps")])
def test_a_bad_option_is_a_value_error_naming_it(model, options, field):
    with pytest.raises(ValueError, match=field):
        pd.PersistentStep(model, blocks=132, **options)  # 132: no GPU asked for its SMs


def test_the_scratch_holds_every_region_the_kernel_lays_out(model):
    """persistent.cu's scratch: the sync words, the projections' parts, the activations, the
    attention splits (the fused step's 16 or the rows form's ROW_MAX_SPLITS a head), each
    block's best, then the timer marks and each block's start and arrival (uint64 each)."""
    step = pd.PersistentStep(model, blocks=132)
    marks, size = step._offsets()
    a = model.args
    splits = a.n_heads * pd.ROW_MAX_SPLITS * (a.head_dim + 2)
    assert marks >= 96 + splits + 2 * pd._MAX_BEST
    assert size == marks + 2 * (step.max_marks + 2 * pd._MAX_BEST)
    assert step.scratch.shape == (size,) and not step.scratch.any().item()


def test_supported_says_why_not_where_there_is_no_cuda_gpu(model):
    import mlx.core as mx

    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    cache = model.make_cache("fp16")
    assert "prefill" in pd.supported(model, cache)  # the step decodes after a prefill
    mx.eval(model.forward([1, 2], cache, last_only=True), cache.state())
    assert "CUDA" in pd.supported(model, cache)


def test_row_group_is_taken_only_where_the_kernel_takes_it(model):
    """fd_attend_group reads float caches: a turbo_kv cache's step records a block per head,
    as its kernel runs (the benches label their rows from this)."""
    from quantref_mlx.fused_decode import TurboSpec

    assert pd.PersistentStep(model, blocks=132, row_group=True).row_group
    turbo = TurboSpec.of(model.make_cache("turbo_kv_4b"))
    assert turbo is not None
    assert not pd.PersistentStep(model, turbo, blocks=132, row_group=True).row_group


class _FakeStep:
    """Stands in for PersistentStep on any machine (Decoder's bookkeeping, not the kernel): a
    launch of ``steps`` greedy tokens where each token's successor is ``f(token, position)``;
    records each launch's position."""

    launches: list = []
    fail_at = None  # a position whose launch fails as a barrier that waited too long does

    def __init__(self, model, turbo=None, steps=1, **options):
        self.steps, self.vocab = steps, model.args.vocab_size
        self.form, self.sync = options.get("form", "rows"), options.get("sync", "grid")
        _FakeStep.launches = []

    def __call__(self, token, pos, kc, vc):
        import mlx.core as mx

        # what the kernel writes, positions pos .. pos + steps - 1, within the buffers
        at = int(np.array(pos)[0])
        assert at + self.steps <= kc.shape[2] == vc.shape[2]
        self.launches.append(pos)
        first = int(np.array(token)[0])
        code = 2 if not 0 <= first < self.vocab else (
            1 if self.fail_at is not None and at <= self.fail_at < at + self.steps else 0)
        if code:  # as the kernel fails: next[0] -1, next[1] the reason, no token
            nxt = mx.array(np.array([-1, code, 0, 0] + [-1] * self.steps, np.int32))
            logits = mx.zeros((self.steps, self.vocab), mx.float32)
            return nxt, logits if self.steps > 1 else logits[0]
        t, tokens = token[0], []
        for s in range(self.steps):
            t = f(t, pos[0] + s, self.vocab)
            tokens.append(t)
        nxt = mx.concatenate([mx.stack([tokens[-1], mx.array(0, mx.int32)]),
                              mx.zeros((2,), mx.int32), mx.stack(tokens)]).astype(mx.int32)
        logits = mx.stack([mx.arange(self.vocab) == x for x in tokens]).astype(mx.float32)
        return nxt, logits if self.steps > 1 else logits[0]

    def error(self, code):
        return pd.DecodeKernelError(pd.REASONS[code])


def _within(view, whole) -> bool:
    """Whether ``view``'s data lies inside ``whole``'s buffer (both evaluated)."""
    at = np.asarray(view).__array_interface__["data"][0]
    base = np.asarray(whole).__array_interface__["data"][0]
    return base <= at < base + whole.nbytes


def f(token, position, vocab):
    return (token * 7 + position + 3) % vocab


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_decoder_hands_out_a_launchs_tokens_in_order(model, monkeypatch, steps):
    """Decoder(persistent=True, steps=K) with a greedy sampler: the tokens, one a call, are the
    chain token -> f(token, position) whatever K; a launch every K calls, each at the position
    the last left off; a token of the caller's own mid-launch starts a new launch from it at
    the cache's length."""
    import importlib

    import mlx.core as mx

    generate = importlib.import_module("quantref_mlx.generate")  # the module, not its function
    monkeypatch.setattr(generate, "persistent_supported", lambda model, cache: None)
    monkeypatch.setattr(generate, "PersistentStep", _FakeStep)
    vocab = model.args.vocab_size
    cache = model.make_cache("fp16")
    mx.eval(model.forward([1, 2, 3, 4, 5], cache, last_only=True), cache.state())
    dec = generate.Decoder(model, cache, generate.greedy, persistent=True, steps=steps)
    assert dec.persistent.steps == steps
    y, want, t = mx.array([9], mx.uint32), [], 9
    for n in range(14):
        t = f(t, 5 + n, vocab)
        want.append(t)
    got = []
    for _ in range(14):
        y = dec(y)
        got.append(dec.check(y.item()))
        # what the host reads is a copy, not a view of the launch's output: on CUDA a host read
        # of a kernel's output moves its buffer to managed memory (bench/host_read.py)
        assert not _within(y, dec._next[1])
    assert got == want and cache.length == 19
    starts = [int(np.array(p)[0]) for p in _FakeStep.launches]
    assert starts == list(range(5, 19, steps))  # the launches the 14 tokens came from
    np.testing.assert_array_equal(np.array(dec._next[2]), np.arange(vocab) == want[-1])
    # the caller's own token, mid-launch: a new launch from it, at the cache's length
    y = dec(mx.array([5], mx.uint32))
    assert dec.check(y.item()) == f(5, 19, vocab) and cache.length == 20
    assert int(np.array(_FakeStep.launches[-1])[0]) == 19
    # the cache moved under a launch mid-way (here: one more position): a new launch from the
    # token handed out, not from the launch's last, at the cache's length
    for _ in range(2):
        y = dec(y)
    mid = dec.check(y.item())
    cache.give_buffers(*cache.take_buffers(), 1)
    y = dec(y)
    assert dec.check(y.item()) == f(mid, 23, vocab) and cache.length == 24
    # a sampler other than greedy: one token a launch, whatever asked
    sampled = generate.make_sampler(generate.SamplerArgs(temp=0.5))
    assert generate.Decoder(model, model.make_cache("fp16"), sampled, persistent=True,
                            steps=4).persistent.steps == 1


@pytest.mark.parametrize("steps", [1, 4])
def test_decoder_launches_stay_within_the_buffers_as_the_cache_grows(model, monkeypatch, steps):
    """From 250 prefilled tokens (the buffers hold 256) over the capacity's doubling: each launch
    writes within the buffers (_FakeStep asserts it), and the tokens stay the chain's."""
    import importlib

    import mlx.core as mx

    generate = importlib.import_module("quantref_mlx.generate")
    monkeypatch.setattr(generate, "persistent_supported", lambda model, cache: None)
    monkeypatch.setattr(generate, "PersistentStep", _FakeStep)
    vocab = model.args.vocab_size
    cache = model.make_cache("fp16")
    mx.eval(model.forward([i % 60 + 1 for i in range(250)], cache, last_only=True), cache.state())
    dec = generate.Decoder(model, cache, generate.greedy, persistent=True, steps=steps)
    y, t = mx.array([3], mx.uint32), 3
    for n in range(20):
        y = dec(y)
        t = f(t, 250 + n, vocab)
        assert dec.check(y.item()) == t
    assert cache.length == 270 and cache.capacity >= 270


def test_a_failed_launch_is_reported_with_its_own_reason(model, monkeypatch):
    """Generation starts the next launch before it reads a token; when the token read is -1 (its
    launch failed: here a barrier that waited too long), the launch after it has failed too, from
    that -1 (a token outside the vocabulary); check() gives the first launch's reason."""
    import importlib

    import mlx.core as mx

    generate = importlib.import_module("quantref_mlx.generate")
    monkeypatch.setattr(generate, "persistent_supported", lambda model, cache: None)
    monkeypatch.setattr(generate, "PersistentStep", _FakeStep)
    monkeypatch.setattr(_FakeStep, "fail_at", 8)
    cache = model.make_cache("fp16")
    mx.eval(model.forward([1, 2, 3, 4, 5], cache, last_only=True), cache.state())
    dec = generate.Decoder(model, cache, generate.greedy, persistent=True)
    y, read = mx.array([9], mx.uint32), []
    with pytest.raises(pd.DecodeKernelError, match="grid barrier"):
        for _ in range(8):  # as stream_generate runs the step
            nxt = dec(y)
            mx.async_eval(nxt)
            read.append(dec.check(y.item()))
            y = nxt
    assert len(read) == 4  # the tokens of positions 5, 6 and 7 (and the prompt's 9) were read
