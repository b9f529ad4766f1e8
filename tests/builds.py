"""The pipelines the end-to-end tests read, each built once per session by tests/conftest.py, in the background.

A build is a fresh copy of the repository that ``prepare`` turns into the build's own (a params profile, a cut-down
prompt set; cheap, and may ``pytest.skip``) and the shell command, run in the copy, that builds it. The session
fixture of the same name (conftest.py) waits for the command and returns the copy; the command's output is in
``repro.log`` there. Order matters: the builds run one after the other in this order, and the tests that read
them run in it too, after every test that reads none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from helpers import SHARED, apply_profile, reduce_repo, run, shared_datasets


@dataclass(frozen=True)
class Build:
    prepare: Callable[[Path], str]  # repository copy -> the shell command that builds it there
    # `dvc repro model` (demo training, the heaviest stage) first, with the machine to itself, before any test runs:
    # the default pipeline's training time is a recorded metric, measured honestly on 2 cores.
    train_first: bool = False


def _smoke(repo: Path) -> str:
    apply_profile(repo, "profiles/smoke.yaml")
    return "dvc repro"


def _default(repo: Path) -> str:
    return "dvc repro"


# SmolLM2-135M-Instruct (tests/e2e/test_smollm2_pipeline.py): the three categories it refuses most (10-11 of their
# first 48 prompts each with 16 new tokens and the keyword judge), so every direction has refused prompts (HR) to
# learn from, and the benign pool, 48 prompts each.
SMOLLM2_CATEGORIES = ["humanizing", "unsupported", "crime_assistance"]
SMOLLM2_SETS = [*SMOLLM2_CATEGORIES, "benign"]
SMOLLM2_STEERED = ["humanizing", "pooled", "sae_pooled"]
SMOLLM2_PER_SET = {**dict.fromkeys(SMOLLM2_CATEGORIES, 48), "benign": 48}
# Cross-lingual transfer on the real model (PolyRefuse, where ../shared/datasets has it): English and two of
# PolyRefuse's European languages, 16 prompts a side.
LANGUAGES = ["en", "fr", "de"]
POLYREFUSE = SHARED / "datasets/polyrefuse"


def _smollm2(repo: Path) -> str:
    reduce_repo(repo, SMOLLM2_SETS, SMOLLM2_PER_SET)
    if POLYREFUSE.is_dir():
        manifest = yaml.safe_load((repo / "prompts/manifest.yaml").read_text())
        (repo / "prompts/raw").mkdir()
        manifest["crosslingual"] = []
        for language in LANGUAGES:
            entry = {"language": language}
            for side in ("harmful", "harmless"):
                name = f"{side}_test_translated_{language}.json"
                (repo / "prompts/raw" / name).write_bytes((POLYREFUSE / name).read_bytes())
                entry[side] = {"format": "polyrefuse", "file": f"raw/{name}", "limit": 16}
            manifest["crosslingual"].append(entry)
        (repo / "prompts/manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["prompts"]["min_per_category"] = min(SMOLLM2_PER_SET.values())
    params["model"]["name"] = "smollm2"
    params["baseline"]["max_new_tokens"] = 12  # "I'm sorry" or "I cannot" come first
    # Alpha 1 (norm units) breaks SmolLM2's answers; at 0.25 adding the pooled direction steers (measured there).
    params["directions"].update(select="cosmic", n_random=1, n_draws=2, crosslingual_alpha=0.25)
    params["geometry"].update(n_draws=2, n_permutations=10, max_clusters=3, cv_folds=2)
    params["sae"].update(d_sae=1024, k=16, steps=150, steer=["pooled"])
    params["steering"].update(
        alphas=[1.0],
        max_new_tokens=8,
        n_bootstrap=100,
        n_per_bucket=8,
        controlled_only=True,
        directions=SMOLLM2_STEERED,
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=test", "commit", "-qam", "reduced profile"], repo)
    return "dvc repro"


# The study's recipe (tests/e2e/test_study_recipe.py) on the smoke profile and this one on top. The demo model never
# saw these datasets' prompts, so it may answer or refuse any of them: directions learn from every prompt of a set
# (filter: label) rather than from its refused and answered ones. What is checked is the recipe's plumbing (sources,
# fallbacks, judge validation, the languages' tokenisation), none of it the trained model's behaviour: 60 training
# steps instead of the smoke profile's 300.
STUDY_TINY = {
    "model": {"demo": {"steps": 60}},
    "directions": {"filter": "label"},
    "steering": {"directions": ["pooled", "over_refusal"]},
}


def _study(repo: Path) -> str:
    datasets = shared_datasets()
    (repo / "tiny.yaml").write_text(yaml.safe_dump(STUDY_TINY))
    return f"refusal-atlas study run --from {datasets} profiles/smoke.yaml tiny.yaml"


# By fixture name. `pipeline`, the smoke profile (every stage, on every category, with little work), is what most
# end-to-end tests read; `demo_pipeline`, the default demo pipeline (params.yaml, what `make repro` runs), only the
# tests of the demo's behaviour.
BUILDS = {
    "pipeline": Build(_smoke, train_first=True),
    "smollm2_pipeline": Build(_smollm2),
    "study_pipeline": Build(_study),
    "demo_pipeline": Build(_default, train_first=True),
}
