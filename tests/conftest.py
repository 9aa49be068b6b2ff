"""Tiny random models built in code (no download) and the bundled model for integration tests."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    return BertModel(cfg).eval()


TINY = {"llama": tiny_llama, "gemma3": tiny_gemma3}


@torch.no_grad()
def sharpen(model, qk: float, v: float = 8.0):
    """For reference tests: scale attention logits (by about ``qk**2``) and values (by ``v``) of every layer."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "q_norm"):  # Gemma-3 RMS-normalises q and k per head; the gain is (1 + w)
            attn.q_norm.weight.add_(qk - 1.0)
            attn.k_norm.weight.add_(qk - 1.0)
        else:
            attn.q_proj.weight.mul_(qk)
            attn.k_proj.weight.mul_(qk)
        attn.v_proj.weight.mul_(v)
    return model


@pytest.fixture(params=sorted(TINY))
def tiny_causal(request):
    return request.param, TINY[request.param]()


@pytest.fixture(scope="session")
def smollm2():
    import flowsieve

    return flowsieve.load("smollm2")


class CharTokenizer:
    """A character-level tokenizer over ASCII (ids < 128) with offsets, for tiny-model tests."""

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True, return_tensors=None):
        ids = [min(ord(ch), 127) for ch in text]
        enc = {"input_ids": ids}
        if return_offsets_mapping:
            enc["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        if return_tensors == "pt":
            enc = {"input_ids": torch.tensor([ids])}
        return enc

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def char_tok():
    return CharTokenizer()


@pytest.fixture
def tiny_llama_model():
    return tiny_llama()
