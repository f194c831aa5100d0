"""Tiny random-weight Hugging Face models for the tests, built in code (nothing is downloaded)."""
from __future__ import annotations

import warnings

import pytest
import torch


def hf_llama(vocab=128, hidden=32, inter=64, layers=2, positions=64, dtype=torch.float64):
    """A ``LlamaForCausalLM`` (4 heads, 2 key/value heads) from ``torch.manual_seed(0)``, in train
    mode; the calling test is skipped where transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=positions)
        return transformers.LlamaForCausalLM(cfg).to(dtype).train()


def padded_batch(ids, keep=8):
    """A HF dict batch whose second row is padded after ``keep`` tokens (mask 0, labels -100)."""
    mask = torch.ones_like(ids)
    mask[1, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
