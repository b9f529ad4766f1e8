"""A real (non-demo) chat model from a local directory through `dvc repro`.

The model is a tiny random Qwen2 with a ChatML template, saved as a standard Hugging Face
directory, so it takes exactly the path of `model.name: /path/to/Qwen2.5-7B-Instruct`: the
model stage records its identity and leaves the weights where they are, and every later
stage loads it from there.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import run
from mlflow import MlflowClient
from tiny_models import make_tokenizer, tiny_model

from refusal_atlas.config import ModelConfig
from refusal_atlas.data import store
from refusal_atlas.model.chat import tokenize_prompts
from refusal_atlas.model.load import compute_identity, load_model

pytestmark = pytest.mark.slow
CHATML_SPAN = ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]


def _save_qwen(path, seed: int) -> None:
    tok = make_tokenizer("chatml")
    # Weights scaled up so greedy choices do not hinge on float rounding (see tiny_model).
    model = tiny_model("qwen2", vocab=len(tok), seed=seed, scale=20.0)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_local_chatml_model_runs_the_stages_and_a_replaced_checkpoint_is_refused(repo_copy, tmp_path):
    model_dir = tmp_path / "qwen-tiny"
    _save_qwen(model_dir, seed=0)
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["model"].update(name=str(model_dir), batch_size=64)
    params["baseline"]["max_new_tokens"] = 8
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # The tiny tokenizer has 400 tokens, so many prompts exceed the default 128: the baseline
    # stage names them by prompt id before it generates anything.
    failed = run(["dvc", "repro", "baseline"], repo_copy, check=False)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    n_prompts = len(pd.read_parquet(repo_copy / "artifacts/prompts/prompts.parquet"))
    assert re.search(
        rf"baseline: error: \d+ of {n_prompts} prompts exceed max_prompt_tokens=128: [a-z_]+-\d{{4}} \(\d+ tokens\)",
        failed.stderr,
    ), failed.stderr[-2000:]
    assert "Raise model.max_prompt_tokens" in failed.stderr and "baseline:   0%" not in failed.stderr + failed.stdout
    params["model"]["max_prompt_tokens"] = 240
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = run(["dvc", "repro", "activations"], repo_copy, timeout=900).stdout
    assert "Running stage 'activations'" in out

    # The model stage recorded the identity and copied no weights.
    identity = json.loads((repo_copy / "artifacts/model/identity.json").read_text())
    model, tok = load_model(ModelConfig(name=str(model_dir), device="cpu"))
    assert identity == compute_identity(model, tok, str(model_dir), None)
    assert identity["architecture"] == "Qwen2ForCausalLM" and identity["model_revision"] == "local"
    assert [p.name for p in (repo_copy / "artifacts/model/weights").iterdir()] == ["SOURCE.json"]
    assert json.loads((repo_copy / "artifacts/model/metrics.json").read_text()) == {}

    # The store is labelled with ChatML's end-of-instruction span, and its values are the model's.
    ds = store.open_store(
        repo_copy / "artifacts/activations/humanizing.zarr",
        expect={"model_weights_fingerprint": identity["weights_fingerprint"]},
    )
    assert list(ds.position_token.values) == CHATML_SPAN and list(ds.position.values) == [-5, -4, -3, -2, -1]
    assert ds.sizes["layer"] == 3 and ds.sizes["hidden"] == 32
    texts = (
        pd.read_parquet(repo_copy / "artifacts/prompts/sets/humanizing.parquet")
        .set_index("prompt_id")
        .loc[ds.prompt_id.values[:4], "text"]
    )
    formatted = tok.apply_chat_template(
        [[{"role": "user", "content": t}] for t in texts], tokenize=False, add_generation_prompt=True
    )
    enc = tokenize_prompts(tok, formatted, 240)
    assert [tok.convert_ids_to_tokens(row[-5:]) for row in enc["input_ids"].tolist()] == [CHATML_SPAN] * 4
    with torch.inference_mode():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    stored = ds.resid.isel(prompt=slice(0, 4)).values
    for layer in range(2):  # float32 rounding differs with the batch's padding; values here reach ±25
        np.testing.assert_allclose(stored[:, layer], hidden[layer][:, -5:].numpy(), rtol=1e-4, atol=1e-4)

    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("refusal-atlas").experiment_id])
    logged = next(r for r in runs if r.info.run_name == "model")
    assert logged.data.params["model.name"] == str(model_dir)
    assert logged.data.tags["model.architecture"] == "Qwen2ForCausalLM"
    assert logged.data.tags["model.weights_fingerprint"] == identity["weights_fingerprint"]

    # A new checkpoint saved over the old one (same config): a stage run now fails with the fix
    # and writes nothing. (DVC removes a stage's outputs before running it; they stay in its cache.)
    before = hashlib.sha256((repo_copy / "artifacts/baseline/responses.parquet").read_bytes()).hexdigest()
    _save_qwen(model_dir, seed=1)
    failed = run(["dvc", "repro", "--single-item", "--force", "baseline"], repo_copy, check=False)
    assert failed.returncode != 0
    assert "now has weights_fingerprint=" in failed.stderr and "dvc repro -f model" in failed.stderr, failed.stderr[
        -2000:
    ]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert not (repo_copy / "artifacts/baseline/responses.parquet").exists()
    run(["dvc", "checkout", "baseline"], repo_copy)
    assert hashlib.sha256((repo_copy / "artifacts/baseline/responses.parquet").read_bytes()).hexdigest() == before
