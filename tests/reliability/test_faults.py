"""Faults from outside the code, on real parts: the disk fills during an activation extraction, and
two `dvc repro` runs start at once in one repository.

The disk is a real tmpfs mounted small (we run as root; without mount rights the test skips), the
extraction is the real `stages/activations.py` in its own process, and the concurrency case is two
real `dvc repro` processes in a real git copy of the repository.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from helpers import REPO, VENV_BIN, copy_repo, run
from tiny_models import WORDS, make_tokenizer, tiny_model

from refusal_atlas.config import load_params
from refusal_atlas.data import store
from refusal_atlas.model.load import compute_identity, load_model

pytestmark = pytest.mark.slow

# One thread each, and threads that sleep rather than spin while they wait: the tests share small
# machines with other work, where spinning OpenMP threads slow everything down many times over.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs allocates whole pages
N_PROMPTS, BATCH = 96, 4


# ------------------------------------------------------------------------------------------
# The disk fills
# ------------------------------------------------------------------------------------------


def _stage_inputs(work: Path) -> dict[str, Path]:
    """A tiny model directory as the model stage leaves it, and one prompt set with its verdicts."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["batch_size"] = BATCH
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    tok = make_tokenizer("llama3")
    model_dir = work / "model"
    tiny_model("llama", vocab=len(tok)).save_pretrained(model_dir / "weights")
    tok.save_pretrained(model_dir / "weights")
    cfg = load_params(work / "params.yaml").model
    loaded, loaded_tok = load_model(cfg, str(model_dir / "weights"))
    (model_dir / "identity.json").write_text(
        json.dumps(compute_identity(loaded, loaded_tok, cfg.name, cfg.revision, cfg.chat_template))
    )

    # Prompts of many lengths, so the length sort (store order) differs from the file order.
    words = WORDS.split()
    texts = [" ".join(words[(7 * i) % 60 : (7 * i) % 60 + 2 + i % 11]) + f" ({i})" for i in range(N_PROMPTS)]
    ids = [f"benign-{i:04d}" for i in range(N_PROMPTS)]
    prompts = pd.DataFrame(
        {
            "prompt_id": ids,
            "category": "benign",
            "role": "baseline",
            "split": [("train", "val", "test")[i % 3] for i in range(N_PROMPTS)],
            "text": texts,
            "source": "test",
            "sha256": [hashlib.sha256(t.encode()).hexdigest() for t in texts],
        }
    )
    verdicts = pd.DataFrame(
        {
            "prompt_id": ids,
            "refused": [i % 4 == 0 for i in range(N_PROMPTS)],
            "refusal_score": np.linspace(-5, 5, N_PROMPTS),
        }
    )
    for folder, table in (("sets", prompts), ("verdicts", verdicts)):  # as the prompts and baseline stages leave them
        (work / folder).mkdir()
        table.to_parquet(work / folder / "benign.parquet", index=False)
    return {"params": work / "params.yaml", "model": model_dir, "prompts": work / "sets", "verdicts": work / "verdicts"}


def _extract(work: Path, inputs: dict[str, Path], out: Path, check: bool = True) -> subprocess.CompletedProcess:
    """The activations stage on the one set; ``out`` is the store it writes (<folder>/benign.zarr)."""
    cmd = [
        sys.executable,
        str(REPO / "stages/activations.py"),
        "--params",
        str(inputs["params"]),
        "--prompts",
        str(inputs["prompts"]),
        "--verdicts",
        str(inputs["verdicts"]),
        "--model",
        str(inputs["model"]),
        "--out",
        str(out.parent),
        "--no-progress",
    ]
    return run(cmd, work, env=ONE_THREAD, check=check, timeout=300)


def _pages(path: Path) -> int:
    """Pages a tmpfs needs for the files under ``path``."""
    return sum(math.ceil(p.stat().st_size / PAGE) for p in path.rglob("*") if p.is_file())


def _mount_tmpfs(where: Path, pages: int) -> None:
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small tmpfs with")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={pages * PAGE // 1024}k", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs to fill ({proc.stderr.strip() or proc.returncode}); needs root or "
            "CAP_SYS_ADMIN"
        )


@pytest.fixture(scope="module")
def extraction(tmp_path_factory) -> tuple[Path, dict[str, Path], Path]:
    """(working folder, stage inputs, the store of an uninterrupted run) shared by the disk cases."""
    work = tmp_path_factory.mktemp("extraction")
    inputs = _stage_inputs(work)
    reference = work / "reference" / "benign.zarr"
    _extract(work, inputs, reference)
    group = zarr.open_group(reference, mode="r")
    assert group["done"][:].all() and group["resid"].shape[0] == N_PROMPTS and group.attrs["complete"]
    return work, inputs, reference


