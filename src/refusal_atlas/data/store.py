"""Activation stores: the only module that touches Zarr.

A store is an xarray Dataset in a Zarr v3 group:

- ``resid``: ``(prompt, layer, position, hidden)``, the residual stream at block inputs
  0…L−1 and the final pre-norm residual L, at the end-of-instruction offsets;
- ``done``: ``(prompt,)``, the completion mask that makes extraction resumable;
- prompt coordinates ``prompt_id``, ``category``, ``role``, ``split``, ``refused``,
  ``n_tokens``; ``position_token`` on ``position``;
- attributes: model identity, ``template_sha256``, ``dtype``, ``logical_dtype``,
  ``inputs_fingerprint``, ``code_version``, ``complete``.

Prompts are stored in batch order (length-sorted), so each write batch is exactly one
chunk along ``prompt`` and two processes never share a chunk. Metadata is
consolidated once, when the store is finalised; a store that is not ``complete`` is
refused by ``open_store``.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from zarr.codecs import ZstdCodec

from refusal_atlas.errors import RefusalAtlasError

DIMS = ("prompt", "layer", "position", "hidden")
PROMPT_COORDS = ("prompt_id", "category", "role", "split", "refused", "n_tokens")
STORAGE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
FLOAT16_MAX = 65504.0

warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)


class StoreError(RefusalAtlasError):
    """A store that is missing, incomplete, corrupt or does not match what the caller expects."""


def create_store(
    path: Path,
    prompts: pd.DataFrame,
    layers: Sequence[int],
    positions: Sequence[int],
    position_tokens: Sequence[str],
    d_model: int,
    dtype: str,
    batch_size: int,
    attrs: dict,
) -> None:
    """Create an empty store (any old one at ``path`` is removed).

    ``prompts`` holds one row per prompt in store order with the ``PROMPT_COORDS``
    columns. The ``resid`` chunk is one batch of prompts × every layer, position and
    hidden unit, compressed with zstd level 1.
    """
    if dtype not in STORAGE_DTYPES:
        raise StoreError(f"unsupported activation dtype '{dtype}'; choose one of {', '.join(STORAGE_DTYPES)}")
    missing = [c for c in PROMPT_COORDS if c not in prompts.columns]
    if missing:
        raise StoreError(f"prompt table lacks coordinate column(s) {missing}")
    if path.exists():
        shutil.rmtree(path)
    coords = {name: ("prompt", _column(prompts[name])) for name in PROMPT_COORDS}
    coords.update(
        {
            "layer": np.asarray(layers, dtype=np.int64),
            "position": np.asarray(positions, dtype=np.int64),
            "position_token": ("position", np.asarray(position_tokens, dtype=object)),
        }
    )
    skeleton = xr.Dataset(coords=coords)
    # The fingerprint is written last: a store cut short while being created (disk full, kill)
    # has none, so is_resumable() rejects it and the next run rebuilds it.
    fingerprint = attrs.get("inputs_fingerprint")
    skeleton.attrs.update(
        {
            **{k: v for k, v in attrs.items() if k != "inputs_fingerprint"},
            "dtype": STORAGE_DTYPES[dtype],
            "logical_dtype": dtype,
            "complete": False,
            "batch_size": int(batch_size),
        }
    )
    skeleton.to_zarr(path, mode="w", consolidated=False, zarr_format=3)
    group = zarr.open_group(path, mode="a")
    n = len(prompts)
    group.create_array(
        "resid",
        shape=(n, len(layers), len(positions), d_model),
        chunks=(batch_size, len(layers), len(positions), d_model),
        dtype=STORAGE_DTYPES[dtype],
        compressors=ZstdCodec(level=1),
        dimension_names=list(DIMS),
        fill_value=0,
    )
    group.create_array(
        "done", shape=(n,), chunks=(batch_size,), dtype="bool", dimension_names=["prompt"], fill_value=False
    )
    if fingerprint is not None:
        group.attrs["inputs_fingerprint"] = fingerprint


def _column(series: pd.Series) -> np.ndarray:
    """Strings as object arrays (Zarr v3 variable-length strings); numbers and booleans as they are."""
    values = series.to_numpy()
    return values.astype(object) if values.dtype.kind in "OUST" else values


def read_attrs(path: Path) -> dict:
    """Attributes of a store, or {} when there is none."""
    try:
        return dict(zarr.open_group(path, mode="r").attrs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return {}


def is_resumable(path: Path, fingerprint: str) -> bool:
    """True when ``path`` holds a store built from the same inputs (possibly unfinished)."""
    attrs = read_attrs(path)
    return bool(attrs) and attrs.get("inputs_fingerprint") == fingerprint


def pending_batches(path: Path) -> list[int]:
    """Indices of write batches whose prompts are not all marked done."""
    group = zarr.open_group(path, mode="r")
    done = group["done"][:]
    size = int(group.attrs["batch_size"])
    return [b for b in range(-(-len(done) // size)) if not done[b * size : (b + 1) * size].all()]


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """Convert float activations to the storage dtype (bfloat16 → uint16 bits, rounded to nearest even)."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)
    return values.astype(STORAGE_DTYPES[dtype])


