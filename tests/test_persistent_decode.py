"""The persistent decode step's host side, on any machine (the kernel itself:
tests/test_persistent_decode_gpu.py, on a CUDA GPU): bad options are clear errors at
construction, and where no CUDA GPU is, ``supported`` says why instead of a launch failing."""

from __future__ import annotations

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
    (dict(row_keys=-1), "row_keys"), (dict(row_unroll=0), "row_unroll")])
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