def _skeleton_and_batch_pages(reference: Path) -> tuple[int, int]:
    """Pages of the empty store, and of one write batch (its resid and done chunks)."""
    chunks = [
        p
        for p in reference.rglob("*")
        if p.is_file() and p.relative_to(reference).parts[:2] in (("resid", "c"), ("done", "c"))
    ]
    chunk_pages = sum(math.ceil(p.stat().st_size / PAGE) for p in chunks)
    return _pages(reference) - chunk_pages, -(-chunk_pages // -(-N_PROMPTS // BATCH))


def _assert_disk_full_message(proc: subprocess.CompletedProcess, out: Path) -> None:
    """Non-zero, and one last line on stderr naming the problem, the path and the fix; no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line.lower()]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr[-3000:]
    # The error names the file being written or, where the OS names none, the stage's output folder.
    assert errors[0].startswith(f"activations: error: no space left on the device while writing {out.parent}"), errors
    assert "free space on that disk" in errors[0] and "rerun `dvc repro`" in errors[0], errors


def _grow(disk: Path, pages: int) -> None:
    grow = subprocess.run(
        ["mount", "-o", f"remount,size={pages * PAGE // 1024}k", str(disk)], capture_output=True, text=True
    )
    assert grow.returncode == 0, grow.stderr


def test_disk_full_mid_extraction_fails_clearly_and_the_rerun_resumes_to_identical_data(extraction, tmp_path):
    work, inputs, reference = extraction
    ref_group = zarr.open_group(reference, mode="r")
    n_batches = -(-N_PROMPTS // BATCH)
    skeleton, per_batch = _skeleton_and_batch_pages(reference)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, skeleton + per_batch * n_batches // 2)  # room for the empty store and about half the batches
    try:
        out = disk / "benign.zarr"
        full = _extract(work, inputs, out, check=False)
        _assert_disk_full_message(full, out)

        # The leftover is refused as a finished store ...
        with pytest.raises(store.StoreError, match="unfinished"):
            store.open_store(out)
        assert not list(out.rglob("*.partial")), "a half-written chunk file was left behind"
        left = zarr.open_group(out, mode="r")
        done = left["done"][:]
        assert 0 < done.sum() < N_PROMPTS, (
            f"the disk should fill mid-extraction ({int(done.sum())} of {N_PROMPTS} done)"
        )
        # ... but is resumable from the same inputs, and every batch marked done holds exactly the
        # reference values, so a resume that skips those batches is right.
        assert store.is_resumable(out, ref_group.attrs["inputs_fingerprint"])
        pending = store.pending_batches(out)
        finished = [b for b in range(n_batches) if b not in pending]
        assert finished and pending
        for b in finished:
            rows = slice(b * BATCH, (b + 1) * BATCH)
            np.testing.assert_array_equal(left["resid"][rows], ref_group["resid"][rows], err_msg=f"batch {b}")

        # With space again (the same tmpfs, grown), the rerun computes only the pending batches.
        _grow(disk, 4 * _pages(reference))
        rerun = _extract(work, inputs, out)
        assert f"extracted: benign ({len(pending)} batches); the rest up to date; 1 process(es))" in rerun.stdout, (
            rerun.stdout
        )
        resumed, expected = store.open_store(out), store.open_store(reference)
        np.testing.assert_array_equal(store.load_resid(resumed), store.load_resid(expected))
        assert list(resumed.prompt_id.values) == list(expected.prompt_id.values)
        assert list(resumed.refused.values) == list(expected.refused.values)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_disk_full_while_creating_the_store_and_the_rerun_with_space_completes(extraction, tmp_path):
    work, inputs, reference = extraction
    skeleton, _ = _skeleton_and_batch_pages(reference)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, skeleton - 3)  # the empty store itself does not fit
    try:
        out = disk / "benign.zarr"
        _assert_disk_full_message(_extract(work, inputs, out, check=False), out)
        assert not (out / "done" / "zarr.json").exists(), "the disk should fill before the store is fully created"
        with pytest.raises(store.StoreError, match="unfinished"):
            store.open_store(out)

        _grow(disk, 4 * _pages(reference))
        rerun = _extract(work, inputs, out, check=False)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        np.testing.assert_array_equal(
            store.load_resid(store.open_store(out)), store.load_resid(store.open_store(reference))
        )
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------------------
# Two `dvc repro` at once
# ------------------------------------------------------------------------------------------

# While a stage runs, DVC releases its repository lock (.dvc/tmp/lock) and holds per-path read/write
# locks in .dvc/tmp/rwlock instead: a second `dvc repro` needing those paths is refused with this.
BUSY = "ERROR: failed to reproduce 'prompts': '{repo}/artifacts/prompts/"
BLOCKED = r"' is busy, it is being blocked by:\n\s+\(PID {pid}\): {dvc} repro model\n"
MANUAL = "If there are no processes with such PIDs, you can manually remove '{repo}/.dvc/tmp/rwlock' and try again."


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        return repr(exc)


def _writing(repo: Path, out: str) -> bool:
    """Whether a running DVC stage holds the write lock on ``out`` (DVC's .dvc/tmp/rwlock)."""
    try:
        held = json.loads((repo / ".dvc/tmp/rwlock").read_text()).get("write", {})
    except (OSError, ValueError):  # not there yet, or caught mid-write
        return False
    return any(path.endswith(out) for path in held)


def test_second_dvc_repro_is_refused_by_the_lock_and_nothing_is_corrupted(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["demo"].update(steps=100, augment=2)  # training for ~10 s: long enough to hold the lock
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("DVC_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1", **ONE_THREAD)

    run(["dvc", "repro", "prompts"], repo, env=ONE_THREAD)  # so the first run below goes straight to the model stage

    with (tmp_path / "first.out").open("w") as out, (tmp_path / "first.err").open("w") as err:
        first = subprocess.Popen(
            ["dvc", "repro", "model"], cwd=repo, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            # A generous deadline: the loop ends as soon as the stage holds its lock (1.3 s on an idle
            # 2-core host); CI once waited over 120 s here, with no output to say why.
            started = time.monotonic()
            deadline = started + 600
            while (
                time.monotonic() < deadline and first.poll() is None and not _writing(repo, "artifacts/model/weights")
            ):
                time.sleep(0.05)
            assert first.poll() is None and _writing(repo, "artifacts/model/weights"), (
                f"the first run should be inside the model stage after {time.monotonic() - started:.0f} s "
                f"(exit code {first.poll()}); .dvc/tmp/rwlock: {_read(repo / '.dvc/tmp/rwlock')}\n"
                f"stdout: {_read(tmp_path / 'first.out')[-2000:]}\nstderr: {_read(tmp_path / 'first.err')[-1500:]}"
            )

            second = run(["dvc", "repro", "model"], repo, env=ONE_THREAD, check=False, timeout=120)
            assert first.poll() is None, "the first run ended before the second was refused; the test proved nothing"
            assert second.returncode != 0, second.stdout + second.stderr
            # DVC checks the upstream prompts stage first: it would rewrite what the first run's model stage reads.
            assert second.stderr.startswith(BUSY.format(repo=repo)), second.stderr
            assert re.search(BLOCKED.format(pid=first.pid, dvc=re.escape(str(VENV_BIN / "dvc"))), second.stderr), (
                second.stderr
            )
            assert MANUAL.format(repo=repo) in second.stderr, second.stderr
            assert "Running stage" not in second.stdout + second.stderr
            first.wait(timeout=300)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
    first_out, first_err = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert first.returncode == 0, first_out[-2000:] + first_err[-3000:]
    assert "Running stage 'model'" in first_out and "Updating lock file 'dvc.lock'" in first_out, first_out

    # Nothing is corrupted: DVC agrees the recorded outputs are the ones on disk, no lock is left
    # held, and the model directory loads and runs.
    assert run(["dvc", "status", "model"], repo).stdout.strip().endswith("up to date."), "model stage is not up to date"
    held = json.loads((repo / ".dvc/tmp/rwlock").read_text())
    assert not any(held.values()), f"a DVC path lock is still held: {held}"
    weights = repo / "artifacts/model/weights"
    model = AutoModelForCausalLM.from_pretrained(weights)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    assert model.config.num_hidden_layers == params["model"]["demo"]["n_layers"]
    assert model.config.hidden_size == params["model"]["demo"]["d_model"]
    identity = json.loads((repo / "artifacts/model/identity.json").read_text())
    cfg = load_params(repo / "params.yaml").model
    assert compute_identity(*load_model(cfg, str(weights)), cfg.name, cfg.revision, cfg.chat_template) == identity
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I bake bread?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and bool(logits.isfinite().all())
