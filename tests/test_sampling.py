"""Samplers as llama.cpp defines them (src/llama-sampler.cpp, common/sampling.cpp): each stage's
invariants as hypothesis properties, llama.cpp's random stream against libstdc++, and the same
seed giving the same tokens on the NumPy and MLX backends."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import quantref
from quantref.cli import main
from quantref.generate import (SamplerArgs, SamplerRNG, apply_penalties, candidates, descending,
                               sample)
from quantref.testing import write_tiny_llama

mx = pytest.importorskip("mlx.core")
import quantref_mlx  # noqa: E402

mg = importlib.import_module("quantref_mlx.generate")  # quantref_mlx.generate is the function

# Logits drawn from a few values make ties common (the cases where rules differ); the wide
# range makes exp() underflow for some tokens.
few_values = st.sampled_from([-30.0, -2.5, -1.0, 0.0, 0.5, 1.0, 3.0])
logits_st = st.one_of(
    arrays(np.float32, st.integers(1, 40), elements=few_values),
    arrays(np.float32, st.integers(1, 40),
           elements=st.floats(-20, 20, width=32, allow_subnormal=False)))
PROPS = settings(max_examples=150, deadline=None)


# libstdc++ 12 (Debian g++ 12.2.0): tests/data/sampling/llama_rng.cpp, the stream of
# llama.cpp's dist sampler for these seeds
LIBSTDCXX_DRAWS = {
    0: [0.59284461651668263, 0.84426574425659828, 0.85794561998982988, 0.84725173738433124,
        0.62356369649610832],
    1: [0.99718480823026556, 0.93255736136816547, 0.128124447772306, 0.99904051546527362,
        0.23608897629816922],
    42: [0.79654298428784598, 0.18343478789336848, 0.77969099761266125, 0.59685016158005655,
         0.44583275754843343],
    1234: [0.49766366630595166, 0.81783844288953322, 0.61211189358442275, 0.77135991905474999,
           0.86066977348643725],
    4294967294: [0.10184899170898529, 0.94789751258733013, 0.82893340139475558,
                 0.37232930669741121, 0.5176980985702806],
}


@pytest.mark.parametrize("seed", sorted(LIBSTDCXX_DRAWS))
def test_the_random_stream_is_llama_cpps(seed):
    rng = SamplerRNG(seed)
    assert [rng.uniform() for _ in range(5)] == LIBSTDCXX_DRAWS[seed]  # bit for bit
    assert SamplerRNG(seed + 2 ** 32).uniform() == LIBSTDCXX_DRAWS[seed][0]  # uint32_t(seed)


def _chain_cases():
    data = Path(__file__).parent / "data" / "sampling"
    meta = json.loads((data / "llama_cpp_chain.json").read_text())
    with np.load(data / "llama_cpp_chain.npz") as z:
        return [(m, z[f"logits_{i}"]) for i, m in enumerate(meta)]


CHAIN_CASES = _chain_cases()
_ARG_NAMES = ("temp", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
              "frequency_penalty", "presence_penalty")


@pytest.mark.parametrize("i", range(len(CHAIN_CASES)))
def test_tokens_are_llama_cpps(i):
    """llama.cpp's own chain (src/llama-sampler.cpp, tests/data/sampling/make_golden.py) on the
    same logits, settings, history and seed drew these tokens; so do both backends, bit for bit
    (the logits have no ties, where llama.cpp's order is its sort's)."""
    case, logits = CHAIN_CASES[i]
    args = SamplerArgs(**{k: case[k] for k in _ARG_NAMES})
    rng, history = SamplerRNG(case["seed"]), list(case["history"])
    got = []
    for _ in range(case["steps"]):
        got.append(sample(logits, args, rng, history))
        history.append(got[-1])
    assert got == case["llama_cpp_tokens"]
    device = mg.make_sampler(args, SamplerRNG(case["seed"]), case["history"])
    assert [device(mx.array(logits)[None]).item() for _ in range(case["steps"])] == got


def test_top_k_keeps_exactly_k_the_issue_case():
    """Issue 10: logits [3, 3, 3, 0], top_k = 1 sampled among three tokens; llama.cpp keeps one
    (std::partial_sort keeps the first maximum at k = 1: token 0)."""
    logits = np.array([3, 3, 3, 0], np.float32)
    ids, _ = candidates(logits, SamplerArgs(top_k=1))
    assert ids.tolist() == [0]
    rng = SamplerRNG(5)
    assert {sample(logits, SamplerArgs(temp=1.0, top_k=1), rng) for _ in range(100)} == {0}
    s = mg.make_sampler(SamplerArgs(temp=1.0, top_k=1), SamplerRNG(5))
    assert {s(mx.array(logits)[None]).item() for _ in range(50)} == {0}
    ids, _ = candidates(logits, SamplerArgs(top_k=2))
    assert ids.tolist() == [0, 1]


@PROPS
@given(logits_st, st.integers(1, 50))
def test_top_k_properties(logits, k):
    ids, z = candidates(logits, SamplerArgs(top_k=k))
    n = min(k, logits.size)
    assert ids.size == n == np.unique(ids).size  # exactly k distinct tokens
    np.testing.assert_array_equal(z, logits[ids])
    dropped = np.setdiff1d(np.arange(logits.size), ids)
    if dropped.size:
        assert z.min() >= logits[dropped].max()  # nothing dropped beats anything kept
        # a tie across the cut goes to the lower token ids
        tied = np.flatnonzero(logits == z.min())
        assert set(ids[z == z.min()]) == set(tied[: int((z == z.min()).sum())])
    # llama.cpp's order: descending, equal logits by token id
    assert all((z[i] > z[i + 1]) or (z[i] == z[i + 1] and ids[i] < ids[i + 1])
               for i in range(n - 1))


@PROPS
@given(logits_st, st.floats(0.01, 1.0))
def test_top_p_keeps_the_shortest_prefix_reaching_p(logits, top_p):
    ids, z = candidates(logits, SamplerArgs(top_p=top_p))
    if top_p >= 1.0:  # llama.cpp's top-p returns at once for p >= 1: every token, unsorted
        assert sorted(ids.tolist()) == list(range(logits.size))
        return
    order = descending(logits)
    assert ids.tolist() == order[: ids.size].tolist()  # a prefix of the sorted tokens
    p = np.exp(logits.astype(np.float64) - logits.max())
    mass = np.cumsum((p / p.sum())[order])
    # float32 probabilities summed in float32 (as llama.cpp) over <= 40 terms: the running sum
    # is within 40 * 2**-23 of the exact one
    tol = 40 * 2.0 ** -23
    if ids.size < logits.size:
        assert mass[ids.size - 1] >= top_p - tol  # reaches p ...
    if ids.size > 1:
        assert mass[ids.size - 2] < top_p + tol  # ... and one token fewer does not


@PROPS
@given(logits_st, st.floats(0.001, 1.0))
def test_min_p_keeps_tokens_at_least_p_times_the_top(logits, min_p):
    ids, z = candidates(logits, SamplerArgs(min_p=min_p))
    assert int(np.argmax(logits)) in ids and np.all(np.diff(ids) > 0)  # unsorted: id order
    ratio = np.exp(logits.astype(np.float64) - logits.max())  # p_i / p_max
    kept = np.isin(np.arange(logits.size), ids)
    # llama.cpp compares logits in float32 (max + logf(p)); a ratio within a few float32 ulps
    # of the logit scale (|logit| <= 30) of min_p may fall either way
    near = np.abs(np.log(ratio) - np.log(min_p)) < 1e-5 * 64
    assert np.all(kept[~near] == (ratio >= min_p)[~near])


def _penalties_as_llama_cpp(logits, args, history):
    """llama_sampler_penalties_{accept,apply} transcribed: a ring buffer of the last n accepted
    tokens with a count per token, then one pass over the candidates."""
    counts: dict[int, int] = {}
    ring: list[int] = []
    n = len(history) if args.repeat_last_n == -1 else args.repeat_last_n
    for t in history:
        counts[t] = counts.get(t, 0) + 1
        if len(ring) >= n:
            old = ring.pop(0)
            counts[old] -= 1
            if counts[old] == 0:
                del counts[old]
        ring.append(t)
    out = logits.copy()
    f32 = np.float32
    for t, c in counts.items():
        x = out[t]
        x = x * f32(args.repeat_penalty) if x <= 0 else x / f32(args.repeat_penalty)
        out[t] = x - (f32(c) * f32(args.frequency_penalty)
                      + f32(c > 0) * f32(args.presence_penalty))
    return out


@PROPS
@given(logits_st, st.data(), st.floats(0.5, 3.0), st.integers(-1, 12),
       st.sampled_from([0.0, 0.25, 1.0]), st.sampled_from([0.0, 0.5]))
def test_penalties_are_llama_cpps(logits, data, rp, last_n, freq, presence):
    history = data.draw(st.lists(st.integers(0, logits.size - 1), max_size=30))
    args = SamplerArgs(repeat_penalty=rp, repeat_last_n=last_n, frequency_penalty=freq,
                       presence_penalty=presence)
    got = apply_penalties(logits, args, history)
    if not args.penalized:  # llama.cpp's is_disabled: the logits untouched
        np.testing.assert_array_equal(got, logits)
        return
    np.testing.assert_array_equal(got, _penalties_as_llama_cpp(logits, args, history))
    window = set(history if last_n == -1 else history[-last_n:])
    outside = [t for t in range(logits.size) if t not in window]
    np.testing.assert_array_equal(got[outside], logits[outside])  # only the window's tokens
    if rp >= 1:
        assert np.all(got <= logits)  # a penalty never makes a token more likely
    # the same on the device
    s = mg.Sampler(args, SamplerRNG(0), history)
    np.testing.assert_array_equal(np.array(mg.apply_penalties(mx.array(logits), args, s.window)),
                                  got)


def _draw_is_at_a_boundary(logits, args, seed, history, step):
    """Whether draw ``step`` of ``seed`` lands within float32 rounding of a boundary between
    two candidates (where a float32 running sum, as on the device, may pick the neighbour)."""
    rng = SamplerRNG(seed)
    for _ in range(step + 1):
        u = rng.uniform()
    ids, z = candidates(apply_penalties(logits, args, history), args)
    p = np.exp((z / np.float32(args.temp)).astype(np.float64) - (z / np.float32(args.temp)).max())
    run = np.cumsum(p)
    return bool(np.min(np.abs(run - run[-1] * u)) < 1e-5 * run[-1])


@PROPS
@given(logits_st, st.integers(0, 2 ** 32 - 1), st.sampled_from([0.0, 0.3, 1.0, 2.5]),
       st.integers(0, 5), st.sampled_from([1.0, 0.9, 0.5]), st.sampled_from([0.0, 0.05, 0.5]),
       st.sampled_from([1.0, 1.3]), st.lists(st.integers(0, 3), max_size=6))
def test_sampled_tokens_agree_across_backends(logits, seed, temp, top_k, top_p, min_p, rp, hist):
    args = SamplerArgs(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=rp,
                       repeat_last_n=4)
    hist = [t % logits.size for t in hist]
    rng, history = SamplerRNG(seed), list(hist)
    device = mg.make_sampler(args, SamplerRNG(seed), hist)
    for step in range(3):
        t = sample(logits, args, rng, history)
        ids, _ = candidates(apply_penalties(logits, args, history), args)
        assert t in ids  # only a surviving candidate is drawn
        if temp == 0:
            assert t == int(np.argmax(apply_penalties(logits, args, history)))
        d = device(mx.array(logits)[None]).item()
        assert d == t or (temp > 0 and _draw_is_at_a_boundary(logits, args, seed, history, step))
        history.append(t)


def test_draws_follow_the_softmax():
    """20000 draws at temperature 0.7 among top-k = 4: the frequencies of the softmax of
    logits / 0.7 over those four (each within 5 standard deviations of its binomial count)."""
    logits = np.array([0.1, 2.0, -1.0, 1.5, 0.7, 1.9, -3.0], np.float32)
    args, rng, n = SamplerArgs(temp=0.7, top_k=4), SamplerRNG(123), 20000
    counts = np.bincount([sample(logits, args, rng) for _ in range(n)], minlength=logits.size)
    top = np.argsort(-logits)[:4]
    p = np.zeros(logits.size)
    p[top] = np.exp(logits[top] / 0.7) / np.exp(logits[top] / 0.7).sum()
    assert np.all(np.abs(counts - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1e-9), (counts, n * p)


def test_invalid_sampler_arguments():
    for bad in (dict(min_p=-0.1), dict(min_p=1.5), dict(repeat_penalty=0.0),
                dict(repeat_last_n=-2), dict(top_k=-1), dict(frequency_penalty=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplerArgs(**bad)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("s") / "tiny.gguf", dim=128, n_heads=2,
                            n_kv_heads=1, hidden_dim=128, context_length=512, seed=11)


def test_same_seed_same_tokens_on_both_backends(tiny_path):
    """The tiny model's logits agree between the backends (greedy parity in test_generate);
    with the same seed and sampler the sampled tokens are the same too."""
    m, mm = quantref.load(tiny_path), quantref_mlx.load(tiny_path, weights="float")
    kw = dict(temp=0.9, top_k=30, top_p=0.95, min_p=0.02, repeat_penalty=1.3, repeat_last_n=8,
              chat=False)
    runs = {}
    for seed in (1, 2, 3):
        a = [r.token for r in quantref.stream_generate(m, "the river", 16, seed=seed, **kw)]
        b = [r.token for r in quantref_mlx.stream_generate(mm, "the river", 16, seed=seed, **kw)]
        c = [r.token for r in quantref_mlx.stream_generate(mm, "the river", 16, seed=seed,
                                                           compiled=False, **kw)]
        assert a == b == c
        runs[seed] = a
    assert len({tuple(v) for v in runs.values()}) > 1  # the seed matters


def test_cli_generate_takes_the_new_samplers(tiny_path, capsys):
    m = quantref.load(tiny_path)
    kw = dict(temp=0.8, min_p=0.1, repeat_penalty=1.5, repeat_last_n=6, seed=4, chat=False)
    want = quantref.generate(m, "the river", 10, **kw)
    assert main(["generate", "--model", str(tiny_path), "--backend", "numpy", "--no-chat",
                 "-p", "the river", "-n", "10", "--temp", "0.8", "--min-p", "0.1",
                 "--repeat-penalty", "1.5", "--repeat-last-n", "6", "--seed", "4"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["generate", "--model", str(tiny_path), "-p", "x", "--min-p", "2"]) == 1
    assert "min_p" in capsys.readouterr().err