def decode(values: np.ndarray, logical_dtype: str) -> np.ndarray:
    """Stored values as float32 (bfloat16 bits are widened exactly)."""
    if logical_dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def write_batch(path: Path, batch: int, values: np.ndarray) -> None:
    """Write one batch (``[batch prompts, layer, position, hidden]`` float) as one chunk, then mark it done."""
    group = zarr.open_group(path, mode="a")
    size = int(group.attrs["batch_size"])
    start = batch * size
    stop = start + values.shape[0]
    group["resid"][start:stop] = encode(values, group.attrs["logical_dtype"])
    group["done"][start:stop] = True


def finalize_store(path: Path) -> None:
    """Mark a fully written store complete and consolidate its metadata (once)."""
    group = zarr.open_group(path, mode="a")
    if not group["done"][:].all():
        raise StoreError(f"{path}: cannot finalise, {int((~group['done'][:]).sum())} prompts are not written yet")
    group.attrs["complete"] = True
    zarr.consolidate_metadata(path)


def open_store(path: Path, expect: dict | None = None) -> xr.Dataset:
    """Open a finished store lazily (no dask), checking its schema and ``expect``-ed attributes.

    Raises ``StoreError`` naming what was found and what was expected.
    """
    if not Path(path).exists():
        raise StoreError(f"{path}: no activation store here; run `dvc repro` to build it")
    attrs = read_attrs(path)
    if attrs and not attrs.get("complete"):
        raise StoreError(
            f"{path}: the store is unfinished (extraction was interrupted); rerun `dvc repro` to resume it"
        )
    try:
        ds = xr.open_zarr(path, chunks=None, consolidated=True)
    except Exception as err:  # noqa: BLE001 - any failure to open is a corrupt or foreign store
        raise StoreError(
            f"{path}: cannot open as an activation store ({type(err).__name__}: {err}); delete it and rerun `dvc repro`"
        ) from None
    if not ds.attrs.get("complete"):
        raise StoreError(
            f"{path}: the store is unfinished (extraction was interrupted); rerun `dvc repro` to resume it"
        )
    if "resid" not in ds or ds["resid"].dims != DIMS:
        found = ds["resid"].dims if "resid" in ds else "no 'resid' variable"
        raise StoreError(f"{path}: expected variable 'resid' with dims {DIMS}, found {found}")
    for name in PROMPT_COORDS + ("position_token",):
        if name not in ds.coords:
            raise StoreError(f"{path}: missing coordinate '{name}'")
    for key, want in (expect or {}).items():
        got = ds.attrs.get(key)
        if got != want:
            raise StoreError(
                f"{path}: attribute '{key}' is {got!r} but the current run expects {want!r}; the store was written for "
                "other inputs (a different model or template?). Rerun `dvc repro` to rebuild it."
            )
    return ds


def load_resid(ds: xr.Dataset, **isel) -> np.ndarray:
    """Decoded float32 values of ``resid`` (optionally ``isel``-ected first); reading a corrupt chunk raises
    StoreError."""
    try:
        raw = ds["resid"].isel(**isel).values
    except Exception as err:  # noqa: BLE001 - codec errors come in many types
        raise StoreError(
            f"cannot read activations ({type(err).__name__}: {err}); a chunk is corrupt: delete the store and rerun "
            "`dvc repro`"
        ) from None
    return decode(raw, ds.attrs.get("logical_dtype", "float32"))


DIRECTION_DIMS = ("direction", "layer", "position", "hidden")


def save_directions(path: Path, ds: xr.Dataset) -> None:
    """Write the directions Dataset (``direction`` ``(direction, layer, position, hidden)`` unit
    vectors, ``norm``, ``n_target``, ``n_baseline``, lineage attrs) atomically, consolidated."""
    from refusal_atlas.data.atomic import atomic_path

    if ds["direction"].dims != DIRECTION_DIMS:
        raise StoreError(f"directions must have dims {DIRECTION_DIMS}, got {ds['direction'].dims}")
    with atomic_path(path) as tmp:
        ds.drop_indexes("direction_name", errors="ignore").to_zarr(tmp, mode="w", consolidated=True, zarr_format=3)


def open_stores(folder: Path, names: list[str], identity: dict) -> dict[str, xr.Dataset]:
    """The activation stores ``folder/<name>.zarr`` of ``names``, each checked to come from the model of ``identity``
    (the model stage's identity.json: its weights fingerprint and chat template)."""
    expect = {
        "model_weights_fingerprint": identity["weights_fingerprint"],
        "template_sha256": identity["template_sha256"],
    }
    return {name: open_store(Path(folder) / f"{name}.zarr", expect=expect) for name in names}


def open_directions(path: Path, d_model: int | None = None) -> xr.Dataset:
    """Open a directions file, checking its schema and (optionally) its hidden size against the model."""
    if not Path(path).exists():
        raise StoreError(f"{path}: no directions file; run `dvc repro directions`")
    try:
        ds = xr.open_zarr(path, chunks=None, consolidated=True)
    except Exception as err:  # noqa: BLE001
        raise StoreError(f"{path}: cannot open as a directions file ({type(err).__name__}: {err})") from None
    if "direction" not in ds or ds["direction"].dims != DIRECTION_DIMS:
        raise StoreError(f"{path}: expected variable 'direction' with dims {DIRECTION_DIMS}")
    if "direction_name" in ds.coords:
        ds = ds.set_xindex("direction_name")
    if d_model is not None and ds.sizes["hidden"] != d_model:
        raise StoreError(
            f"{path}: directions have hidden size {ds.sizes['hidden']} but the model has d_model {d_model}; "
            "they were computed for another model. Rerun `dvc repro directions` for this model."
        )
    return ds
