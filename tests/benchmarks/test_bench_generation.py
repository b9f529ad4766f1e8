"""Generation benchmark: refusal-atlas's `generate` against plain `model.generate`, unsteered and steered.

Run with ``make bench`` or alone:
``pytest -q -s -p no:cacheprovider tests/benchmarks/test_bench_generation.py -m bench``.
A plain ``pytest`` (make test) skips it.

Model: SmolLM2-135M-Instruct (``model.name: smollm2``), float32, ``BENCH_THREADS`` torch threads
(default 2). Prompts: ``BENCH_GEN_N`` (default 64) of the repository's prompts, every set in
turn, chat-formatted; ``BENCH_GEN_TOKENS`` (default 32) new tokens, batch 32, greedy.

Rows: generated tokens per second (tokens up to and including each row's stop token) for
(a) plain ``model.generate`` over the prompts in file order, batches of 32, left-padded;
(b) ``refusal_atlas.model.generation.generate`` (batches by length, stops at the template's
end-of-turn tokens); (c) (b) under ``add_direction`` at the middle block. Goals: (b) at least
as fast as (a); (c) within 1.05x of (b)'s time. Writes artifacts/bench/generation.json.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_atlas.config import ModelConfig
from refusal_atlas.model.chat import format_prompts
from refusal_atlas.model.generation import _greedy_config, generate, stop_token_ids
from refusal_atlas.model.hooks import add_direction
from refusal_atlas.model.layout import find_layout
from refusal_atlas.model.load import load_model

REPO = Path(__file__).resolve().parents[2]
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
N = int(os.environ.get("BENCH_GEN_N", "64"))
TOKENS = int(os.environ.get("BENCH_GEN_TOKENS", "32"))
BATCH = 32
_SELECTS_BENCH = re.compile(r"(?<!not )\bbench\b")


@pytest.fixture(autouse=True)
def _only_when_bench_selected(request):
    if not _SELECTS_BENCH.search(request.config.getoption("-m") or ""):
        pytest.skip("benchmark: run it with `make bench` (pytest -m bench)")


def _prompts(n: int) -> list[str]:
    files = sorted((REPO / "prompts").glob("*.jsonl"))
    per_file = [pd.read_json(f, lines=True)["text"].tolist() for f in files]
    return [texts[i] for i in range(max(map(len, per_file))) for texts in per_file if i < len(texts)][:n]


def _generated_tokens(tok, texts: list[str]) -> int:
    # Each response re-encoded, plus its stop token where it stopped early.
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


@torch.inference_mode()
def _plain(model, tok, formatted: list[str]) -> list[str]:
    config = _greedy_config(model, tok, TOKENS, None)
    out = []
    for start in range(0, len(formatted), BATCH):
        enc = tok(
            formatted[start : start + BATCH],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        ids = model.generate(**enc, generation_config=config)
        out += [t.strip() for t in tok.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    return out


@pytest.mark.bench
def test_bench_generation():
    torch.set_num_threads(THREADS)
    model, tok = load_model(ModelConfig(name="smollm2", device="cpu"))
    formatted = format_prompts(tok, _prompts(N))
    layout = find_layout(model)
    layer = layout.n_layers // 2
    vector = torch.randn(layout.d_model, generator=torch.Generator().manual_seed(0))
    vector *= 8.0 / vector.norm()  # a moderate push, about a tenth of SmolLM2's mid-depth residual norm

    def ours():
        return generate(model, tok, formatted, TOKENS, BATCH)

    def steered():
        with add_direction(model, layer, vector):
            return generate(model, tok, formatted, TOKENS, BATCH)

    runs = {"plain_generate": lambda: _plain(model, tok, formatted), "ours": ours, "ours_steered": steered}
    _plain(model, tok, formatted[:4])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    texts = {}
    for _ in range(2):  # interleaved repeats
        for name, fn in runs.items():
            t0 = time.perf_counter()
            texts[name] = fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    tokens = {k: _generated_tokens(tok, v) for k, v in texts.items()}
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "command": "pytest -q -s -p no:cacheprovider tests/benchmarks/test_bench_generation.py -m bench",
        "n_prompts": len(formatted),
        "max_new_tokens": TOKENS,
        "batch": BATCH,
        "stop_ids": stop_token_ids(model, tok),
        "seconds": med,
        "generated_tokens": tokens,
        "tokens_per_s": {k: tokens[k] / med[k] for k in med},
        "ratios": {
            "ours_over_plain_time": med["ours"] / med["plain_generate"],
            "steered_over_ours_time": med["ours_steered"] / med["ours"],
        },
        "same_text_as_plain": sum(a == b for a, b in zip(texts["ours"], texts["plain_generate"])),
    }
    out = REPO / "artifacts" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    assert tokens["ours"] > 0 and result["same_text_as_plain"] >= 0.9 * len(formatted)
