"""quantref.testing: the tiny random Llama GGUFs look like real llama.cpp files, are
deterministic, and keep activations O(1)."""

from __future__ import annotations

import gguf as gguf_py
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from tokenizers.pre_tokenizers import ByteLevel

from quantref import gguf, testing
from quantref.testing import (
    BYTE_TO_UNICODE, FIRST_BYTE_ID, FIRST_MERGED_ID, MERGED_TOKENS, MERGES, TOKEN_TYPES, TOKENS,
    VOCAB_SIZE, write_tiny_llama,
)


def test_vocabulary_layout():
    assert VOCAB_SIZE == len(TOKENS) == len(TOKEN_TYPES) == 3 + 256 + len(MERGES)
    assert TOKENS[:3] == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert TOKEN_TYPES[:3] == (3, 3, 3) and set(TOKEN_TYPES[3:]) == {1}
    # GPT-2's byte symbols: the same 256 characters as the tokenizers library's ByteLevel
    # alphabet, in byte order, with the well-known images of space, newline and 'A'.
    assert set(BYTE_TO_UNICODE.values()) == set(ByteLevel.alphabet())
    assert [TOKENS[FIRST_BYTE_ID + b] for b in range(256)] == [BYTE_TO_UNICODE[b] for b in range(256)]
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ" and BYTE_TO_UNICODE[ord("\n")] == "Ċ"
    assert BYTE_TO_UNICODE[ord("A")] == "A" and BYTE_TO_UNICODE[0] == "Ā"
    assert len(set(TOKENS)) == len(TOKENS)
    # Each merge joins two tokens that exist before the merged token's id.
    ids = {t: i for i, t in enumerate(TOKENS)}
    for rank, merge in enumerate(MERGES):
        left, right = merge.split(" ")
        merged_id = FIRST_MERGED_ID + rank
        assert TOKENS[merged_id] == MERGED_TOKENS[rank] == left + right
        assert ids[left] < merged_id and ids[right] < merged_id


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_metadata_and_tensors(tiny_path):
    with gguf.read(tiny_path) as gf:
        md = gf.metadata
        assert md["general.architecture"] == "llama" and md["general.file_type"] == 0
        assert md["llama.block_count"] == 2 and md["llama.embedding_length"] == 64
        assert md["llama.attention.head_count"] == 4 and md["llama.attention.head_count_kv"] == 2
        assert md["llama.feed_forward_length"] == 160 and md["llama.context_length"] == 256
        assert md["llama.rope.dimension_count"] == 16 and md["llama.vocab_size"] == VOCAB_SIZE
        assert md["llama.rope.freq_base"] == 10000.0
        assert md["llama.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-5))
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "smollm"
        assert md["tokenizer.ggml.tokens"] == list(TOKENS)
        assert md["tokenizer.ggml.token_type"] == list(TOKEN_TYPES)
        assert md["tokenizer.ggml.merges"] == list(MERGES)
        assert md["tokenizer.ggml.bos_token_id"] == md["tokenizer.ggml.eos_token_id"] == 0
        assert md["tokenizer.ggml.add_bos_token"] is False and md["tokenizer.ggml.add_eos_token"] is False
        assert md["tokenizer.chat_template"] == testing.CHAT_TEMPLATE
        assert gf.types["tokenizer.ggml.token_type"] == (V.ARRAY, V.INT32)
        assert "output.weight" not in gf.tensors and "rope_freqs.weight" not in gf.tensors
        assert {n: t.shape for n, t in gf.tensors.items()} == testing.tiny_llama_tensor_shapes(
            n_layers=2, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=160)
        assert gf.tensors["blk.1.attn_k.weight"].shape == (2 * 16, 64)
        assert all(t.qtype == Q.F32 for t in gf.tensors.values())
    r = gguf_py.GGUFReader(tiny_path)  # gguf-py reads it too
    assert len(r.tensors) == 2 + 9 * 2


def test_options(tmp_path):
    p = write_tiny_llama(tmp_path / "o.gguf", qtype="q4_1", embedding_qtype="q8_0", tied_embeddings=False,
                         rope_freqs=True, add_bos=True, n_layers=1, dim=128, n_heads=8, n_kv_heads=8,
                         hidden_dim=256)
    with gguf.read(p) as gf:
        assert gf.metadata["general.file_type"] == 3 and gf.metadata["tokenizer.ggml.add_bos_token"] is True
        assert gf.tensors["token_embd.weight"].qtype == Q.Q8_0
        assert gf.tensors["output.weight"].qtype == Q.Q4_1 and gf.tensors["output.weight"].shape == (VOCAB_SIZE, 128)
        assert gf.tensors["blk.0.ffn_gate.weight"].qtype == Q.Q4_1
        freqs = gf.tensors["rope_freqs.weight"]
        assert freqs.shape == (128 // 8 // 2,) and freqs.qtype == Q.F32
        assert (gf.tensor("rope_freqs.weight") >= 1).all()
        assert all(t.qtype == Q.F32 for t in gf.tensors.values() if len(t.shape) == 1)
    with pytest.raises(ValueError, match="qtype must be one of"):
        write_tiny_llama(tmp_path / "x.gguf", qtype="q4_k")
    with pytest.raises(ValueError, match="n_heads"):
        write_tiny_llama(tmp_path / "x.gguf", dim=64, n_heads=3)


@pytest.mark.parametrize("qtype", sorted(testing.QTYPES))
def test_each_qtype(tmp_path, qtype):
    p = write_tiny_llama(tmp_path / f"{qtype}.gguf", qtype=qtype)
    tensor_type, file_type = testing.QTYPES[qtype]
    with gguf.read(p) as gf:
        assert gf.metadata["general.file_type"] == file_type
        assert {t.qtype for t in gf.tensors.values() if len(t.shape) == 2} == {tensor_type}
        # The stored weights are the f32 model's, through the type's reference quantizer.
        with gguf.read(write_tiny_llama(tmp_path / "ref.gguf", qtype="f32")) as ref:
            for name in ("blk.0.attn_q.weight", "token_embd.weight"):
                want = gguf_py.quants.quantize(ref.tensor(name), tensor_type)
                assert np.ascontiguousarray(want).view(np.uint8).tobytes() == gf.raw(name).tobytes()


def test_deterministic(tmp_path):
    a = write_tiny_llama(tmp_path / "a.gguf", seed=3, qtype="q8_0").read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", seed=3, qtype="q8_0").read_bytes()
    c = write_tiny_llama(tmp_path / "c.gguf", seed=4, qtype="q8_0").read_bytes()
    assert a == b and a != c and len(a) == len(c)


def test_weight_scales_keep_activations_order_one(tiny_path):
    rng = np.random.default_rng(1)
    with gguf.read(tiny_path) as gf:
        for name, info in gf.tensors.items():
            w = gf.tensor(name)
            if len(info.shape) == 1:  # norm weights near 1
                assert abs(w.mean() - 1) < 0.05 and w.std() < 0.2, name
                continue
            # A unit-RMS input through each projection keeps unit scale: y = x @ W.T has
            # std sqrt(fan_in) * std(W) = 1 (the embedding: 1/sqrt(dim) per weight, so
            # tied logits from a unit-RMS hidden state are ~N(0, 1)). 10% tolerance: the
            # sample std of >= 10k normals is within ~1% (7 sigma margin).
            x = rng.standard_normal((256, info.shape[-1])).astype(np.float32)
            y = x @ w.T
            assert 0.9 < y.std() < 1.1, (name, y.std())


@pytest.mark.model
def test_like_the_real_model(default_model_path, tiny_path):
    # Every key the tiny file writes exists in SmolLM2 with the same stored type (except
    # add_eos_token, which SmolLM2's file omits), and the tensor names of a block match.
    with gguf.read(default_model_path) as real, gguf.read(tiny_path) as tiny:
        missing = set(tiny.metadata) - set(real.metadata)
        assert missing == {"tokenizer.ggml.add_eos_token"}
        for key in set(tiny.metadata) & set(real.metadata):
            assert tiny.types[key] == real.types[key], key
        assert tiny.metadata["tokenizer.chat_template"] == real.metadata["tokenizer.chat_template"]
        block = lambda gf: sorted(n[len("blk.0."):] for n in gf.tensors if n.startswith("blk.0."))  # noqa: E731
        assert block(tiny) == block(real)
        assert [n for n in real.tensors if not n.startswith("blk.")] == \
               [n for n in tiny.tensors if not n.startswith("blk.")]
        # The shape rule derived from metadata holds for both files.
        for gf in (real, tiny):
            md = gf.metadata
            want = testing.tiny_llama_tensor_shapes(
                n_layers=md["llama.block_count"], dim=md["llama.embedding_length"],
                n_heads=md["llama.attention.head_count"], n_kv_heads=md["llama.attention.head_count_kv"],
                hidden_dim=md["llama.feed_forward_length"], vocab_size=len(md["tokenizer.ggml.tokens"]))
            assert {n: t.shape for n, t in gf.tensors.items()} == want
        # The tiny merges are real SmolLM2 merges (of the same byte symbols), so both
        # vocabularies tokenize the same way where they overlap.
        assert set(MERGED_TOKENS) <= set(real.metadata["tokenizer.ggml.tokens"])
        assert set(MERGES) <= set(real.metadata["tokenizer.ggml.merges"])
