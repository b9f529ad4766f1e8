"""What every stage entry point shares: argument parsing, params, tracking, clean failure.

A stage module builds a parser with ``stage_parser``, and hands its ``main(args,
params, run)`` to ``run_stage``. User errors (``RefusalAtlasError``, bad params,
an unreachable tracking server) become one message on stderr and exit status 2,
with no traceback; the stage's outputs are written through ``atomic`` helpers so a
failure leaves none behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from refusal_atlas.config import ConfigError, Params, load_params, params_dict
from refusal_atlas.errors import RefusalAtlasError


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py", description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def repo_root() -> Path:
    """The DVC root when run by DVC, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def fail(stage: str, message: str, code: int = 2) -> None:
    print(f"{stage}: error: {message}", file=sys.stderr)
    sys.exit(code)


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process under ``accelerate launch`` / torch.distributed, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def relaunch_with_accelerate(num_processes: int) -> int:
    """Run this same command in ``num_processes`` data-parallel processes; return the launcher's status.

    On GPUs it is ``accelerate launch --multi_gpu``. On CPU, accelerate's ``--cpu`` launcher
    starts a single process (multi-CPU there means mpirun), so it is torch.distributed's own
    launcher (torchrun, gloo) with accelerate's ``PartialState`` inside. Multi-node runs use
    the same launchers with ``--num_machines``/``--machine_rank``/``--main_process_ip``
    (or torchrun's ``--nnodes``/``--rdzv-endpoint``); see docs/operations.md.
    """
    import subprocess

    import torch

    if torch.cuda.is_available():
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes)]
    # The children must never relaunch again, whatever the launcher sets in their environment.
    return subprocess.call([*cmd, *sys.argv], env={**os.environ, "REFUSAL_ATLAS_LAUNCHED": "1"})


class NullRun:
    """Stands in for the MLflow run on ranks other than 0: only rank 0 logs."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def hide_library_progress_bars() -> None:
    """Hide the bars transformers and huggingface_hub draw themselves (loading weights, downloads)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are first imported
    if "transformers" in sys.modules:  # already imported: switch its bars off directly
        from transformers.utils import logging

        logging.disable_progress_bar()


def tracked_run(name: str, params: Params, logged: dict, params_path: Path):
    """The MLflow run of a stage (or a command such as abliterate) named ``name``, logging ``logged`` as
    its params, where ``params.tracking`` says, under this execution's parent run."""
    from refusal_atlas.pipeline.tracking import stage_run

    tracking = params.tracking
    return stage_run(
        name, logged, repo_root(), uri=tracking.uri, experiment=tracking.experiment, timeout_s=tracking.timeout_s,
        params_path=params_path,
    )  # fmt: skip


def wait_for_everyone(world: int) -> None:
    """A barrier across the processes of a distributed launch (nothing in a single process)."""
    if world > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def _relaunch_if_asked(parser: argparse.ArgumentParser, processes: Callable[[Params], int]) -> None:
    """Rerun this command in ``processes(params)`` processes when that is over 1 and this is not one of them."""
    known, _ = parser.parse_known_args()
    try:
        n = processes(load_params(known.params))
    except ConfigError:
        n = 1  # run_stage reports the bad params
    if n > 1 and process_rank()[1] == 1 and not os.environ.get("REFUSAL_ATLAS_LAUNCHED"):
        sys.exit(relaunch_with_accelerate(n))


def run_stage(
    stage: str,
    parser: argparse.ArgumentParser,
    main: Callable[[argparse.Namespace, Params, object], None],
    processes: Callable[[Params], int] | None = None,
) -> None:
    """Parse args, validate params, open the MLflow run, call ``main(args, params, run)``.

    ``processes(params)``, when given, is how many data-parallel processes the stage runs in
    (``relaunch_with_accelerate``); on ranks > 0 of such a launch, ``run`` is a ``NullRun``.
    """
    import errno

    if processes is not None:
        _relaunch_if_asked(parser, processes)
    args = parser.parse_args()
    if args.no_progress:
        hide_library_progress_bars()
    try:
        params = load_params(args.params)
        if process_rank()[0] > 0:
            main(args, params, NullRun())
            return
        with tracked_run(stage, params, params_dict(params, stage), args.params) as run:
            main(args, params, run)
    except RefusalAtlasError as err:
        fail(stage, str(err))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A write error often carries no file name; the stage's output is where it was writing.
        where = err.filename or getattr(args, "out", None) or repo_root()
        what = "no space left on the device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        fail(
            stage,
            f"{what} while writing {where}; free space on that disk (or move the output to a bigger one) and rerun "
            "`dvc repro`",
        )
    except KeyboardInterrupt:
        fail(stage, "interrupted", 130)
