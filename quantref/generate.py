"""Text generation with the NumPy oracle, in the shape of mlx-lm's ``generate`` /
``stream_generate``.

``stream_generate(model, prompt, ...)`` yields a :class:`GenerationResponse` per new token, whose
``text`` is the new text that token completed (a multi-byte character split over tokens is
held back until it is whole); ``generate(...)`` returns the whole completion. The prompt is
prefilled in chunks, then one token is decoded at a time against the KV cache. As in mlx-lm, a
text prompt is sent as one user message through the model's chat template when the model has one
(``chat=False``: the text as it is). Sampling is llama.cpp's default chain, in its order:
repetition penalties, top-k, top-p, min-p, temperature, then a draw from llama.cpp's seeded
``std::mt19937`` stream (greedy at ``temp=0``); see :class:`SamplerArgs`.
``quantref_mlx.generate`` is the same loop in MLX, one ``mx.eval`` per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from .model import Model
    from .tokenizer import Tokenizer

__all__ = ["GenerationResponse", "Responder", "SamplerArgs", "SamplerRNG", "apply_penalties",
           "candidates", "collect", "descending", "encode_prompt", "generate", "prompt_ids",
           "sample", "stream_generate"]


@dataclass(frozen=True)
class SamplerArgs:
    """How the next token is chosen from the logits: llama.cpp's default sampler chain, in its
    order (``common/common.h``, ``common_params_sampling::samplers``, the stages quantref has):

    1. repetition penalties over the last ``repeat_last_n`` tokens (prompt included),
    2. top-k, 3. top-p, 4. min-p (all three on the penalized logits at temperature 1),
    5. temperature, 6. a draw (``temp=0``: greedy, the penalized logits' argmax).

    mlx-lm (``mlx_lm/sample_utils.py``) also penalizes first (logits processors) and filters
    before the temperature, but filters top-p, min-p, then top-k, each on the whole
    vocabulary's log-probabilities: where the two differ (top-k with top-p: llama.cpp
    renormalizes the k survivors, so its top-p keeps fewer), quantref is llama.cpp's
    (``docs/sampling.md``). Defaults are "off" for every stage except ``repeat_last_n``,
    llama.cpp's default window (it matters only once a penalty is set).
    """

    temp: float = 0.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep exactly the k most likely tokens (0: all)
    min_p: float = 0.0  # keep tokens whose probability is >= min_p * the largest (0: off)
    repeat_penalty: float = 1.0  # llama.cpp --repeat-penalty (1: off)
    repeat_last_n: int = 64  # the penalty window in tokens (0: no penalty, -1: all tokens)
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the window
    presence_penalty: float = 0.0  # subtracted once if the token occurs in the window

    def __post_init__(self) -> None:
        if not self.temp >= 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repeat_penalty > 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")

    @property
    def penalized(self) -> bool:
        """Whether the penalty stage changes anything (llama.cpp's ``is_disabled``, negated)."""
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or
                                            self.frequency_penalty != 0.0 or
                                            self.presence_penalty != 0.0)

    def window(self, history: Sequence[int]) -> Sequence[int]:
        """The tokens the penalties look at: the last ``repeat_last_n`` of ``history``."""
        if not self.penalized:
            return history[:0]
        return history if self.repeat_last_n == -1 else history[-self.repeat_last_n:]


