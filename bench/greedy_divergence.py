"""Greedy decoding of the default model with a turbo_kv cache, quantref_mlx against the NumPy
oracle, and, where their tokens part, why.

    python bench/greedy_divergence.py [--kv turbo_kv_4b] [--steps 64] [--decoder auto|plain]

``auto`` is what generation runs (the fused CUDA step on a CUDA GPU, the plain graph
elsewhere); ``plain`` forces the plain graph. At the first step where the tokens differ it
reports the oracle's top-2 logit margin there; how many stored key blocks differ between the
oracle's cache and MLX's, over every layer and position decoded so far, and how many
codebook indices; and, for each differing index, how far the oracle's ``t = r * s`` (the
rotated, scaled key element that picks the centroid) lay from the boundary between the two
centroids, relative to the boundary. Keys computed by another order of float32 sums differ in
their last bits (~1e-6 relative after 30 layers): an index within about that distance of a
boundary can take either side, which moves one score by a centroid gap and can flip a token
whose margin is small. Flips feed forward: one changes a layer's output by ~1e-3, so the
next layers' keys differ by more than their last bits and flip many more indices. What
explains a divergence is therefore the *first* flips, in the lowest layer that has any: their
distances are reported separately.
"""

from __future__ import annotations

import argparse

import numpy as np

import quantref
from quantref import turbo_kv as tk


def oracle_run(model, prompt: list[int], kind: str, steps: int):
    """Tokens, per-step top-2 margins, the cache and every layer's float keys [n_kv, L, hd]."""
    cache = model.make_cache(kind)
    keys: dict[int, list[np.ndarray]] = {}
    append = cache.append

    def recording(layer, k, v):
        keys.setdefault(layer, []).append(np.array(k, np.float32))
        append(layer, k, v)

    cache.append = recording
    logits = model.forward(prompt, cache)[-1]
    tokens, margins = [], []
    for _ in range(steps):
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        tokens.append(int(np.argmax(logits)))
        logits = model.forward([tokens[-1]], cache)[-1]
    return tokens, margins, cache, {l: np.concatenate(v, axis=1) for l, v in keys.items()}


def mlx_run(prompt: list[int], kind: str, steps: int, decoder: str):
    import mlx.core as mx

    import quantref_mlx
    from quantref_mlx.generate import Decoder

    m = quantref_mlx.load()
    cache = m.make_cache(kind)
    logits = m.forward(prompt, cache, last_only=True)
    mx.eval(logits, cache.state())
    dec = Decoder(m, cache, lambda z: mx.argmax(z, axis=-1),
                  fused=False if decoder == "plain" else None,
                  compiled=False if decoder == "plain" else None)
    y = mx.argmax(logits, axis=-1)
    tokens = []
    for _ in range(steps):
        tokens.append(int(y.item()))
        y = dec(y)
    mx.eval(y)
    return tokens, cache, dec


def boundary_distance(x: np.ndarray, kind: str, i: int, a: int, b: int) -> float:
    """For one key chunk ``x [cd]`` (float32), element ``i``: |t - m| / |m| with t the oracle's
    rotated, scaled element and m the midpoint of centroids a and b (inf when not adjacent)."""
    if abs(a - b) != 1:
        return float("inf")
    x = x.astype(np.float32)
    norm = np.sqrt(np.cumsum(x * x, dtype=np.float32)[-1])
    inv = np.float32(1) / norm if norm > 1e-10 else np.float32(0)
    r = tk.rotate(x * inv, x.size)
    m = np.max(np.abs(r))
    s = np.float32(tk.CENT_MAX[kind]) / (m if m >= 1e-10 else np.float32(1))
    t = r[i] * s
    c = tk.CENTROIDS[kind]
    mid = (float(c[a]) + float(c[b])) / 2
    return abs(float(t) - mid) / abs(mid) if mid else abs(float(t))


