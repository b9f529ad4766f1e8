"""Sparse-autoencoder analysis (the study's section 2.2): which SAE latents separate refused from answered prompts.

An SAE is read from, and written in, the format sae-lens saves (``SAE.save_model``): a folder
with ``cfg.json`` and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``,
``W_dec [d_sae, d_in]``, ``b_dec``, and ``threshold`` for JumpReLU). The three inference
architectures sae-lens saves are supported: ``standard`` (ReLU), ``jumprelu`` and ``topk``,
in the 6.x layout (hook in ``metadata.hook_name``) and the older one (top-level
``hook_name``/``hook_point``, ``activation_fn: topk`` with ``activation_fn_kwargs.k``). The
reader is written here instead of importing sae-lens, whose import pulls in TransformerLens
and 41 packages (wandb, datasets, plotly among them) for what is a few matrix products;
``tests/analysis/test_sae.py`` checks that sae-lens loads what ``save_sae`` writes and that
both encode alike, when sae-lens is installed (``pip install -e '.[sae]'``).

``train_topk_sae`` trains a small TopK SAE (Gao et al. 2024) on residuals from the
activation stores, deterministically, so the analysis runs offline on the demo model. Per
direction, ``category_latents`` compares each latent's firing rate on the direction's refused
targets (HR) with its rate on the answered baseline prompts (BC), the same prompts the
direction was computed from; ``latent_overlap`` gives the share of top latents common to every
category and the pairwise Jaccard index; ``sae_direction`` is the mean of the top latents'
(unit) decoder rows, which the steering stage evaluates beside the difference-of-means
directions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.errors import RefusalAtlasError

SAE_CFG, SAE_WEIGHTS = "cfg.json", "sae_weights.safetensors"
PREFIX = "sae_"  # an SAE direction's name: sae_<direction>
ARCHITECTURES = ("standard", "jumprelu", "topk")
# The sae-lens release whose save format save_sae writes and the tests load back.
SAE_LENS_FORMAT = "6.54.12"
_NORMALIZE = ("none", "constant_norm_rescale", "layer_norm")
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


class SaeError(RefusalAtlasError):
    """An SAE folder that cannot be read, or does not fit the model and stores it is used with."""


@dataclass(frozen=True)
class SparseAutoencoder:
    """An SAE's weights (float32 numpy) and what its encoder does; ``layer`` is the block input it reads."""

    architecture: str
    W_enc: np.ndarray  # [d_in, d_sae]
    b_enc: np.ndarray  # [d_sae]
    W_dec: np.ndarray  # [d_sae, d_in]
    b_dec: np.ndarray  # [d_in]
    layer: int
    threshold: np.ndarray | None = None  # [d_sae], jumprelu
    k: int | None = None  # topk
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    hook_name: str = ""
    model_name: str | None = None

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Latent activations ``[n, d_sae]`` (float32) of residuals ``x [n, d_in]``, as sae-lens's ``encode``."""
        import torch

        w_enc, b_enc, b_dec = (torch.from_numpy(np.ascontiguousarray(a)) for a in (self.W_enc, self.b_enc, self.b_dec))
        dec_norm = torch.from_numpy(np.linalg.norm(self.W_dec, axis=1).astype(np.float32))
        out = []
        for start in range(0, len(x), batch):
            h = torch.from_numpy(np.ascontiguousarray(x[start : start + batch], dtype=np.float32))
            if self.normalize_activations == "constant_norm_rescale":
                h = h * (self.d_in**0.5) / h.norm(dim=-1, keepdim=True)
            elif self.normalize_activations == "layer_norm":
                h = h - h.mean(dim=-1, keepdim=True)
                h = h / (h.std(dim=-1, keepdim=True) + 1e-5)
            if self.apply_b_dec_to_input:
                h = h - b_dec
            pre = h @ w_enc + b_enc
            if self.architecture == "topk":
                if self.rescale_acts_by_decoder_norm:
                    pre = pre * dec_norm
                values, index = torch.topk(pre, k=self.k, dim=-1, sorted=False)
                acts = torch.zeros_like(pre).scatter(-1, index, values.relu())
            elif self.architecture == "jumprelu":
                acts = pre.relu() * (pre > torch.from_numpy(self.threshold)).to(pre.dtype)
            else:
                acts = pre.relu()
            out.append(acts.numpy())
        return np.concatenate(out) if out else np.zeros((0, self.d_sae), np.float32)