class SamplerRNG:
    """The random stream of llama.cpp's ``dist`` sampler: ``std::mt19937`` seeded with a 32-bit
    seed, read through ``std::uniform_real_distribution<double>(0, 1)``, which (libstdc++'s
    ``generate_canonical<double, 53>``) combines two 32-bit outputs ``a, b`` into
    ``(a + b * 2**32) / 2**64`` (and 1.0 into the largest double below 1). One draw per sampled
    token, greedy included, as llama.cpp's chain draws once per token.

    ``seed=None`` picks a random 32-bit seed (llama.cpp's ``LLAMA_DEFAULT_SEED``); other seeds
    are taken modulo 2**32, as C++'s conversion to ``uint32_t`` takes them. Both backends use
    this generator on the host, so the same seed gives the same draws on both.
    """

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        self.seed = int(seed) % 2 ** 32
        # std::mt19937::seed: Knuth's init_genrand; numpy's MT19937 then runs the same twister
        key = [self.seed]
        for i in range(1, 624):
            key.append((1812433253 * (key[-1] ^ (key[-1] >> 30)) + i) & 0xFFFFFFFF)
        self._mt = np.random.MT19937(0)
        self._mt.state = {"bit_generator": "MT19937",
                          "state": {"key": np.array(key, np.uint32), "pos": 624}}

    def uniform(self) -> float:
        """The next draw in [0, 1), as a Python float (a double)."""
        a, b = (float(x) for x in self._mt.random_raw(2))
        u = (a + b * 4294967296.0) / 18446744073709551616.0
        return u if u < 1.0 else float(np.nextafter(1.0, 0.0))


@dataclass
class GenerationResponse:
    """One step of ``stream_generate`` (the fields of mlx-lm's response of the same name)."""

    text: str  # new text completed by this token
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str | None = None  # "stop" (end-of-generation token), "length", or None
    peak_memory: float = 0.0  # GB, where the backend can tell


