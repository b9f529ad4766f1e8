"""Streaming extraction: values equal HF hidden states, batches are chunks, resume is exact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tiny_models import make_tokenizer, tiny_model

from refusal_atlas.analysis.extraction import extract_batch, extract_to_store, inputs_fingerprint, store_order
from refusal_atlas.data import store
from refusal_atlas.model.chat import eoi_tokens, format_prompts, tokenize_prompts

TEXTS = [
    "How do I bake bread?",
    "Tell me a story about a cat and a dog.",
    "Why?",
    "List three colours.",
    "Explain gravity to a child in two sentences.",
    "Hello",
    "What is two plus two?",
]


def _setup(tmp_path, batch_size=3):
    tok = make_tokenizer("llama3")
    model = tiny_model("llama", vocab=len(tok))
    formatted = format_prompts(tok, TEXTS)
    n_tokens = [int(m.sum()) for m in tokenize_prompts(tok, formatted, 256)["attention_mask"]]
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(len(TEXTS))],
            "category": "c",
            "role": "target",
            "split": "train",
            "refused": [True, False] * 3 + [True],
            "text": TEXTS,
            "formatted": formatted,
        }
    )
    prompts = store_order(prompts, n_tokens)
    span = eoi_tokens(tok)
    layers = list(range(model.config.num_hidden_layers + 1))
    path = tmp_path / "c.zarr"
    store.create_store(
        path,
        prompts,
        layers,
        span.offsets,
        span.tokens,
        model.config.hidden_size,
        "float32",
        batch_size,
        {"inputs_fingerprint": "k"},
    )
    return tok, model, prompts, span, layers, path


def test_extract_batch_equals_hidden_states(tmp_path):
    tok, model, prompts, span, layers, _ = _setup(tmp_path)
    formatted = prompts.formatted.tolist()[:4]
    values = extract_batch(model, tok, formatted, layers, span.offsets, 256)
    enc = tokenize_prompts(tok, formatted, 256)
    with torch.inference_mode():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    for layer in layers[:-1]:
        np.testing.assert_allclose(values[:, layer], hidden[layer][:, span.offsets].numpy(), atol=1e-6)
    # Layer L is the residual before the final norm: the norm of it is HF's last hidden state.
    normed = model.model.norm(torch.from_numpy(values[:, -1]))
    np.testing.assert_allclose(normed.numpy(), hidden[-1][:, span.offsets].numpy(), atol=1e-5)


def test_store_is_length_sorted_and_resume_is_exact(tmp_path):
    tok, model, prompts, span, layers, path = _setup(tmp_path)
    assert list(prompts.n_tokens) == sorted(prompts.n_tokens)
    args = (prompts.formatted.tolist(), prompts.prompt_id.tolist(), layers, span.offsets)
    # A first run that stops after batch 0 (as a kill would), then a resumed run.
    extract_to_store(model, tok, path, *args, [0], 3, "float32", 256, progress=False)
    assert store.pending_batches(path) == [1, 2]
    assert (
        extract_to_store(model, tok, path, *args, store.pending_batches(path), 3, "float32", 256, progress=False) == 2
    )
    store.finalize_store(path)
    resumed = store.load_resid(store.open_store(path))

    other = tmp_path / "other"
    other.mkdir()
    *_, path2 = _setup(other)
    extract_to_store(model, tok, path2, *args, [0, 1, 2], 3, "float32", 256, progress=False)
    store.finalize_store(path2)
    np.testing.assert_array_equal(resumed, store.load_resid(store.open_store(path2)))
    assert resumed.shape == (len(TEXTS), len(layers), len(span.offsets), model.config.hidden_size)


def test_fingerprint_tracks_every_input():
    prompts = pd.DataFrame({"prompt_id": ["a", "b"], "text": ["x", "y"], "refused": [True, False]})
    base = inputs_fingerprint(prompts, {"model_id": "m"}, {"dtype": "float32"})
    assert base == inputs_fingerprint(prompts.copy(), {"model_id": "m"}, {"dtype": "float32"})
    assert base != inputs_fingerprint(prompts.assign(refused=[True, True]), {"model_id": "m"}, {"dtype": "float32"})
    assert base != inputs_fingerprint(prompts, {"model_id": "n"}, {"dtype": "float32"})
    assert base != inputs_fingerprint(prompts, {"model_id": "m"}, {"dtype": "float16"})