def _problem(path: Path, what: str, fix: str) -> SaeError:
    return SaeError(f"{path}: {what}. {fix}")


def hook_layer(hook_name: str, path: Path | str = "SAE") -> int:
    """The block input a residual-stream hook reads: ``blocks.<l>.hook_resid_pre`` is block ``l``'s input and
    ``blocks.<l>.hook_resid_post`` block ``l + 1``'s (the stores' layer index)."""
    match = _HOOK.match(hook_name or "")
    if not match:
        raise _problem(
            Path(path),
            f"hook {hook_name!r} is not a residual-stream hook (expected blocks.<layer>.hook_resid_pre or _post)",
            "refusal-atlas compares SAE latents with residual-stream directions; use an SAE trained on the residual "
            "stream",
        )
    return int(match.group(1)) + (match.group(2) == "post")


def _cfg_fields(cfg: dict) -> dict:
    """The keys this reader needs, from a sae-lens 6.x cfg.json or an older one."""
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or ""
    architecture = cfg.get("architecture")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str")
    k = cfg.get("k")
    if activation == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        architecture, k = "topk", cfg["activation_fn_kwargs"]["k"]
    normalize = cfg.get("normalize_activations", "none")
    if isinstance(normalize, bool):  # pre-6 files
        normalize = "expected_average_only_in" if normalize else "none"
    return {
        "architecture": architecture or "standard",
        "hook_name": hook,
        "k": k,
        "d_in": cfg.get("d_in"),
        "d_sae": cfg.get("d_sae"),
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "normalize_activations": normalize or "none",
        "rescale_acts_by_decoder_norm": bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        "model_name": meta.get("model_name") or cfg.get("model_name"),
    }


