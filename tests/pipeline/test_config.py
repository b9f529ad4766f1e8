"""params.yaml is validated by typed configs, and dvc.yaml declares exactly the keys each stage reads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers import REPO
from pydantic import BaseModel

from refusal_atlas.config import STAGE_SECTIONS, ConfigError, Params, load_params, parse_params, stage_param_keys


def test_repository_params_validate(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.model.name == "demo"
    assert params.prompts.splits.train + params.prompts.splits.val + params.prompts.splits.test == pytest.approx(1.0)


def test_defaults_equal_the_repository_params(repo_root):
    """params.yaml spells out every default, so a reader sees every knob."""
    assert load_params(repo_root / "params.yaml") == Params()


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("steering:\n  alphass: [1.0]\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert str(path) in message and "steering.alphass" in message and "unknown key" in message


def test_wrong_type_names_expectation(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("directions:\n  n_per_side: many\n")
    with pytest.raises(ConfigError, match=r"directions\.n_per_side.*valid integer.*'many'"):
        load_params(path)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"steering": {"alphas": []}}, "steering.alphas"),
        ({"prompts": {"splits": {"train": 0.5, "val": 0.5, "test": 0.5}}}, "sum to 1"),
        ({"model": {"dtype": "float64"}}, "model.dtype"),
        ({"judge": {"method": ["keywords", "keywords"]}}, "twice"),
        ({"directions": {"position": 3}}, "directions.position"),
    ],
)
def test_bad_values_rejected(data, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        parse_params(data)


def test_params_file_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(path)


def _models(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _models(field.annotation)


def test_every_field_has_a_description():
    missing = [
        f"{m.__name__}.{name}" for m in _models(Params) for name, f in m.model_fields.items() if not f.description
    ]
    assert missing == []


def test_dvc_yaml_params_equal_config_keys(repo_root):
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    assert stages, "dvc.yaml has no stages"
    for name, stage in stages.items():
        body = stage.get("do", stage)
        declared = sorted(p for p in body.get("params", []) if isinstance(p, str))
        assert declared == stage_param_keys(name), f"stage {name}: dvc.yaml params differ from its config"
        assert name in STAGE_SECTIONS
        assert (repo_root / "stages" / f"{name}.py").is_file(), f"stage {name} has no stages/{name}.py"


def test_no_stage_reads_tracking_or_downstream_sections():
    """Changing a steering key must never rerun an upstream stage."""
    for stage in ("prompts", "model", "baseline", "activations", "directions", "geometry", "sae"):
        assert not any(k.startswith(("steering.", "tracking.")) for k in stage_param_keys(stage)), stage


def test_dvc_yaml_lists_no_set_or_direction(repo_root):
    """The manifest is the one list of prompt sets; dvc.yaml names folders, never a set or a direction."""
    from refusal_atlas.data.prompts import load_manifest

    names = set(load_manifest(repo_root / "prompts/manifest.yaml").sets()) | {"pooled", "random_0"}
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    assert "vars" not in dvc and all("foreach" not in s for s in dvc["stages"].values())
    paths = [
        d
        for s in dvc["stages"].values()
        for d in s.get("deps", []) + [next(iter(o)) if isinstance(o, dict) else o for o in s.get("outs", [])]
    ]
    assert not [p for p in paths if any(f"/{n}." in p or f"/{n}/" in p or p.endswith(f"/{n}") for n in names)]
    for stage in ("directions", "geometry"):
        assert "artifacts/activations" in dvc["stages"][stage]["deps"]
    assert "artifacts/steering" in dvc["stages"]["report"]["deps"]


# Modules that plumb a stage (arguments, params validation, atomic writes, MLflow logging,
# error types) but compute nothing it writes; a change there need not rerun the pipeline.
PLUMBING = {"data/atomic", "config", "pipeline/harness", "errors", "pipeline/tracking"}


def _library_imports(path, src) -> set[str]:
    """refusal_atlas modules a file imports, at module level or inside functions, as paths under
    src/refusal_atlas without the suffix ("model/load"); a sub-package's own ``__init__`` is empty."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal_atlas"):
            base = node.module.removeprefix("refusal_atlas").lstrip(".").replace(".", "/")
            for alias in node.names:  # `from refusal_atlas.data import store` imports a module
                sub = f"{base}/{alias.name}".lstrip("/")
                found.add(sub if (src / f"{sub}.py").is_file() else base)
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("refusal_atlas.").replace(".", "/")
                for a in node.names
                if a.name.startswith("refusal_atlas.")
            }
    return found


def test_every_stage_depends_on_the_library_code_it_runs(repo_root):
    """A change to any library module a stage runs (directly or through other modules) reruns it.

    Missing deps leave stale outputs: `dvc repro` says "didn't change" after, say, the chat
    formatting in model/chat.py changed what the activation stores hold."""
    src = repo_root / "src/refusal_atlas"
    dvc = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        used, todo = set(), list(_library_imports(repo_root / f"stages/{name}.py", src))
        while todo:
            module = todo.pop()
            if module not in used:
                used.add(module)
                todo += [] if module in PLUMBING else list(_library_imports(src / f"{module}.py", src))
        deps = stage.get("do", stage)["deps"]
        declared = {
            d.removeprefix("src/refusal_atlas/").removesuffix(".py")
            for d in deps
            if d.startswith("src/refusal_atlas/") and d.endswith(".py")
        }
        assert used - PLUMBING == declared, (
            name,
            "undeclared:",
            sorted(used - PLUMBING - declared),
            "unused:",
            sorted(declared - used),
        )


def test_profile_overrides_are_validated_and_become_dvc_set_params(tmp_path):
    from refusal_atlas.config import profile_overrides

    assert profile_overrides(REPO / "profiles/smollm2.yaml", REPO / "params.yaml") == {
        "model.name": "smollm2",
        "model.batch_size": 64,
        "baseline.max_new_tokens": 32,
        "directions.n_val": 8,
        "directions.crosslingual_alpha": 0.25,
        "sae.steer": ["pooled"],
        "steering.alphas": [0.5, 1.0],
        "steering.controlled_only": True,
        "steering.n_per_bucket": 24,
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("directions:\n  n_val: 0\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml: invalid params.*'directions\.n_val'"):
        profile_overrides(bad, REPO / "params.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "refusal_atlas.cli", "experiment", str(bad), "--name", "x", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "directions.n_val" in proc.stderr and "Traceback" not in proc.stderr
    dry = subprocess.run(
        [
            sys.executable,
            "-m",
            "refusal_atlas.cli",
            "experiment",
            "profiles/smollm2.yaml",
            "--name",
            "smollm2",
            "--dry-run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert 'exp run --temp -n smollm2 -S model.name="smollm2"' in dry and "-S steering.alphas=[0.5, 1.0]" in dry
