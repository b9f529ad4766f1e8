"""DVC stage `activations@<set>`: residuals at every layer and end-of-instruction position.

Writes <out> (artifacts/activations/<set>.zarr), an xarray Dataset with `resid`
(prompt, layer, position, hidden) and the prompt coordinates. The store is persistent
and resumable: a rerun after a kill computes only the batches not marked done, and a
store built from other inputs (prompts, verdicts, model, settings) is rebuilt.
With activations.num_processes > 1 the stage relaunches itself under `accelerate
launch`; each process extracts a chunk-aligned shard and rank 0 finalises the store.
"""

import os
import sys
from pathlib import Path

import pandas as pd

from refusal_atlas import store
from refusal_atlas.activations import extract_to_store, inputs_fingerprint, shard_batches, store_order
from refusal_atlas.config import ConfigError, load_params
from refusal_atlas.entry import load_stage_model, process_rank, relaunch_with_accelerate, run_stage, stage_parser
from refusal_atlas.models import check_prompt_lengths, eoi_tokens, format_prompts

STAGE = "activations"
CODE_VERSION = "activations-v1"


def main(args, params, run) -> None:
    mcfg, cfg = params.model, params.activations
    rank, world = process_rank()
    prompts = pd.read_parquet(args.prompts).merge(pd.read_parquet(args.verdicts)[["prompt_id", "refused"]], on="prompt_id", how="left", validate="one_to_one")
    model, tokenizer, identity = load_stage_model(params, args.model)
    template = (mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs)
    formatted = format_prompts(tokenizer, prompts.text.tolist(), *template)
    n_tokens = check_prompt_lengths(tokenizer, formatted, mcfg.max_prompt_tokens, prompts.prompt_id.tolist())
    prompts = store_order(prompts.assign(formatted=formatted), n_tokens)
    span = eoi_tokens(tokenizer, *template)
    layers = list(range(identity["n_layers"] + 1))
    settings = {"dtype": cfg.dtype, "batch_size": mcfg.batch_size, "positions": span.offsets, "layers": layers, "code": CODE_VERSION, "template": template}
    key = inputs_fingerprint(prompts, identity, settings)

    if rank == 0 and not store.is_resumable(args.out, key):
        attrs = {**{k if k.startswith(("model_", "template_")) else f"model_{k}": v for k, v in identity.items()},
                 "inputs_fingerprint": key, "code_version": CODE_VERSION, "prompt_set": args.name}
        store.create_store(args.out, prompts, layers, span.offsets, span.tokens, identity["d_model"], cfg.dtype, mcfg.batch_size, attrs)
    _barrier(world)
    pending = store.pending_batches(args.out)
    mine = shard_batches(pending, rank, world)
    written = extract_to_store(model, tokenizer, args.out, prompts.formatted.tolist(), prompts.prompt_id.tolist(), layers, span.offsets,
                               mine, mcfg.batch_size, cfg.dtype, mcfg.max_prompt_tokens, progress=not args.no_progress and rank == 0)
    _barrier(world)
    if rank == 0:
        store.finalize_store(args.out)

    run.log_identity(identity)
    run.log_input(args.prompts)
    run.log_metrics({"n_prompts": len(prompts), "n_batches_written": len(pending), "n_batches_resumed": -(-len(prompts) // mcfg.batch_size) - len(pending), "n_processes": world})
    if rank == 0:
        print(f"activations@{args.name}: {len(prompts)} prompts x {len(layers)} layers x {len(span.offsets)} positions -> {args.out} ({written} batches here, {world} process(es))")


def _barrier(world: int) -> None:
    if world > 1:
        from accelerate import PartialState

        import torch

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--name", required=True, help="prompt set (category or baseline pool)")
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/sets/<set>.parquet")
    parser.add_argument("--verdicts", type=Path, required=True, help="artifacts/baseline/sets/<set>.parquet")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/activations/<set>.zarr")
    known, _ = parser.parse_known_args()
    try:
        n = load_params(known.params).activations.num_processes
    except ConfigError:
        n = 1  # run_stage reports the bad params
    if n > 1 and process_rank()[1] == 1 and not os.environ.get("REFUSAL_ATLAS_LAUNCHED"):
        sys.exit(relaunch_with_accelerate(n))
    run_stage(STAGE, parser, main)
