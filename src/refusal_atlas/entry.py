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


def run_stage(stage: str, parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace, Params, object], None]) -> None:
    """Parse args, validate params, open the MLflow run, call ``main(args, params, run)``."""
    from refusal_atlas.tracking import TrackingError, stage_run

    args = parser.parse_args()
    try:
        params = load_params(args.params)
        with stage_run(
            stage,
            params_dict(params, stage),
            repo_root(),
            uri=params.tracking.uri,
            experiment=params.tracking.experiment,
            timeout_s=params.tracking.timeout_s,
            params_path=args.params,
        ) as run:
            main(args, params, run)
    except (ConfigError, RefusalAtlasError, TrackingError) as err:
        fail(stage, str(err))
    except KeyboardInterrupt:
        fail(stage, "interrupted", 130)
