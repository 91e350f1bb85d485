"""Text generation with the NumPy oracle, in the shape of mlx-lm's ``generate`` /
``stream_generate``.

``stream_generate(model, prompt, ...)`` yields a :class:`GenerationResponse` per new token, whose
``text`` is the new text that token completed (a multi-byte character split over tokens is
held back until it is whole); ``generate(...)`` returns the whole completion. The prompt is
prefilled in chunks, then one token is decoded at a time against the KV cache. Sampling: greedy
at ``temp=0``, otherwise temperature, then top-k, then top-p (nucleus), then a draw from a
seeded generator. ``quantref_mlx.generate`` is the same loop in MLX, one ``mx.eval`` per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from .model import Model
    from .tokenizer import Tokenizer

__all__ = ["GenerationResponse", "SamplerArgs", "encode_prompt", "generate", "sample",
           "stream_generate"]


@dataclass(frozen=True)
class SamplerArgs:
    """How the next token is chosen from the logits."""

    temp: float = 0.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens (0: all)

    def __post_init__(self) -> None:
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


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


def encode_prompt(tokenizer: "Tokenizer", prompt: str | Sequence[int], chat: bool) -> list[int]:
    """Token ids of ``prompt``: ids pass through; text is rendered with the model's chat
    template first when ``chat`` (and then special-token text in it is parsed)."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True)
        bos = tokenizer.tokens[tokenizer.bos_id] if tokenizer.bos_id is not None else None
        # a template that writes BOS itself must not get a second one
        add_special = not (bos and text.startswith(bos))
        return tokenizer.encode(text, add_special=add_special, parse_special=True)
    return tokenizer.encode(prompt, add_special=True)


def sample(logits: np.ndarray, args: SamplerArgs, rng: np.random.Generator) -> int:
    """Choose a token from ``logits float32 [vocab]``."""
    if args.temp == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / args.temp
    if args.top_k and args.top_k < z.size:
        kth = np.partition(z, -args.top_k)[-args.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if args.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, args.top_p)) + 1]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def stream_generate(
    model: "Model",
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    chat: bool = False,
    kv: str = "fp32",
    prefill_step: int = 256,
    **cache_options: Any,
) -> Iterator[GenerationResponse]:
    """Yield one :class:`GenerationResponse` per generated token; stop at an end-of-generation
    token (it is yielded, with empty text, and ``finish_reason="stop"``) or after
    ``max_tokens`` (``finish_reason="length"``)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    sampler = SamplerArgs(temp, top_p, top_k)
    tok = model.tokenizer
    ids = encode_prompt(tok, prompt, chat)
    if not ids:
        raise ValueError("the prompt is empty (no tokens)")
    if len(ids) + max_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                         f"model's context length {model.args.max_seq_len}")
    rng = np.random.default_rng(seed)
    cache = model.make_cache(kv, **cache_options)

    start = time.perf_counter()
    for s in range(0, len(ids), prefill_step):
        logits = model.forward(ids[s:s + prefill_step], cache, last_only=True)
    prompt_s = time.perf_counter() - start
    prompt_tps = len(ids) / prompt_s

    decoder = tok.incremental_decoder()
    start = time.perf_counter()
    for n in range(1, max_tokens + 1):
        token = sample(logits[-1], sampler, rng)
        eog = token in tok.eog_ids
        text = "" if eog else decoder.decode(tok.token_to_bytes(token))
        finish = "stop" if eog else ("length" if n == max_tokens else None)
        if finish == "length":
            text += decoder.decode(b"", final=True)
        yield GenerationResponse(text=text, token=token, prompt_tokens=len(ids),
                                 prompt_tps=prompt_tps, generation_tokens=n,
                                 generation_tps=n / (time.perf_counter() - start),
                                 finish_reason=finish)
        if finish:
            return
        logits = model.forward([token], cache, last_only=True)


def generate(model: "Model", prompt: str | Sequence[int], max_tokens: int = 256,
             verbose: bool = False, **kwargs: Any) -> str:
    """The whole completion of ``prompt`` as text (``verbose`` streams it to stdout and ends
    with the prompt and generation speeds)."""
    text, last = [], None
    for last in stream_generate(model, prompt, max_tokens, **kwargs):
        text.append(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\n\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s; "
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s")
    return "".join(text)
