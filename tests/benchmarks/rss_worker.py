"""Peak RSS of refusal-atlas extraction of N prompts into a Zarr store, in a fresh process.

Usage: python rss_worker.py N_PROMPTS PRESET STORE_DIR
Prints one JSON object:
- ``process_peak_kb``: this process's own peak RSS (VmHWM, read before it is reset);
- ``extraction_peak_kb``: the peak RSS from just before extraction to the end (VmHWM
  after resetting it, where the kernel allows), i.e. baseline plus whatever extraction adds;
- ``rss_before_extraction_kb`` / ``rss_after_kb``: VmRSS around the extraction;
- ``ru_maxrss_kb``: getrusage's figure, for reference only. On Linux it is not this
  process's own: ``signal->maxrss`` survives fork/vfork + exec, so a child started from a
  large parent (the pytest process holding the 100M model) reports at least the parent's
  RSS at spawn time.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import build_model, build_tokenizer, extract_with_store, hwm_kb, make_prompts, reset_hwm, rss_now_kb  # noqa: E402


def main() -> None:
    n, preset, out_dir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    model = build_model(preset)
    tokenizer = build_tokenizer(model.config.vocab_size)
    prompts = make_prompts(n, model.config.vocab_size)
    with torch.inference_mode():  # warm the kernels once, as the pipeline's first batch would
        model.base_model(input_ids=torch.ones(1, 8, dtype=torch.long), use_cache=False)
    rss_before = rss_now_kb()
    setup_peak = hwm_kb()
    reset_ok = reset_hwm()
    t0 = time.perf_counter()
    extract_with_store(model, tokenizer, out_dir / f"rss_{n}.zarr", prompts)
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "n_prompts": n,
                "preset": preset,
                "wall_s": wall,
                "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "rss_before_extraction_kb": rss_before,
                "rss_after_kb": rss_now_kb(),
                "setup_peak_kb": setup_peak,
                "extraction_peak_kb": hwm_kb() if reset_ok else None,
                "hwm_reset": reset_ok,
                "process_peak_kb": max(setup_peak, hwm_kb()),
            }
        )
    )


if __name__ == "__main__":
    main()
