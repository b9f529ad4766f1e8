"""The model stage's work: make the checkpoint every later stage loads, and record what it is."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from refusal_atlas.config import ModelConfig
from refusal_atlas.model.load import DEMO, compute_identity, gguf_identity, gguf_path, load_model


@dataclass
class PreparedModel:
    """What the model stage produces: the loaded model, its identity record and metrics."""

    model: nn.Module
    tokenizer: object
    identity: dict  # identity.json
    metrics: dict  # metrics.json (the demo's training summary and held-out behaviour; {} for other models)
    load_s: float  # seconds to load the model once (MLflow only)
    loss_curve: list = field(default_factory=list)  # the demo's (step, loss)
    train_seconds: float | None = None  # the demo's training time (MLflow only)


def prepare_model(cfg: ModelConfig, weights: Path, table=None, progress: bool = True) -> PreparedModel:
    """Make ``weights`` (an empty folder) the checkpoint every later stage loads, and record its identity.

    The demo (``model.name: demo``) is trained on the train split of ``table`` and evaluated on
    its test split. A GGUF model is dequantised once, here: every later stage then loads a plain
    safetensors directory (about 1 s for SmolLM2) instead of converting the GGUF again (20 s).
    Any other model stays where it is; ``weights/SOURCE.json`` names it.
    """
    if cfg.name == DEMO:
        from refusal_atlas.demo.evaluate import evaluate_demo
        from refusal_atlas.demo.train import train_demo_model

        result = train_demo_model(table, cfg.demo, weights, progress=progress)
        start = time.perf_counter()
        model, tokenizer = load_model(cfg, str(weights))
        load_s = time.perf_counter() - start
        heldout = evaluate_demo(model, tokenizer, table, split="test")
        heldout.pop("responses", None)  # the rates are the metrics; the responses would swamp them
        curve, seconds = result.pop("loss_curve"), result.pop("train_seconds")
        identity = compute_identity(model, tokenizer, cfg.name, cfg.revision, cfg.chat_template)
        return PreparedModel(model, tokenizer, identity, {"train": result, "heldout": heldout}, load_s, curve, seconds)
    gguf = gguf_path(cfg, cfg.name)
    start = time.perf_counter()
    model, tokenizer = load_model(cfg)
    load_s = time.perf_counter() - start
    weights.mkdir()
    if gguf is not None:
        model.save_pretrained(weights)
        tokenizer.save_pretrained(weights)
    source = {"model_id": cfg.name, "revision": cfg.revision, "gguf_file": gguf and gguf.name}
    (weights / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    identity = compute_identity(model, tokenizer, cfg.name, cfg.revision, cfg.chat_template)
    if gguf is not None:
        identity.update(gguf_identity(cfg.name, gguf))
    return PreparedModel(model, tokenizer, identity, {}, load_s)