def compare(kind: str = "turbo_kv_4b", steps: int = 64, decoder: str = "auto",
            prompt: str = "The capital of France is Paris. The capital of Germany is") -> dict:
    """Both runs and their comparison: tokens, the first divergence, its margin, the stored
    blocks and indices that differ, and the first flips (lowest layer) with their relative
    distances from the centroid boundary."""
    ref = quantref.load()
    ids = ref.tokenizer.encode(prompt)
    want, margins, ref_cache, keys = oracle_run(ref, ids, kind, steps)
    got, cache, dec = mlx_run(ids, kind, steps, decoder)
    out = dict(kind=kind, decoder="fused" if getattr(dec, "fused", False) else "plain",
               want=want, got=got, first=None)
    if got == want:
        return out
    first = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
    n = len(ids) + first  # positions both caches hold from the same tokens
    a = ref.args
    nb = tk.bits(kind)
    blocks_diff = idx_diff = blocks_all = 0
    first_layer, first_distances = None, []
    for layer in range(a.n_layers):
        ours = np.array(cache.stored(layer)[0][0])[:, :n]  # [n_kv, n, n_chunks, bb]
        theirs = np.asarray(ref_cache.stored(layer)[0][0])[:, :n]
        blocks_all += ours.shape[0] * ours.shape[1] * ours.shape[2]
        differ = np.argwhere(np.any(ours != theirs, axis=-1))
        blocks_diff += len(differ)
        for h, p, c in differ:
            cd = min(tk.BLOCK, a.head_dim - c * tk.BLOCK)
            i1 = tk.unpack_indices(ours[h, p, c, tk.HEADER_BYTES:], nb, cd)
            i2 = tk.unpack_indices(theirs[h, p, c, tk.HEADER_BYTES:], nb, cd)
            x = keys[layer][h, p, c * tk.BLOCK:c * tk.BLOCK + cd]
            for i in np.flatnonzero(i1 != i2):
                idx_diff += 1
                if first_layer in (None, layer):
                    first_layer = layer
                    first_distances.append(
                        (boundary_distance(x, kind, int(i), int(i2[i]), int(i1[i])), int(p)))
            if np.array_equal(i1, i2) and first_layer in (None, layer):
                first_layer = layer  # the header only: the norm's or the scale's fp16
                first_distances.append((header_distance(x, kind, ours[h, p, c], theirs[h, p, c]),
                                        int(p)))
    out.update(first=first, margin=margins[first], n_positions=n, blocks_all=blocks_all,
               blocks_diff=blocks_diff, idx_diff=idx_diff,
               idx_all=blocks_all * min(tk.BLOCK, a.head_dim), first_layer=first_layer,
               first_distances=sorted(first_distances))
    return out


def header_distance(x: np.ndarray, kind: str, ours: np.ndarray, theirs: np.ndarray) -> float:
    """Where the blocks differ in a header field only: how far the oracle's float32 norm (or
    scale) lay from the truncating-fp16 step that one side crossed, relative."""
    x = x.astype(np.float32)
    norm = np.sqrt(np.cumsum(x * x, dtype=np.float32)[-1])
    r = tk.rotate(x * (np.float32(1) / norm), x.size)
    s = np.float32(tk.CENT_MAX[kind]) / np.max(np.abs(r))
    value = norm if not np.array_equal(ours[:2], theirs[:2]) else s
    lo = float(tk.f16_decode(tk.f16_trunc(np.array([value], np.float32)))[0])
    step = 2.0 ** (np.floor(np.log2(lo)) - 10)  # one fp16 step at lo's exponent
    return min(float(value) - lo, lo + step - float(value)) / float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv", default="turbo_kv_4b")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--decoder", default="auto", choices=("auto", "plain"))
    args = ap.parse_args()
    for kind in args.kv.split(","):
        r = compare(kind, args.steps, args.decoder)
        agree = sum(g == w for g, w in zip(r["got"], r["want"]))
        print(f"{kind}, decoder {r['decoder']}: {agree} of {args.steps} greedy tokens agree")
        if r["first"] is None:
            continue
        print(f"  first divergence at step {r['first']}: oracle {r['want'][r['first']]}, MLX "
              f"{r['got'][r['first']]}; oracle top-2 margin {r['margin']:.4g}")
        print(f"  before it: {r['blocks_diff']} of {r['blocks_all']} key blocks differ, "
              f"{r['idx_diff']} of {r['idx_all']} codebook indices")
        print(f"  the first flips, layer {r['first_layer']}: {len(r['first_distances'])}; the "
              f"oracle's element from the centroid boundary (relative; position):")
        for dist, pos in r["first_distances"][:8]:
            print(f"    {dist:.2e}  ({pos})")


if __name__ == "__main__":
    main()
