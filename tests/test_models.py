"""Model names, errors and the offline behaviour of load()."""

from __future__ import annotations

import pytest

from flowsieve.errors import FlowsieveError, did_you_mean
from flowsieve.models import BUNDLED, context_length, load


def test_did_you_mean():
    assert "smollm2" in did_you_mean("smollm", BUNDLED)
    assert "gemma3-270m" in did_you_mean("gemma", BUNDLED)
    assert did_you_mean("zzzzzz", BUNDLED) == ""


def test_unknown_name_is_clear():
    with pytest.raises(FlowsieveError, match="did you mean 'minilm'"):
        load("minlm")
    with pytest.raises(FlowsieveError, match="empty model name"):
        load("")


def test_hub_id_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FlowsieveError, match="could not load model 'someorg/some-model'"):
        load("someorg/some-model")


def test_local_dir_without_model(tmp_path):
    with pytest.raises(FlowsieveError, match="could not load model"):
        load(str(tmp_path))


def _save_word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(path)


def test_local_dir_tiny_model_roundtrip(tmp_path):
    from conftest import tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path, safe_serialization=True)
    _save_word_tokenizer(tmp_path)
    loaded, _tok = load(str(tmp_path))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert context_length(loaded) == 256
    assert not loaded.training


def test_pickle_only_checkpoint_refused(tmp_path):
    """Weights load from safetensors only: a directory with just a pickle is not loaded."""
    import torch
    from conftest import tiny_llama

    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _save_word_tokenizer(tmp_path)  # so the weights, not a missing tokenizer, are what fails
    with pytest.raises(FlowsieveError, match=r"no file named model\.safetensors"):
        load(str(tmp_path))
