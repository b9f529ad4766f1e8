"""DVC stage `activations`: residuals at every layer and end-of-instruction position, for every prompt set.

Loads the model once and brings one store per set up to date: artifacts/activations/<set>.zarr,
an xarray Dataset with `resid` (prompt, layer, position, hidden) and the prompt coordinates.
Each store carries the fingerprint of its inputs (the set's prompts and verdicts, the model,
the settings): a store whose inputs did not change is left as it is, one cut short by a kill
resumes at the first batch not marked done, and any other is rebuilt. Stores of sets that no
longer exist are removed. With activations.num_processes > 1 the stage relaunches itself under
`accelerate launch`; each process extracts chunk-aligned shards and rank 0 finalises each store.
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import os
import shutil
import sys
from pathlib import Path

import pandas as pd

from refusal_atlas.analysis.extraction import extract_set
from refusal_atlas.config import ConfigError, load_params
from refusal_atlas.model.load import load_stage_model
from refusal_atlas.pipeline.harness import process_rank, relaunch_with_accelerate, run_stage, stage_parser

STAGE = "activations"


def main(args, params, run) -> None:
    mcfg, cfg = params.model, params.activations
    rank, world = process_rank()
    names = sorted(p.stem for p in args.prompts.glob("*.parquet"))
    model, tokenizer, identity = load_stage_model(params.model, args.model, run)
    template = (mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs)
    done = {}
    for name in names:
        prompts = pd.read_parquet(args.prompts / f"{name}.parquet").merge(
            pd.read_parquet(args.verdicts / f"{name}.parquet")[["prompt_id", "refused"]],
            on="prompt_id",
            how="left",
            validate="one_to_one",
        )
        done[name] = extract_set(
            model,
            tokenizer,
            identity,
            prompts,
            args.out / f"{name}.zarr",
            name=name,
            template=template,
            dtype=cfg.dtype,
            batch_size=mcfg.batch_size,
            max_prompt_tokens=mcfg.max_prompt_tokens,
            rank=rank,
            world=world,
            barrier=lambda: _barrier(world),
            progress=not args.no_progress and rank == 0,
        )
    if rank > 0:
        return
    for stale in sorted(set(args.out.glob("*.zarr")) - {args.out / f"{n}.zarr" for n in names}):
        shutil.rmtree(stale)
    run.log_identity(identity)
    run.log_input(args.prompts)
    run.log_metrics(
        {
            "n_processes": world,
            "n_sets_rebuilt": sum(d["rebuilt"] for d in done.values()),
            "n_sets_extracted": sum(d["n_batches_written"] > 0 for d in done.values()),
            "sets": done,
        }
    )
    fresh = [f"{n} ({d['n_batches_written']} batches)" for n, d in done.items() if d["n_batches_written"]]
    print(
        f"activations: {len(names)} stores ({len(fresh)} extracted: {', '.join(fresh) or 'none'}; the rest up to date; {world} process(es)) -> {args.out}"
    )


def _barrier(world: int) -> None:
    if world > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument(
        "--prompts", type=Path, required=True, help="artifacts/prompts/sets (one <set>.parquet per prompt set)"
    )
    parser.add_argument(
        "--verdicts", type=Path, required=True, help="artifacts/baseline/sets (one <set>.parquet of verdicts per set)"
    )
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/activations (one <set>.zarr per set)")
    known, _ = parser.parse_known_args()
    try:
        n = load_params(known.params).activations.num_processes
    except ConfigError:
        n = 1  # run_stage reports the bad params
    if n > 1 and process_rank()[1] == 1 and not os.environ.get("REFUSAL_ATLAS_LAUNCHED"):
        sys.exit(relaunch_with_accelerate(n))
    run_stage(STAGE, parser, main)