def encode_prompt(tokenizer: "Tokenizer", prompt: str | Sequence[int],
                  chat: bool | None = None) -> list[int]:
    """Token ids of ``prompt``: ids pass through; text is rendered as one user message through
    the model's chat template first (and then special-token text in it is parsed) when ``chat``
    is true, or when it is ``None`` (the default) and the model has a template: mlx-lm's
    default, which an instruct model needs (on SmolLM2-135M-Instruct a raw prompt is mostly
    ended at once). ``chat=False`` encodes the text as it is, BOS added when the model asks.

    Raises :class:`quantref.tokenizer.ChatTemplateError` for ``chat=True`` on a model without
    a template."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if chat is None:
        chat = tokenizer.chat_template is not None
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True)
        bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else None
        # a template that writes BOS itself must not get a second one
        add_special = not (bos and text.startswith(bos))
        return tokenizer.encode(text, add_special=add_special, parse_special=True)
    return tokenizer.encode(prompt, add_special=True)


def apply_penalties(logits: np.ndarray, args: SamplerArgs, history: Sequence[int]) -> np.ndarray:
    """llama.cpp's ``penalties`` sampler (``src/llama-sampler.cpp``,
    ``llama_sampler_penalties_apply``) on ``logits float32 [vocab]``: each token that occurs
    ``c > 0`` times in the window (:meth:`SamplerArgs.window`) gets ``logit * repeat_penalty``
    if ``logit <= 0`` else ``logit / repeat_penalty``, then minus ``c * frequency_penalty +
    presence_penalty``, all in float32 as there. Returns a new float32 array [vocab] (the input
    itself when nothing is penalized). Token ids outside the vocabulary are ignored."""
    window = np.asarray(args.window(history), np.int64)
    window = window[(window >= 0) & (window < logits.size)]
    if window.size == 0:
        return logits
    ids, counts = np.unique(window, return_counts=True)
    f32 = np.float32
    sel = logits[ids].astype(f32)
    sel = np.where(sel <= 0, sel * f32(args.repeat_penalty), sel / f32(args.repeat_penalty))
    sel = sel - (counts.astype(f32) * f32(args.frequency_penalty) + f32(args.presence_penalty))
    out = logits.astype(f32, copy=True)
    out[ids] = sel
    return out


def descending(z: np.ndarray, k: int | None = None) -> np.ndarray:
    """Indices of ``z`` from the largest value to the smallest, equal values in index order
    (``k``: only the first k, found by a partition and then sorted).

    llama.cpp sorts candidates with ``std::partial_sort`` (k <= 128) or a bucket pass and
    ``std::sort`` (k > 128), neither of which is stable: the C++ standard leaves the order of
    equal logits unspecified, and libstdc++'s heap select keeps, for example, tokens {1, 4, 5, 7}
    of [1, 1, 1, 1, 2, 2, 0, 2] at k = 4. quantref fixes one rule, lower token id first, which
    agrees with llama.cpp whenever no tie crosses the cut, and always at k = 1 (the first
    maximum, as greedy). Shape ``[n or k] int64``.
    """
    if k is None or k >= z.size:
        return np.argsort(-z, kind="stable")
    # the k largest and every value tied with the k-th, in index order, then sorted
    near = np.flatnonzero(z >= np.partition(z, z.size - k)[z.size - k])
    return near[np.argsort(-z[near], kind="stable")[:k]]


def candidates(logits: np.ndarray, args: SamplerArgs) -> tuple[np.ndarray, np.ndarray]:
    """Top-k, top-p and min-p of ``logits float32 [vocab]`` (already penalized), as llama.cpp
    applies them (``llama_sampler_top_k_impl``, ``_top_p_apply``, ``_min_p_apply``): the kept
    token ids ``int64 [n]`` and their logits ``float32 [n]``, in llama.cpp's order (sorted by
    :func:`descending` once top-k or top-p ran, else token-id order).

    top-k keeps exactly ``min(k, vocab)`` tokens. top-p takes the float32 softmax of the
    candidates (``exp(l - max)``, summed in order) and keeps the shortest prefix whose float32
    running sum reaches ``top_p``. min-p keeps ``logit >= max_logit + logf(min_p)`` (that is,
    probability >= min_p times the largest).
    """
    f32 = np.float32
    ids = np.arange(logits.size)
    z = logits.astype(f32, copy=False)
    if args.top_k:
        keep = descending(z, args.top_k)
        ids, z = ids[keep], z[keep]
    if args.top_p < 1.0:
        # the softmax in the candidates' current order (its float32 sum depends on it)
        p = np.exp(z - z.max())
        p /= np.cumsum(p)[-1]  # a float32 running sum, as llama_sampler_softmax_impl's loop
        if not args.top_k:
            # as llama.cpp, sort the top 256 first: a top-p set is rarely longer (same result)
            order = descending(z, 256)
            if np.cumsum(p[order])[-1] < f32(args.top_p):
                order = descending(z)
            ids, z, p = ids[order], z[order], p[order]
        reached = np.flatnonzero(np.cumsum(p) >= f32(args.top_p))
        n = reached[0] + 1 if reached.size else z.size
        ids, z = ids[:n], z[:n]
    if args.min_p > 0:
        keep = z >= z.max() + np.log(f32(args.min_p))
        ids, z = ids[keep], z[keep]
    return ids, z


def sample(logits: np.ndarray, args: SamplerArgs, rng: SamplerRNG,
           history: Sequence[int] = ()) -> int:
    """Choose a token from ``logits float32 [vocab]`` given the tokens so far (``history``,
    prompt included; only the penalties read it): :class:`SamplerArgs`' chain, then
    llama.cpp's ``dist`` draw (``llama_sampler_dist_apply``): ``p_i = expf(l_i / temp - max)``
    in float32, and the first candidate whose running double sum reaches ``u * sum(p)``, with
    ``u = rng.uniform()``. ``temp=0``: the argmax (lowest id among equal logits) and one draw
    consumed, as llama.cpp's greedy ``temp`` stage followed by ``dist``."""
    z = apply_penalties(logits, args, history)
    u = rng.uniform()
    if args.temp == 0:
        return int(np.argmax(z))
    ids, z = candidates(z, args)
    z = z / np.float32(args.temp)
    p = np.exp(z - z.max()).astype(np.float64)
    run = np.cumsum(p)  # sequential, as the double running sum there
    i = int(np.searchsorted(run, run[-1] * u, side="left"))
    return int(ids[min(i, ids.size - 1)])


