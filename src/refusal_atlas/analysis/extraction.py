"""Streaming extraction of end-of-instruction residuals into an activation store.

Memory does not grow with the number of prompts: the read hook gathers only the
end-of-instruction positions on the device, each batch is written (one Zarr chunk)
as soon as it is computed, and prompts are batched by length. Extraction resumes:
only batches not marked done are computed, and a store built from other inputs is
rebuilt from scratch.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from refusal_atlas.config import ActivationsConfig, ModelConfig
from refusal_atlas.data import store
from refusal_atlas.digest import json_sha256
from refusal_atlas.errors import RefusalAtlasError
from refusal_atlas.model.chat import check_prompt_lengths, eoi_tokens, format_prompts, tokenize_prompts
from refusal_atlas.model.hooks import read_residual

# Bumped when extraction changes what a store holds, so stores built by older code are rebuilt.
CODE_VERSION = "activations-v1"


class ActivationValueError(RefusalAtlasError):
    """NaN/inf activations, or values that do not fit the storage dtype."""


def inputs_fingerprint(prompts: pd.DataFrame, identity: dict, settings: dict) -> str:
    """sha256 over the prompts (ids, texts, verdicts), the model identity and the extraction settings."""
    payload = {
        "prompts": prompts[["prompt_id", "text", "refused"]].astype(str).values.tolist(),
        "identity": identity,
        "settings": settings,
    }
    return json_sha256(payload)


def store_order(prompts: pd.DataFrame, n_tokens: Sequence[int]) -> pd.DataFrame:
    """Prompts sorted by token length (then id), so each write batch holds similar lengths.

    The order depends only on the prompts, so every run and every process agrees on
    which prompts form which chunk.
    """
    out = prompts.assign(n_tokens=np.asarray(n_tokens, dtype=np.int64))
    return out.sort_values(["n_tokens", "prompt_id"], ignore_index=True)


def check_values(values: np.ndarray, prompt_ids: Sequence[str], layers: Sequence[int], dtype: str) -> None:
    """Raise naming prompt ids and layers when values are NaN/inf or overflow float16."""
    bad = ~np.isfinite(values)
    kind = "NaN or inf"
    if not bad.any() and dtype == "float16":
        bad = np.abs(values) > store.FLOAT16_MAX
        kind = f"|x| > {store.FLOAT16_MAX:g} (float16 overflow; use activations.dtype float32 or bfloat16)"
    if bad.any():
        rows, cols = np.nonzero(bad.any(axis=(2, 3)))
        ids = sorted({prompt_ids[r] for r in rows})
        bad_layers = sorted({int(layers[c]) for c in cols})
        raise ActivationValueError(
            f"{kind} in activations of prompt(s) {ids[:10]} at layer(s) {bad_layers}; nothing was written for this "
            "batch"
        )


def shard_batches(batches: Sequence[int], rank: int, world: int) -> list[int]:
    """The write batches process ``rank`` of ``world`` extracts: every world-th one.

    Batches are whole chunks, so two processes never write the same chunk.
    """
    return [b for b in batches if b % world == rank]


@torch.inference_mode()
def extract_batch(
    model, tokenizer, formatted: Sequence[str], layers: Sequence[int], positions: Sequence[int], max_tokens: int
) -> np.ndarray:
    """Residuals of one batch: float32 ``[batch, layer, position, hidden]``.

    Runs the decoder body only (``model.base_model``): the language-model head is not
    needed to read the residual stream.
    """
    enc = tokenize_prompts(tokenizer, list(formatted), max_tokens)
    device = model.get_input_embeddings().weight.device
    with read_residual(model, list(layers), list(positions)) as capture:
        model.base_model(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), use_cache=False
        )
    return capture.stack().float().numpy()


def extract_to_store(
    model,
    tokenizer,
    path: Path,
    formatted: Sequence[str],
    prompt_ids: Sequence[str],
    layers: Sequence[int],
    positions: Sequence[int],
    batches: Sequence[int],
    batch_size: int,
    dtype: str,
    max_tokens: int,
    progress: bool = True,
) -> int:
    """Extract the given write batches (store order) into an existing store; return how many were written."""
    for b in tqdm(batches, desc=f"activations {path.stem}", unit="batch", disable=not progress):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        values = extract_batch(model, tokenizer, formatted[sl], layers, positions, max_tokens)
        check_values(values, prompt_ids[sl], layers, dtype)
        store.write_batch(path, b, values)
    return len(batches)


def extract_set(
    model,
    tokenizer,
    identity: dict,
    prompts: pd.DataFrame,
    path: Path,
    *,
    name: str,
    template: tuple,
    dtype: str,
    batch_size: int,
    max_prompt_tokens: int,
    rank: int = 0,
    world: int = 1,
    barrier=lambda: None,
    progress: bool = True,
) -> dict:
    """Bring the store of one prompt set at ``path`` up to date with its inputs; return what was done.

    ``prompts``: the set's rows (``prompt_id``, ``text``, ``refused`` and the store's prompt
    coordinates); ``template``: (system prompt, chat template, template kwargs). The store is
    keyed by ``inputs_fingerprint`` over prompts, model identity and settings: a store with the
    same key is resumed (only batches not marked done are computed; none when it is complete),
    any other is rebuilt. Under a distributed launch every rank calls this; rank 0 creates and
    finalises the store and each rank extracts its own chunk-aligned shard, ``barrier`` between.
    Returns ``{"n_prompts", "n_batches_written", "n_batches_resumed", "rebuilt"}``.
    """
    formatted = format_prompts(tokenizer, prompts.text.tolist(), *template)
    n_tokens = check_prompt_lengths(tokenizer, formatted, max_prompt_tokens, prompts.prompt_id.tolist())
    prompts = store_order(prompts.assign(formatted=formatted), n_tokens)
    span = eoi_tokens(tokenizer, *template)
    layers = list(range(identity["n_layers"] + 1))
    settings = {
        "dtype": dtype,
        "batch_size": batch_size,
        "positions": span.offsets,
        "layers": layers,
        "code": CODE_VERSION,
        "template": template,
    }
    key = inputs_fingerprint(prompts, identity, settings)
    rebuilt = not store.is_resumable(path, key)
    if rank == 0 and rebuilt:
        attrs = {
            **{k if k.startswith(("model_", "template_")) else f"model_{k}": v for k, v in identity.items()},
            "inputs_fingerprint": key,
            "code_version": CODE_VERSION,
            "prompt_set": name,
        }
        store.create_store(
            path, prompts, layers, span.offsets, span.tokens, identity["d_model"], dtype, batch_size, attrs
        )
    barrier()
    pending = store.pending_batches(path)
    extract_to_store(
        model,
        tokenizer,
        path,
        prompts.formatted.tolist(),
        prompts.prompt_id.tolist(),
        layers,
        span.offsets,
        shard_batches(pending, rank, world),
        batch_size,
        dtype,
        max_prompt_tokens,
        progress=progress and bool(pending),
    )
    barrier()
    if rank == 0 and not store.read_attrs(path).get("complete"):  # also a store killed after its last batch
        store.finalize_store(path)
    return {
        "n_prompts": len(prompts),
        "n_batches_written": len(pending),
        "n_batches_resumed": -(-len(prompts) // batch_size) - len(pending),
        "rebuilt": rebuilt,
    }


def extract_sets(
    model, tokenizer, identity: dict, prompts_dir: Path, verdicts_dir: Path, out: Path, cfg: ActivationsConfig,
    mcfg: ModelConfig, rank: int = 0, world: int = 1, barrier=lambda: None, progress: bool = True,
) -> dict:  # fmt: skip
    """Bring one store per prompt set up to date: ``out/<set>.zarr`` for every ``prompts_dir/<set>.parquet``.

    Each set's prompts are joined with its baseline verdicts (``verdicts_dir/<set>.parquet``)
    and handed to ``extract_set``; stores of sets no longer in ``prompts_dir`` are removed (on
    rank 0). Returns ``extract_set``'s record per set.
    """
    names = sorted(p.stem for p in prompts_dir.glob("*.parquet"))
    template = (mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs)
    done = {}
    for name in names:
        verdicts = pd.read_parquet(verdicts_dir / f"{name}.parquet")[["prompt_id", "refused"]]
        prompts = pd.read_parquet(prompts_dir / f"{name}.parquet")
        done[name] = extract_set(
            model, tokenizer, identity, prompts.merge(verdicts, on="prompt_id", how="left", validate="one_to_one"),
            out / f"{name}.zarr", name=name, template=template, dtype=cfg.dtype, batch_size=mcfg.batch_size,
            max_prompt_tokens=mcfg.max_prompt_tokens, rank=rank, world=world, barrier=barrier, progress=progress,
        )  # fmt: skip
    if rank == 0:
        for stale in sorted(set(out.glob("*.zarr")) - {out / f"{n}.zarr" for n in names}):
            shutil.rmtree(stale)
    return done
