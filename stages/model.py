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

from pathlib import Path

import pandas as pd

from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.model.load import DEMO
from refusal_atlas.model.prepare import prepare_model
from refusal_atlas.pipeline.harness import run_stage, stage_parser

STAGE = "model"


def main(args, params, run) -> None:
    cfg = params.model
    table = pd.read_parquet(args.prompts) if cfg.name == DEMO else None
    with atomic_path(args.out / "weights") as weights:
        prepared = prepare_model(cfg, weights, table, progress=not args.no_progress)
    pd.DataFrame(prepared.loss_curve, columns=["step", "loss"]).to_csv(args.out / "loss.csv", index=False)
    identity = prepared.identity
    write_json(args.out / "identity.json", identity)
    write_json(args.out / "metrics.json", prepared.metrics)

    for step, value in prepared.loss_curve:
        run.log_metrics({"train_loss": value}, step=step)
    run.log_metrics({"model_loads": 1, "model_load_s": prepared.load_s})
    if prepared.train_seconds is not None:  # wall time goes to MLflow only: DVC's metrics stay identical
        run.log_metrics({"train_seconds": prepared.train_seconds})
    run.log_identity(identity)
    run.log_metrics(prepared.metrics)
    shape = f"{identity['architecture']} with {identity['n_layers']} layers, d_model {identity['d_model']}"
    print(f"model: {shape} -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/prompts.parquet")
    parser.add_argument("--out", type=Path, required=True, help="output folder (artifacts/model)")
    run_stage(STAGE, parser, main)
