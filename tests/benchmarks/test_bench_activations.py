"""Extraction benchmark: refusal-atlas against a bare forward pass, output_hidden_states and nnsight.

Run with ``make bench`` (``pytest -q -s -p no:cacheprovider tests/benchmarks -m bench``);
a plain ``pytest`` (make test) skips it: the autouse fixture below skips unless the ``-m``
expression selects the bench marker. (It is not a tests/benchmarks/conftest.py because the
suite imports helpers with ``from helpers import ...``, and a second conftest module
would shadow tests/conftest.py.)

Setup: a randomly initialised ~110M-parameter Llama (float32, eval, ``torch.manual_seed(0)``),
256 prompts of random token ids (48–128 tokens), sorted by length (``store_order``),
left-padded batches of 16. Every method reads all L+1 residual sites (block inputs 0..L−1 and
the final pre-norm residual) at the last 5 positions, over the same batches:

(a) floor   ``model.base_model(input_ids, attention_mask, use_cache=False)`` under
            ``torch.inference_mode()``, no hooks (the call ``extract_batch`` makes, without
            hooks); ``model(...)`` with the LM head is reported as a reference line.
(b) ours    the library's real path: ``create_store`` + ``extract_to_store`` (tokenise with
            ``tokenize_prompts``, ``read_residual`` hooks on ``model.base_model``, value check,
            ``store.write_batch`` per batch) + ``finalize_store``, into a tmp-dir Zarr store.
            It tokenises the prompt strings itself, with a word-level tokenizer that maps the
            word ``t{i}`` to id ``i``: the batches it builds are the same tensors as the
            pre-tokenised batches the other methods get (checked below).
(c) hidden  ``model.base_model(..., output_hidden_states=True)`` with
            ``config.tie_last_hidden_states = False`` (transformers 5 otherwise replaces
            ``hidden_states[-1]`` with the normed output; this makes it the pre-norm
            residual, the same values as ours), gather the 5 positions, copy to numpy.
(d) nnsight ``NNsight`` wrapping a copy of ``model.base_model`` (nnsight instruments the
            modules it wraps, so it gets its own copy with the same weights), saving
            ``layers[l].input`` and ``norm.input`` at the 5 positions, copy to numpy.

Each method is warmed up on one batch. Then, per repeat, the methods are interleaved batch
by batch (all five on batch 0, in an order that rotates every batch, then batch 1, ...), so
that load drift on a shared machine hits all of them alike; a method's time for a repeat is
its sum over the batches (for ours plus creating and finalising that repeat's store). The
median over ``BENCH_REPEATS`` repeats is what the targets use; the paired per-batch ratio
and overhead (method vs floor on the same batch, back to back) are reported alongside.

Peak RSS of extracting 2048 vs 256 prompts with (b) is measured in fresh subprocesses
(rss_worker.py) with the smaller ``BENCH_MEM_MODEL`` (~11M parameters, so that 2048 prompts
take minutes, not an hour, on CPU).

Environment knobs (for dry runs on a busy machine):
  BENCH_SCALE      multiplies every prompt count (default 1; e.g. 0.125 → 32 and 256/32 prompts)
  BENCH_REPEATS    timed repeats per method (default 3)
  BENCH_MODEL      preset for the timing runs (default 100m; small, tiny)
  BENCH_MEM_MODEL  preset for the memory runs (default small)
  BENCH_THREADS    torch intra-op threads for the timing runs (default: torch's default)
  BENCH_OUT        output JSON (default artifacts/bench/activations.json at full size,
                   artifacts/bench/activations-<model>-scale<s>.json otherwise)
"""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from bench_common import (
    BATCH_SIZE,
    MAX_LEN,
    MIN_LEN,
    POSITIONS,
    PRESETS,
    all_layers,
    build_model,
    build_tokenizer,
    create_bench_store,
    extract_batches,
    machine_info,
    make_prompts,
    n_params,
    tokenized_batches,
)

