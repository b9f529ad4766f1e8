"""The Zarr activation store: schema, chunking, dtypes, completion, and clear failures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr

from refusal_atlas.analysis.extraction import ActivationValueError, check_values
from refusal_atlas.data import store


def _prompts(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": [f"p{i:03d}" for i in range(n)],
            "category": ["a"] * n,
            "role": ["target"] * n,
            "split": ["train", "test"] * (n // 2) + ["val"] * (n % 2),
            "refused": [i % 3 == 0 for i in range(n)],
            "n_tokens": np.arange(n) + 5,
        }
    )


def _build(path, n=10, batch=4, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n, 3, 2, 8)).astype(np.float32) * 10
    store.create_store(
        path,
        _prompts(n),
        [0, 1, 2],
        [-2, -1],
        ["<e>", "\n"],
        8,
        dtype,
        batch,
        {"inputs_fingerprint": "fp", "model_id": "m"},
    )
    for b in store.pending_batches(path):
        store.write_batch(path, b, values[b * batch : (b + 1) * batch])
    store.finalize_store(path)
    return values


def test_schema_chunks_and_lazy_readback(tmp_path):
    path = tmp_path / "s.zarr"
    values = _build(path)
    ds = store.open_store(path, expect={"model_id": "m"})
    assert ds["resid"].dims == ("prompt", "layer", "position", "hidden")
    assert list(ds.position.values) == [-2, -1] and list(ds.position_token.values) == ["<e>", "\n"]
    assert list(ds.prompt_id.values[:2]) == ["p000", "p001"] and ds.refused.dtype == bool
    assert ds.attrs["complete"] is True and ds.attrs["logical_dtype"] == "float32"
    # Lazy: nothing is loaded until asked, and no dask is involved.
    assert not isinstance(ds["resid"].variable._data, np.ndarray)
    np.testing.assert_array_equal(store.load_resid(ds), values)
    arr = zarr.open_group(path, mode="r")["resid"]
    assert arr.chunks == (4, 3, 2, 8), "one chunk is one write batch covering every layer, position and hidden unit"
    codec = arr.metadata.codecs[-1]
    assert type(codec).__name__ == "ZstdCodec" and codec.level == 1
    assert (path / "zarr.json").read_text().count("consolidated_metadata") == 1
    assert xr.open_zarr(path, chunks=None)["resid"].shape == (10, 3, 2, 8)


def test_unfinished_store_is_refused_and_resumes(tmp_path):
    path = tmp_path / "s.zarr"
    store.create_store(
        path, _prompts(10), [0, 1, 2], [-2, -1], ["a", "b"], 8, "float32", 4, {"inputs_fingerprint": "fp"}
    )
    store.write_batch(path, 1, np.ones((4, 3, 2, 8), np.float32))
    assert store.pending_batches(path) == [0, 2]
    assert store.is_resumable(path, "fp") and not store.is_resumable(path, "other")
    with pytest.raises(store.StoreError, match="unfinished"):
        store.open_store(path)
    with pytest.raises(store.StoreError, match="not written yet"):
        store.finalize_store(path)


def test_mismatched_attribute_is_named(tmp_path):
    path = tmp_path / "s.zarr"
    _build(path)
    with pytest.raises(store.StoreError, match=r"attribute 'model_id' is 'm' but the current run expects 'other'"):
        store.open_store(path, expect={"model_id": "other"})


def test_bfloat16_stored_as_uint16_bits(tmp_path):
    path = tmp_path / "s.zarr"
    values = _build(path, dtype="bfloat16")
    ds = store.open_store(path)
    assert ds["resid"].dtype == np.uint16 and ds.attrs["logical_dtype"] == "bfloat16"
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(store.load_resid(ds), expected)


def test_float16_round_trip_and_overflow(tmp_path):
    path = tmp_path / "s.zarr"
    values = _build(path, dtype="float16")
    np.testing.assert_array_equal(
        store.load_resid(store.open_store(path)), values.astype(np.float16).astype(np.float32)
    )
    big = np.zeros((2, 3, 2, 8), np.float32)
    big[1, 2, 0, 0] = 7e4
    with pytest.raises(ActivationValueError, match=r"float16 overflow.*\['q1'\].*\[12\]"):
        check_values(big, ["q0", "q1"], [10, 11, 12], "float16")


def test_nan_names_prompt_and_layer():
    values = np.zeros((3, 2, 1, 4), np.float32)
    values[2, 1, 0, 3] = np.nan
    with pytest.raises(ActivationValueError, match=r"NaN or inf.*\['c'\] at layer\(s\) \[7\]"):
        check_values(values, ["a", "b", "c"], [6, 7], "float32")


def test_corrupt_chunk_is_a_clear_error(tmp_path):
    path = tmp_path / "s.zarr"
    _build(path)
    chunk = next(p for p in (path / "resid").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage" * 10)
    ds = store.open_store(path)
    with pytest.raises(store.StoreError, match="chunk is corrupt"):
        store.load_resid(ds)


def test_missing_store_message(tmp_path):
    with pytest.raises(store.StoreError, match="no activation store"):
        store.open_store(tmp_path / "none.zarr")
