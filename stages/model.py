"""DVC stage `model`: train the embedded demo model, or record a real model's identity.

For `model.name: demo` it trains a small Llama-architecture chat model on the train
split and saves it as a standard Hugging Face directory in <out>/weights. A GGUF
checkpoint (`smollm2`, a .gguf file, or model.gguf_file) is dequantised once into
<out>/weights, where every later stage loads it. For any other real model (hub id or
local directory) the weights stay where they are; <out>/weights holds only SOURCE.json.
Either way <out>/identity.json records what every later stage runs on.
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import json
import time
from pathlib import Path

import pandas as pd

from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.model.load import DEMO
from refusal_atlas.pipeline.harness import run_stage, stage_parser

STAGE = "model"


def main(args, params, run) -> None:
    from refusal_atlas.model.load import compute_identity, gguf_identity, gguf_path, load_model

    cfg = params.model
    metrics: dict = {}
    with atomic_path(args.out / "weights") as weights:
        if cfg.name == DEMO:
            from refusal_atlas.demo.train import evaluate_demo, train_demo_model

            table = pd.read_parquet(args.prompts)
            result = train_demo_model(table, cfg.demo, weights, progress=not args.no_progress)
            pd.DataFrame(result["loss_curve"], columns=["step", "loss"]).to_csv(args.out / "loss.csv", index=False)
            for step, loss in result["loss_curve"]:
                run.log_metrics({"train_loss": loss}, step=step)
            start = time.perf_counter()
            model, tokenizer = load_model(cfg, str(weights))
            run.log_metrics({"model_loads": 1, "model_load_s": time.perf_counter() - start})
            heldout = evaluate_demo(model, tokenizer, table, split="test")
            heldout.pop("responses", None)  # the rates are the metrics; the responses would swamp them
            # Wall time goes to MLflow only: the DVC-tracked metrics stay identical between runs.
            run.log_metrics({"train_seconds": result.pop("train_seconds")})
            metrics = {"train": {k: v for k, v in result.items() if k != "loss_curve"}, "heldout": heldout}
            identity = compute_identity(model, tokenizer, cfg.name, cfg.revision, cfg.chat_template)
        else:
            gguf = gguf_path(cfg, cfg.name)
            start = time.perf_counter()
            model, tokenizer = load_model(cfg)
            run.log_metrics({"model_loads": 1, "model_load_s": time.perf_counter() - start})
            weights.mkdir()
            if gguf is not None:
                # Dequantised once, here: every later stage then loads a plain safetensors
                # directory (about 1 s for SmolLM2) instead of converting the GGUF again (20 s).
                model.save_pretrained(weights)
                tokenizer.save_pretrained(weights)
            (weights / "SOURCE.json").write_text(
                json.dumps({"model_id": cfg.name, "revision": cfg.revision, "gguf_file": gguf and gguf.name}, indent=2)
                + "\n"
            )
            pd.DataFrame({"step": [], "loss": []}).to_csv(args.out / "loss.csv", index=False)
            identity = compute_identity(model, tokenizer, cfg.name, cfg.revision, cfg.chat_template)
            if gguf is not None:
                identity.update(gguf_identity(cfg.name, gguf))
    write_json(args.out / "identity.json", identity)
    write_json(args.out / "metrics.json", metrics)

    run.log_identity(identity)
    run.log_metrics(metrics)
    print(
        f"model: {identity['architecture']} with {identity['n_layers']} layers, d_model {identity['d_model']} -> {args.out}"
    )


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/prompts.parquet")
    parser.add_argument("--out", type=Path, required=True, help="output folder (artifacts/model)")
    run_stage(STAGE, parser, main)
