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

from functools import partial
from pathlib import Path

from refusal_atlas.analysis.extraction import extract_sets
from refusal_atlas.model.load import load_stage_model
from refusal_atlas.pipeline.harness import process_rank, run_stage, stage_parser, wait_for_everyone

STAGE = "activations"


def main(args, params, run) -> None:
    rank, world = process_rank()
    model, tokenizer, identity = load_stage_model(params.model, args.model, run)
    done = extract_sets(
        model, tokenizer, identity, args.prompts, args.verdicts, args.out, params.activations, params.model,
        rank=rank, world=world, barrier=partial(wait_for_everyone, world), progress=not args.no_progress and rank == 0,
    )  # fmt: skip
    if rank > 0:
        return
    run.log_identity(identity)
    run.log_input(args.prompts)
    rebuilt, extracted = (
        sum(d["rebuilt"] for d in done.values()),
        sum(d["n_batches_written"] > 0 for d in done.values()),
    )
    run.log_metrics({"n_processes": world, "n_sets_rebuilt": rebuilt, "n_sets_extracted": extracted, "sets": done})
    fresh = [f"{n} ({d['n_batches_written']} batches)" for n, d in done.items() if d["n_batches_written"]]
    print(f"activations: {len(done)} stores ({len(fresh)} extracted: {', '.join(fresh) or 'none'}; the rest up to "
          f"date; {world} process(es)) -> {args.out}")  # fmt: skip


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/sets (<set>.parquet per set)")
    parser.add_argument("--verdicts", type=Path, required=True, help="artifacts/baseline/sets (verdicts per set)")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/activations (one <set>.zarr per set)")
    run_stage(STAGE, parser, main, processes=lambda params: params.activations.num_processes)
