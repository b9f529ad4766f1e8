"""Layout discovery across architectures, safe loading, and the identity record."""

from __future__ import annotations

import hashlib

import pytest
import torch
import transformers as T
from tiny_models import ARCHS, batch, make_tokenizer, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from refusal_atlas.config import ModelConfig
from refusal_atlas.model.layout import UnsupportedArchitectureError, find_layout
from refusal_atlas.model.load import (
    ModelLoadError,
    ModelNotAvailableError,
    UnsafeWeightsError,
    compute_identity,
    load_model,
)

NORMED_OUTPUT_ARCHS = {"gemma2", "gemma3", "olmo2"}


@pytest.mark.parametrize("arch", ARCHS)
def test_find_layout_matrix(arch):
    model = tiny_model(arch)
    layout = find_layout(model)
    assert (layout.n_layers, layout.d_model) == (2, 32)
    assert layout.embed is model.get_input_embeddings()
    assert len(layout.blocks) == len(layout.attn_out) == len(layout.mlp_out) == 2
    assert all(p is not None for p in layout.attn_proj + layout.mlp_proj)
    assert layout.normed_outputs == (arch in NORMED_OUTPUT_ARCHS)
    if arch in NORMED_OUTPUT_ARCHS:
        assert layout.attn_out[0] is layout.blocks[0].post_attention_layernorm
        assert layout.mlp_out[1] is layout.blocks[1].post_feedforward_layernorm
    else:
        assert layout.attn_out[0] is layout.attn[0] and layout.mlp_out[0] is layout.mlp[0]
    # The final norm really is what turns the last block's output into last_hidden_state.
    ids = batch()["input_ids"][:1, -4:]
    out = model(ids, output_hidden_states=True)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    assert torch.allclose(base(ids).last_hidden_state, out.hidden_states[-1])
    if arch == "gpt2":
        assert isinstance(layout.attn_proj[0], Conv1D) and isinstance(layout.mlp_proj[0], Conv1D)
        assert layout.pos_embed is model.transformer.wpe
    else:
        assert isinstance(layout.attn_proj[0], nn.Linear) and layout.pos_embed is None


def test_unsupported_architecture_names_class_and_paths():
    cfg = T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = T.BertForMaskedLM(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="BertForMaskedLM") as err:
        find_layout(model)
    assert "model.layers" in str(err.value) and "transformer.h" in str(err.value)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])
            self.norm = nn.LayerNorm(4)
            self.embed_tokens = nn.Embedding(8, 4)

    with pytest.raises(UnsupportedArchitectureError, match=r"Odd: block 0 \(Linear\) has no attention"):
        find_layout(Odd())


def _save(model, tok, directory):
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_load_local_safetensors_dir(tmp_path):
    tok = make_tokenizer("llama3")
    model = tiny_model("llama", vocab=len(tok))
    _save(model, tok, tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").glob("*.safetensors")] == ["model.safetensors"]
    loaded, ltok = load_model(ModelConfig(name=str(tmp_path / "m"), device="cpu"))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert ltok.padding_side == "left" and ltok.pad_token == "<pad>"
    assert ltok.chat_template == tok.chat_template
    # The saved model loads with sdpa attention and the test model runs eager, so equal up to rounding.
    enc = batch(vocab=len(tok), lengths=(7,))
    assert torch.allclose(loaded(**enc).logits, model(**enc).logits, atol=1e-5)

    half, _ = load_model(ModelConfig(name="ignored", dtype="bfloat16", device="cpu"), name_or_path=str(tmp_path / "m"))
    assert half.dtype == torch.bfloat16


def test_pad_token_falls_back_to_eos(tmp_path):
    tok = make_tokenizer("chatml")
    tok.pad_token = None
    _save(tiny_model("qwen2", vocab=len(tok)), tok, tmp_path / "m")
    _, ltok = load_model(ModelConfig(name=str(tmp_path / "m"), device="cpu"))
    assert ltok.pad_token == "<|endoftext|>" and ltok.padding_side == "left"


def test_pickle_only_dir_refused_unless_allowed(tmp_path):
    tok = make_tokenizer("llama3")
    model = tiny_model("llama", vocab=len(tok))
    d = tmp_path / "pkl"
    d.mkdir()
    model.config.save_pretrained(d)
    tok.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError) as err:
        load_model(ModelConfig(name=str(d)))
    msg = str(err.value)
    assert str(d) in msg and "pytorch_model.bin" in msg and "safetensors" in msg and "model.allow_pickle: true" in msg
    loaded, _ = load_model(ModelConfig(name=str(d), allow_pickle=True, device="cpu"))
    # The saved model loads with sdpa attention and the test model runs eager, so equal up to rounding.
    enc = batch(vocab=len(tok), lengths=(7,))
    assert torch.allclose(loaded(**enc).logits, model(**enc).logits, atol=1e-5)


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as err:
        load_model(ModelConfig(name="no-such-org/no-such-model-xyz", revision="main"))
    msg = str(err.value)
    assert (
        "'no-such-org/no-such-model-xyz'" in msg
        and "model.name" in msg
        and "params.yaml" in msg
        and "HF_HUB_OFFLINE" in msg
    )


def test_demo_name_needs_a_path():
    with pytest.raises(ModelLoadError, match="demo"):
        load_model(ModelConfig(name="demo"))


IDENTITY_KEYS = {
    "model_id",
    "model_revision",
    "architecture",
    "n_layers",
    "d_model",
    "dtype",
    "config_sha256",
    "weights_fingerprint",
    "template_sha256",
}


def test_identity_stable_across_loads_and_sensitive_to_weights(tmp_path):
    tok = make_tokenizer("llama3")
    _save(tiny_model("llama", vocab=len(tok)), tok, tmp_path / "a")
    _save(tiny_model("llama", vocab=len(tok), seed=1), tok, tmp_path / "b")
    cfg = ModelConfig(name=str(tmp_path / "a"), device="cpu")
    ids = [compute_identity(*load_model(cfg), str(tmp_path / "a"), None) for _ in range(2)]
    assert ids[0] == ids[1] and set(ids[0]) == IDENTITY_KEYS
    first = ids[0]
    assert first["architecture"] == "LlamaForCausalLM" and (first["n_layers"], first["d_model"]) == (2, 32)
    assert first["dtype"] == "float32" and first["model_revision"] == "local"
    assert first["template_sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()
    other = compute_identity(*load_model(cfg, str(tmp_path / "b")), str(tmp_path / "b"), None)
    assert other["weights_fingerprint"] != first["weights_fingerprint"]
    assert other["config_sha256"] == first["config_sha256"]


def test_identity_in_memory_model():
    tok = make_tokenizer("gemma")
    a = compute_identity(tiny_model("gemma2", vocab=len(tok)), tok, "mem", None)
    b = compute_identity(tiny_model("gemma2", vocab=len(tok)), tok, "mem", None)
    c = compute_identity(tiny_model("gemma2", vocab=len(tok), seed=3), tok, "mem", None)
    assert a == b and a["weights_fingerprint"] != c["weights_fingerprint"]
    assert a["architecture"] == "Gemma2ForCausalLM"
