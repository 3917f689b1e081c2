"""A tiny Llama model file for tests that run a real llama.cpp server: random weights (a fixed seed) and a
SentencePiece-style vocabulary of our own with byte fallback. Needs ``numpy`` and ``gguf``, imported when called."""

from __future__ import annotations

import pathlib
from typing import Any

#: The context length the file declares.
CONTEXT = 512


def write_model(path: pathlib.Path, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_ff: int = 128) -> None:
    """A Llama-architecture GGUF with random weights and a SentencePiece-style vocabulary with byte fallback."""
    import gguf
    import numpy as np

    words = ["the", "a", "model", "token", "stream", "hello", "world", "fast", "cat", "dog", "blue", "red", "time",
             "ok", "yes", "no", "über", "naïve", "日本", "数据"]  # fmt: skip
    pieces = list(dict.fromkeys(["▁" + w for w in words] + words + ["▁"] + [chr(c) for c in range(97, 123)]))
    # (text, score, type): unknown 2, control 3, byte 6, normal 1.
    vocab = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    vocab += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    vocab += [(piece, -float(i), 1) for i, piece in enumerate(pieces)]
    rng = np.random.default_rng(7)

    def weights(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([text.encode() for text, _, _ in vocab])
    writer.add_token_scores([score for _, score, _ in vocab])
    writer.add_token_types([kind for _, _, kind in vocab])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    ones = np.ones(n_embd, np.float32)
    writer.add_tensor("token_embd.weight", weights(len(vocab), n_embd))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("output.weight", weights(len(vocab), n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for name in ("q", "k", "v", "output"):
            writer.add_tensor(f"blk.{i}.attn_{name}.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