from refusal_atlas.analysis.extraction import check_values, extract_batch
from refusal_atlas.data import store
from refusal_atlas.model.chat import tokenize_prompts

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
PRESET = os.environ.get("BENCH_MODEL", "100m")
MEM_PRESET = os.environ.get("BENCH_MEM_MODEL", "small")
THREADS = int(os.environ["BENCH_THREADS"]) if os.environ.get("BENCH_THREADS") else None

TARGET_OURS_OVER_FLOOR = 1.10
TARGET_RSS_RATIO = 1.10


def scaled(n: int) -> int:
    """``n * BENCH_SCALE`` prompts, a whole number of batches, at least two batches."""
    return max(2 * BATCH_SIZE, int(round(n * SCALE / BATCH_SIZE)) * BATCH_SIZE)


N_PROMPTS = scaled(256)
MEM_SIZES = (scaled(256), scaled(2048))


_SELECTS_BENCH = re.compile(r"(?<!not )\bbench\b")


@pytest.fixture(autouse=True)
def _only_when_bench_selected(request):
    """Skip unless ``-m`` names the bench marker other than as ``not bench``."""
    if not _SELECTS_BENCH.search(request.config.getoption("-m") or ""):
        pytest.skip("benchmark: run it with `make bench` (pytest -m bench)")


def output_path() -> Path:
    if os.environ.get("BENCH_OUT"):
        return Path(os.environ["BENCH_OUT"])
    name = "activations.json" if (SCALE == 1 and PRESET == "100m") else f"activations-{PRESET}-scale{SCALE:g}.json"
    return REPO / "artifacts" / "bench" / name


# --- the methods: each takes the list of pre-tokenised batches --------------------------------


def gather_index(seq_len: int) -> torch.Tensor:
    return torch.tensor([seq_len + p for p in POSITIONS])


def floor_body(model, batches) -> None:
    with torch.inference_mode():
        for enc in batches:
            model.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)


def floor_full(model, batches) -> None:
    with torch.inference_mode():
        for enc in batches:
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)


def hidden_states_batch(model, enc) -> np.ndarray:
    out = model.base_model(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False, output_hidden_states=True
    )
    idx = gather_index(enc["input_ids"].shape[1])
    return torch.stack([h.index_select(1, idx) for h in out.hidden_states], dim=1).float().numpy()


def hidden_states(model, batches) -> list[np.ndarray]:
    previous = getattr(model.config, "tie_last_hidden_states", None)
    model.config.tie_last_hidden_states = False  # hidden_states[-1] = pre-norm final residual
    try:
        with torch.inference_mode():
            return [hidden_states_batch(model, enc) for enc in batches]
    finally:
        model.config.tie_last_hidden_states = previous


def nnsight_batch(traced, n_layers: int, enc) -> np.ndarray:
    idx = gather_index(enc["input_ids"].shape[1])
    saved = []
    with traced.trace(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False):
        for layer in range(n_layers):
            saved.append(traced.layers[layer].input[:, idx].save())
        saved.append(traced.norm.input[:, idx].save())
    return torch.stack(saved, dim=1).float().numpy()