def prompt_ids(model, prompt: str | Sequence[int], max_tokens: int,
               chat: bool | None = None) -> list[int]:
    """The prompt's token ids, after checking that they and ``max_tokens`` fit the model."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = encode_prompt(model.tokenizer, prompt, chat)
    if not ids:
        raise ValueError("the prompt is empty (no tokens)")
    if len(ids) + max_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                         f"model's context length {model.args.max_seq_len}")
    return ids


class Responder:
    """Turns generated tokens into :class:`GenerationResponse` s: streamed text (a character
    split over tokens waits until it is whole), counts, speeds and the finish reason."""

    def __init__(self, tokenizer: "Tokenizer", prompt_tokens: int, prompt_tps: float,
                 max_tokens: int):
        self.tok, self.max_tokens = tokenizer, max_tokens
        self.prompt_tokens, self.prompt_tps = prompt_tokens, prompt_tps
        self.decoder = tokenizer.incremental_decoder()
        self.n = 0
        self.start = time.perf_counter()

    def __call__(self, token: int, peak_memory: float = 0.0) -> GenerationResponse:
        self.n += 1
        eog = token in self.tok.eog_ids
        text = "" if eog else self.decoder.decode(self.tok.token_to_bytes(token))
        finish = "stop" if eog else ("length" if self.n == self.max_tokens else None)
        if finish == "length":
            text += self.decoder.decode(b"", final=True)
        return GenerationResponse(text=text, token=token, prompt_tokens=self.prompt_tokens,
                                  prompt_tps=self.prompt_tps, generation_tokens=self.n,
                                  generation_tps=self.n / (time.perf_counter() - self.start),
                                  finish_reason=finish, peak_memory=peak_memory)


def stream_generate(
    model: "Model",
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repeat_penalty: float = 1.0,
    repeat_last_n: int = 64,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    seed: int | None = None,
    chat: bool | None = None,
    kv: str = "fp32",
    prefill_step: int = 256,
    **cache_options: Any,
) -> Iterator[GenerationResponse]:
    """Yield one :class:`GenerationResponse` per generated token; stop at an end-of-generation
    token (it is yielded, with empty text, and ``finish_reason="stop"``) or after
    ``max_tokens`` (``finish_reason="length"``). A text prompt goes through the model's chat
    template when it has one, unless ``chat=False`` (see :func:`encode_prompt`)."""
    sampler = SamplerArgs(temp, top_p, top_k, min_p, repeat_penalty, repeat_last_n,
                          frequency_penalty, presence_penalty)
    ids = prompt_ids(model, prompt, max_tokens, chat)
    rng = SamplerRNG(seed)
    cache = model.make_cache(kv, **cache_options)

    start = time.perf_counter()
    for s in range(0, len(ids), prefill_step):
        logits = model.forward(ids[s:s + prefill_step], cache, last_only=True)
    respond = Responder(model.tokenizer, len(ids), len(ids) / (time.perf_counter() - start),
                        max_tokens)
    history = list(ids)  # the penalties' window reads the prompt too, as llama.cpp's
    while True:
        response = respond(sample(logits[-1], sampler, rng, history))
        yield response
        if response.finish_reason:
            return
        history.append(response.token)
        logits = model.forward([response.token], cache, last_only=True)


def generate(model: "Model", prompt: str | Sequence[int], max_tokens: int = 256,
             verbose: bool = False, **kwargs: Any) -> str:
    """The whole completion of ``prompt`` as text (``verbose`` streams it to stdout and ends
    with the prompt and generation speeds)."""
    return collect(stream_generate(model, prompt, max_tokens, **kwargs), verbose)


def collect(responses: Iterator[GenerationResponse], verbose: bool = False) -> str:
    """The text of a stream of responses (``verbose``: printed as it comes, then the speeds)."""
    text, last = [], None
    for last in responses:
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\n\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s; "
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s")
    return "".join(text)