def load_sae(path: Path | str) -> SparseAutoencoder:
    """Read an SAE folder in sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``).

    Raises ``SaeError`` naming the folder, what is wrong and how to fix it: a missing file, an
    architecture other than standard/jumprelu/topk, an activation normalisation other than none,
    constant_norm_rescale or layer_norm (fold it into the weights with sae-lens first), a hook
    that is not the residual stream, or weights whose shapes disagree with ``d_in``/``d_sae``.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_path, weights_path = path / SAE_CFG, path / SAE_WEIGHTS
    for file in (cfg_path, weights_path):
        if not file.is_file():
            raise _problem(
                path,
                f"no {file.name}",
                f"an SAE folder holds {SAE_CFG} and {SAE_WEIGHTS}, as sae-lens's SAE.save_model writes them; point "
                "sae.path at such a folder, or set it to null to train the built-in SAE",
            )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise _problem(cfg_path, f"not valid JSON ({err})", "save the SAE again with sae-lens") from None
    f = _cfg_fields(cfg)
    if f["architecture"] not in ARCHITECTURES:
        raise _problem(
            cfg_path,
            f"architecture {f['architecture']!r} is not supported (expected one of {', '.join(ARCHITECTURES)})",
            "use a standard (ReLU), JumpReLU or TopK SAE",
        )
    if f["normalize_activations"] not in _NORMALIZE:
        raise _problem(
            cfg_path,
            f"normalize_activations {f['normalize_activations']!r} is not supported (expected one of "
            f"{', '.join(_NORMALIZE)})",
            "fold the normalisation into the weights with sae-lens (e.g. fold_activation_norm_scaling_factor) and save "
            "it again",
        )
    if f["architecture"] == "topk" and not isinstance(f["k"], int):
        raise _problem(cfg_path, f"a topk SAE needs an integer k, found {f['k']!r}", "set k in cfg.json")
    layer = hook_layer(f["hook_name"], cfg_path)
    raw = load_file(str(weights_path))
    if "log_threshold" in raw and "threshold" not in raw:  # older JumpReLU checkpoints, as sae-lens converts them
        raw["threshold"] = np.exp(raw.pop("log_threshold"))
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if f["architecture"] == "jumprelu" else [])
    if missing := [n for n in needed if n not in raw]:
        raise _problem(
            weights_path,
            f"missing tensor(s) {', '.join(missing)} for a {f['architecture']} SAE (found {', '.join(sorted(raw))})",
            "save the SAE again with sae-lens",
        )
    w = {n: raw[n].astype(np.float32) for n in needed}
    d_in, d_sae = f["d_in"] or w["W_enc"].shape[0], f["d_sae"] or w["W_enc"].shape[1]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes |= {"b_enc": (d_sae,), "threshold": (d_sae,)}
    if bad := [f"{n} {tuple(w[n].shape)} (expected {shapes[n]})" for n in needed if tuple(w[n].shape) != shapes[n]]:
        raise _problem(weights_path, f"tensor shapes disagree with d_in={d_in}, d_sae={d_sae}: {'; '.join(bad)}",
                       "the weights and cfg.json come from different SAEs; save the SAE again")  # fmt: skip
    return SparseAutoencoder(
        architecture=f["architecture"],
        W_enc=w["W_enc"],
        b_enc=w["b_enc"],
        W_dec=w["W_dec"],
        b_dec=w["b_dec"],
        threshold=w.get("threshold"),
        k=f["k"] if f["architecture"] == "topk" else None,
        layer=layer,
        apply_b_dec_to_input=f["apply_b_dec_to_input"],
        normalize_activations=f["normalize_activations"],
        rescale_acts_by_decoder_norm=f["rescale_acts_by_decoder_norm"],
        hook_name=f["hook_name"],
        model_name=f["model_name"],
    )


def save_sae(sae: SparseAutoencoder, path: Path) -> None:
    """Write ``sae`` as sae-lens's ``SAE.save_model`` does (6.x layout), so sae-lens's ``SAE.load_from_disk`` reads it.

    ``path`` is written whole or not at all (a temporary sibling, renamed)."""
    from safetensors.numpy import save_file

    from refusal_atlas.data.atomic import atomic_path

    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    cfg = {
        "architecture": sae.architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAE_LENS_FORMAT,
            "sae_lens_training_version": None,
            "hook_name": sae.hook_name or f"blocks.{sae.layer}.hook_resid_pre",
            "model_name": sae.model_name,
        },
    }
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm)
    with atomic_path(Path(path)) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp / SAE_WEIGHTS))
        (tmp / SAE_CFG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def train_topk_sae(
    x: np.ndarray,
    d_sae: int,
    k: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    layer: int,
    model_name: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[SparseAutoencoder, dict]:
    """Train a TopK SAE on residuals ``x [n, d_in]`` (Gao et al. 2024: decoder rows kept at unit norm, encoder
    initialised as the decoder's transpose, b_dec at the data's mean, Adam on the mean squared error).

    The inputs are scaled so their mean squared norm is ``d_in`` during training and the scale is folded back into
    the weights, so the SAE reads raw residuals. Deterministic: seeded initialisation and batches, deterministic
    algorithms, 2 torch threads (restored after). Returns the SAE and ``{"loss_curve", "fvu", "dead_fraction",
    "n_train"}``: the fraction of variance unexplained and the share of latents that never fire on ``x``.
    """
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d_in = x.shape
    if n < batch_size:
        raise SaeError(
            f"the SAE is trained on {n} residual vectors, fewer than sae.batch_size={batch_size}; lower "
            "sae.batch_size or add prompts"
        )
    if not 0 < k <= d_sae:
        raise SaeError(f"sae.k={k} must be between 1 and sae.d_sae={d_sae}; lower k or raise d_sae")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        gen = torch.Generator().manual_seed(seed)
        data = torch.from_numpy(x)
        scale = float(np.sqrt(d_in / np.mean(np.sum(x.astype(np.float64) ** 2, axis=1))))
        data = data * scale
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec = torch.nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
        w_enc = torch.nn.Parameter(w_dec.detach().T.clone())
        b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        b_dec = torch.nn.Parameter(data.mean(0).clone())
        params = [w_enc, b_enc, w_dec, b_dec]
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
        variance = float(data.var(0).sum())
        curve = []
        for step in range(1, steps + 1):
            batch = data[torch.randint(0, n, (batch_size,), generator=gen)]
            pre = (batch - b_dec) @ w_enc + b_enc
            values, index = torch.topk(pre, k=k, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, index, values.relu())
            loss = ((acts @ w_dec + b_dec - batch) ** 2).sum(-1).mean() / variance
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                w_dec.div_(w_dec.norm(dim=1, keepdim=True))
            value = float(loss.item())
            curve.append((step, value))
            if on_step is not None:
                on_step(step, value)
        # Fold the input scale in: ((x s - b_dec) W_enc + b_enc) = ((x - b_dec / s) (s W_enc) + b_enc), and the
        # reconstruction of x s, divided by s, is x's.
        with torch.no_grad():
            sae = SparseAutoencoder(
                architecture="topk",
                W_enc=(w_enc.detach() * scale).numpy().copy(),
                b_enc=b_enc.detach().numpy().copy(),
                W_dec=(w_dec.detach() / scale).numpy().copy(),
                b_dec=(b_dec.detach() / scale).numpy().copy(),
                k=k,
                layer=layer,
                hook_name=f"blocks.{layer}.hook_resid_pre",
                model_name=model_name,
            )
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return sae, {"loss_curve": curve, **reconstruction_stats(sae, x), "n_train": int(n)}


def reconstruction_stats(sae: SparseAutoencoder, x: np.ndarray) -> dict:
    """``fvu`` (fraction of variance unexplained), ``l0`` (mean active latents) and ``dead_fraction`` of ``sae``
    on residuals ``x``."""
    acts = sae.encode(x)
    recon = acts @ sae.W_dec + sae.b_dec
    x64 = x.astype(np.float64)
    fvu = float(((recon - x64) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum())
    return {
        "fvu": fvu,
        "l0": float((acts > 0).sum(1).mean()),
        "dead_fraction": float(((acts > 0).sum(0) == 0).mean()),
    }


def firing_rates(sae: SparseAutoencoder, x: np.ndarray) -> np.ndarray:
    """Share of the rows of ``x`` on which each latent fires (activation > 0): ``[d_sae]``."""
    if not len(x):
        return np.zeros(sae.d_sae)
    return (sae.encode(x) > 0).mean(0).astype(np.float64)


def category_latents(sae: SparseAutoencoder, sides: Mapping[str, tuple[np.ndarray, np.ndarray]], top_k: int):
    """Per direction (``sides``: name → (target residuals HR, baseline residuals BC)), every latent's firing rate on
    each side and their difference, and the ``top_k`` latents with the largest positive difference (fewer where
    fewer fire more often on HR than on BC: a latent with no difference says nothing about the direction).

    Returns ``(table, top)``: a DataFrame with one row per direction and top latent (direction, rank, latent,
    rate_target, rate_baseline, rate_diff) and ``{name: [latent, ...]}``. Ties break towards the lower latent index,
    so the result does not depend on the sort.
    """
    rows, top = [], {}
    for name, (target, baseline) in sides.items():
        rt, rb = firing_rates(sae, target), firing_rates(sae, baseline)
        diff = rt - rb
        order = [int(i) for i in np.lexsort((np.arange(sae.d_sae), -diff))[:top_k] if diff[i] > 0]
        top[name] = order
        rows += [
            {
                "direction": name,
                "rank": r + 1,
                "latent": int(i),
                "rate_target": float(rt[i]),
                "rate_baseline": float(rb[i]),
                "rate_diff": float(diff[i]),
            }
            for r, i in enumerate(order)
        ]
    return pd.DataFrame(rows), top


def latent_overlap(top: Mapping[str, Sequence[int]]) -> tuple[float, pd.DataFrame]:
    """The share of top latents common to every direction in ``top`` (latents in all the top sets / top_k) and the
    pairwise Jaccard index |A ∩ B| / |A ∪ B|, as a DataFrame indexed both ways by direction name."""
    names = list(top)
    sets = [set(top[n]) for n in names]
    size = max((len(s) for s in sets), default=0)
    common = len(set.intersection(*sets)) / size if sets and size else 0.0
    jaccard = np.array([[len(a & b) / len(a | b) if a | b else 1.0 for b in sets] for a in sets])
    return float(common), pd.DataFrame(jaccard, index=names, columns=names)


def sae_direction(sae: SparseAutoencoder, latents: Sequence[int]) -> np.ndarray:
    """Unit vector along the mean of the given latents' decoder rows, each scaled to unit norm first (so one latent
    with a large decoder norm does not dominate)."""
    rows = sae.W_dec[list(latents)].astype(np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    mean = rows.mean(0)
    return mean / (np.linalg.norm(mean) or 1.0)