def nnsight_all(traced, n_layers: int, batches) -> list[np.ndarray]:
    with torch.inference_mode():
        return [nnsight_batch(traced, n_layers, enc) for enc in batches]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rss_run(n: int, tmp: Path) -> dict:
    """Extract ``n`` prompts into a Zarr store in a fresh interpreter; its peak-RSS report."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "rss_worker.py"), str(n), MEM_PRESET, str(tmp)],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"rss_worker {n} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.bench
@pytest.mark.timeout(0)
def test_extraction_benchmark(tmp_path):
    nnsight = pytest.importorskip("nnsight")
    if THREADS:
        torch.set_num_threads(THREADS)
    info_start = machine_info()
    model = build_model(PRESET)
    tok = build_tokenizer(model.config.vocab_size)
    prompts = make_prompts(N_PROMPTS, model.config.vocab_size)
    batches = tokenized_batches(tok, prompts)
    layers = all_layers(model)
    n_layers = model.config.num_hidden_layers
    formatted = prompts["formatted"].tolist()

    # The batches are what the prompts say (word t{i} -> id i), left-padded.
    first = batches[0]
    row = first["input_ids"][0][first["attention_mask"][0].bool()].tolist()
    assert row == [int(w[1:]) for w in formatted[0].split()]

    traced = nnsight.NNsight(copy.deepcopy(model.base_model).eval())

    # Same values from every reading method (batch 0), so they are compared doing the same work.
    with torch.inference_mode():
        ours0 = extract_batch(model, tok, formatted[:BATCH_SIZE], layers, POSITIONS, MAX_LEN)
    hs0 = hidden_states(model, batches[:1])[0]
    nn0 = nnsight_all(traced, n_layers, batches[:1])[0]
    assert ours0.shape == (len(batches[0]["input_ids"]), n_layers + 1, len(POSITIONS), model.config.hidden_size)
    np.testing.assert_allclose(hs0, ours0, rtol=0, atol=1e-5)
    np.testing.assert_allclose(nn0, ours0, rtol=0, atol=1e-5)

    nb = len(batches)
    # One step = one method on one batch. Ours writes into the store of the current repeat.
    steps = {
        "a_floor_base_model": lambda b, path: floor_body(model, [batches[b]]),
        "a_ref_full_model_lm_head": lambda b, path: floor_full(model, [batches[b]]),
        "b_ours_extract_to_zarr": lambda b, path: extract_batches(model, tok, path, prompts, [b]),
        "c_output_hidden_states": lambda b, path: hidden_states(model, [batches[b]]),
        "d_nnsight": lambda b, path: nnsight_all(traced, n_layers, [batches[b]]),
    }
    names = list(steps)

    # Warm-up: one batch each.
    warm_path = tmp_path / "warmup.zarr"
    create_bench_store(model, warm_path, prompts)
    warmup = {name: timed(lambda fn=fn: fn(0, warm_path)) for name, fn in steps.items()}

    # Timed repeats. Methods are interleaved batch by batch, in an order that rotates every
    # batch, so that the load of a shared machine drifts over all of them alike; a method's
    # time for a repeat is the sum over batches (plus, for ours, creating and finalising
    # the store of that repeat).
    per_batch = {name: np.zeros((REPEATS, nb)) for name in names}
    store_fixed = {"create_store": [], "finalize_store": []}
    for r in range(REPEATS):
        path = tmp_path / f"ours{r}.zarr"
        store_fixed["create_store"].append(timed(lambda: create_bench_store(model, path, prompts)))
        for b in range(nb):
            k = (r * nb + b) % len(names)
            for name in names[k:] + names[:k]:
                per_batch[name][r, b] = timed(lambda fn=steps[name]: fn(b, path))
        store_fixed["finalize_store"].append(timed(lambda: store.finalize_store(path)))
        opened = xr.open_zarr(path, chunks=None, consolidated=True)
        assert bool(opened.attrs["complete"]) and opened["resid"].shape == (
            N_PROMPTS,
            n_layers + 1,
            len(POSITIONS),
            model.config.hidden_size,
        )
        np.testing.assert_array_equal(opened["resid"][:BATCH_SIZE].values, ours0)
        print(
            f"  repeat {r + 1}/{REPEATS}: " + ", ".join(f"{name} {per_batch[name][r].sum():.2f} s" for name in names),
            flush=True,
        )

    times = {name: per_batch[name].sum(axis=1).tolist() for name in names}
    times["b_ours_extract_to_zarr"] = [
        t + c + f
        for t, c, f in zip(times["b_ours_extract_to_zarr"], store_fixed["create_store"], store_fixed["finalize_store"])
    ]
    # Paired per-batch view: method minus floor on the same batch, back to back.
    floor_pb = per_batch["a_floor_base_model"]
    overhead_ms = {name: float(np.median(per_batch[name] - floor_pb)) * 1e3 for name in names}
    paired_ratio = {name: float(np.median(per_batch[name] / floor_pb)) for name in names}

    # Diagnostics for (b): what tokenisation, the value check and the Zarr store cost alone.
    t_tok = timed(
        lambda: [
            tokenize_prompts(tok, formatted[b * BATCH_SIZE : (b + 1) * BATCH_SIZE], MAX_LEN)
            for b in range(len(batches))
        ]
    )
    values = [ours0[: len(enc["input_ids"])] for enc in batches]
    t_check = timed(lambda: [check_values(v, prompts["prompt_id"].tolist(), layers, "float32") for v in values])

    def zarr_only():
        path = tmp_path / "zarr_only.zarr"
        create_bench_store(model, path, prompts)
        for b, v in enumerate(values):
            store.write_batch(path, b, v)
        store.finalize_store(path)

    t_zarr = timed(zarr_only)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor = med["a_floor_base_model"]
    ours_t = med["b_ours_extract_to_zarr"]
    ratios = {
        "ours_over_floor": ours_t / floor,
        "full_model_over_floor": med["a_ref_full_model_lm_head"] / floor,
        "hidden_states_over_floor": med["c_output_hidden_states"] / floor,
        "nnsight_over_floor": med["d_nnsight"] / floor,
        "ours_over_hidden_states": ours_t / med["c_output_hidden_states"],
        "ours_over_nnsight": ours_t / med["d_nnsight"],
    }

    # Memory: fresh subprocesses, small then large. The target is on the process's own peak
    # RSS (VmHWM) and on the peak during extraction alone (VmHWM reset just before it, so a
    # transient of model set-up cannot hide growth); both must hold.
    rss = {str(n): rss_run(n, tmp_path) for n in MEM_SIZES}
    small, large = rss[str(MEM_SIZES[0])], rss[str(MEM_SIZES[1])]
    rss_ratios = {
        "process_peak": large["process_peak_kb"] / small["process_peak_kb"],
        "ru_maxrss_reference_only": large["ru_maxrss_kb"] / small["ru_maxrss_kb"],
    }
    if small["extraction_peak_kb"] and large["extraction_peak_kb"]:
        rss_ratios["extraction_peak"] = large["extraction_peak_kb"] / small["extraction_peak_kb"]
    rss_ratio = max(rss_ratios["process_peak"], rss_ratios.get("extraction_peak", 0.0))
    growth_mib = {
        str(n): ((r["extraction_peak_kb"] or r["rss_after_kb"]) - r["rss_before_extraction_kb"]) / 1024
        for n, r in rss.items()
    }

    targets = {
        "ours_over_floor_le_1.10": ratios["ours_over_floor"] <= TARGET_OURS_OVER_FLOOR,
        "ours_faster_than_hidden_states": ours_t < med["c_output_hidden_states"],
        "ours_faster_than_nnsight": ours_t < med["d_nnsight"],
        "rss_ratio_le_1.10": rss_ratio <= TARGET_RSS_RATIO,
    }
    info_end = machine_info()
    result = {
        "benchmark": "activations extraction",
        "command": " ".join(sys.argv),
        "env": {k: v for k, v in os.environ.items() if k.startswith("BENCH_")},
        "machine": {**info_start, "loadavg_at_end": info_end["loadavg_1_5_15"]},
        "setup": {
            "model_preset": PRESET,
            "model_config": PRESETS[PRESET],
            "params_base_model": n_params(model.base_model),
            "params_total": n_params(model),
            "dtype": "float32",
            "n_prompts": N_PROMPTS,
            "batch_size": BATCH_SIZE,
            "n_batches": len(batches),
            "prompt_lengths": [MIN_LEN, MAX_LEN],
            "tokens_total_padded": int(sum(b["input_ids"].numel() for b in batches)),
            "tokens_total_real": int(sum(int(b["attention_mask"].sum()) for b in batches)),
            "layers": layers,
            "positions": POSITIONS,
            "repeats": REPEATS,
            "store_dtype": "float32",
            "mem_model_preset": MEM_PRESET,
            "mem_model_config": PRESETS[MEM_PRESET],
            "mem_sizes": list(MEM_SIZES),
        },
        "seconds": {
            "median": med,
            "all": times,
            "warmup_one_batch": warmup,
            "per_batch": {k: v.tolist() for k, v in per_batch.items()},
            "ours_store_create": store_fixed["create_store"],
            "ours_store_finalize": store_fixed["finalize_store"],
        },
        "paired_per_batch": {"median_ratio_to_floor": paired_ratio, "median_overhead_ms_per_batch": overhead_ms},
        "diagnostics_seconds": {
            "b_tokenize_all_batches": t_tok,
            "b_check_values_all_batches": t_check,
            "b_zarr_create_write_finalize_all_batches": t_zarr,
        },
        "ratios": ratios,
        "rss": {
            "runs": rss,
            "ratios_large_over_small": rss_ratios,
            "ratio_checked": rss_ratio,
            "growth_during_extraction_mib": growth_mib,
        },
        "targets": {"ours_over_floor_max": TARGET_OURS_OVER_FLOOR, "rss_ratio_max": TARGET_RSS_RATIO, "met": targets},
    }
    out = output_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(
        f"Extraction benchmark: {PRESET} Llama ({n_params(model.base_model) / 1e6:.1f}M body+embed), {N_PROMPTS} "
        f"prompts, {len(batches)} batches of {BATCH_SIZE}, {n_layers + 1} sites x {len(POSITIONS)} positions; median "
        f"of {REPEATS}; torch threads {info_start['torch_threads']}, cpus {info_start['cpu_count']}, loadavg "
        f"{info_start['loadavg_1_5_15'][0]:.2f} -> {info_end['loadavg_1_5_15'][0]:.2f}"
    )
    print(
        f"{'method':28s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'x floor':>8s} {'paired x':>9s} "
        f"{'+ms/batch':>10s}"
    )
    for name in names:
        print(
            f"{name:28s} {med[name]:9.2f} {min(times[name]):8.2f} {max(times[name]):8.2f} {med[name] / floor:8.3f} "
            f"{paired_ratio[name]:9.3f} {overhead_ms[name]:10.1f}"
        )
    print(
        "  (x floor: ratio of medians of repeat totals; paired x / +ms/batch: median over batches of the same batch's "
        "time over / minus the floor's, run back to back)"
    )
    print(
        f"  (b) parts alone: tokenise {t_tok:.3f} s, check_values {t_check:.3f} s, Zarr create+write+finalize "
        f"{t_zarr:.3f} s"
    )
    print(
        f"ours/floor {ratios['ours_over_floor']:.3f} (target <= {TARGET_OURS_OVER_FLOOR}); ours/hidden_states "
        f"{ratios['ours_over_hidden_states']:.3f}; ours/nnsight {ratios['ours_over_nnsight']:.3f} (targets < 1)"
    )
    for n, r in rss.items():
        print(
            f"peak RSS ({MEM_PRESET} model) {n:>5s} prompts: process {r['process_peak_kb'] / 1024:7.1f} MiB, during "
            f"extraction {(r['extraction_peak_kb'] or 0) / 1024:7.1f} MiB (RSS before "
            f"{r['rss_before_extraction_kb'] / 1024:.1f}, growth {growth_mib[n]:.1f} MiB), extraction "
            f"{r['wall_s']:.1f} s"
        )
    print(
        f"RSS ratios {MEM_SIZES[1]}/{MEM_SIZES[0]}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in rss_ratios.items())
        + f" (target: process and extraction peaks <= {TARGET_RSS_RATIO})"
    )
    print(f"targets met: {targets}")
    print(f"wrote {out}")

    failed = [name for name, ok in targets.items() if not ok]
    assert not failed, f"benchmark targets not met: {failed}; see {out}"
