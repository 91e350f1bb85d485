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

__all__ = ["GenerationResponse", "Responder", "SamplerArgs", "collect", "encode_prompt",
           "generate", "prompt_ids", "sample", "stream_generate"]


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


def prompt_ids(model, prompt: str | Sequence[int], max_tokens: int, chat: bool) -> list[int]:
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
    seed: int | None = None,
    chat: bool = False,
    kv: str = "fp32",
    prefill_step: int = 256,
    **cache_options: Any,
) -> Iterator[GenerationResponse]:
    """Yield one :class:`GenerationResponse` per generated token; stop at an end-of-generation
    token (it is yielded, with empty text, and ``finish_reason="stop"``) or after
    ``max_tokens`` (``finish_reason="length"``)."""
    sampler = SamplerArgs(temp, top_p, top_k)
    ids = prompt_ids(model, prompt, max_tokens, chat)
    rng = np.random.default_rng(seed)
    cache = model.make_cache(kv, **cache_options)

    start = time.perf_counter()
    for s in range(0, len(ids), prefill_step):
        logits = model.forward(ids[s:s + prefill_step], cache, last_only=True)
    respond = Responder(model.tokenizer, len(ids), len(ids) / (time.perf_counter() - start),
                        max_tokens)
    while True:
        response = respond(sample(logits[-1], sampler, rng))
        yield response
        if response.finish_reason:
            return
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
