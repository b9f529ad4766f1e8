"""Read, add and ablate hooks on the residual stream, plus weight orthogonalisation.

Every hook is a context manager that removes what it registered in ``finally``, so an
exception inside the ``with`` block (or inside the forward pass) never leaves a model
steered. Sites are named one way everywhere, and the same names are used as store
coordinates:

- ``blocks.{l}.resid_pre``: input of block ``l`` (= HF ``hidden_states[l]``); for
  ``l == n_layers`` it is the input of the final norm, i.e. the pre-norm final residual.
- ``blocks.{l}.attn_out`` / ``blocks.{l}.mlp_out``: what block ``l``'s attention / MLP adds
  to the residual stream.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from refusal_atlas.model.layout import (
    ATTN_PROJ_NAMES,
    MLP_PROJ_NAMES,
    Layout,
    UnsupportedArchitectureError,
    find_layout,
)


def site_name(layer: int, kind: str = "resid_pre") -> str:
    """Stable site name, e.g. ``site_name(12) == 'blocks.12.resid_pre'``."""
    if kind not in ("resid_pre", "attn_out", "mlp_out"):
        raise ValueError(f"unknown site kind {kind!r}; expected resid_pre, attn_out or mlp_out")
    return f"blocks.{layer}.{kind}"


def _resid_module(layout: Layout, layer: int) -> nn.Module:
    """Module whose (first) input is residual site ``blocks.{layer}.resid_pre``."""
    if not 0 <= layer <= layout.n_layers:
        raise ValueError(
            f"layer {layer} out of range: the model has blocks 0..{layout.n_layers - 1} and the final residual at "
            f"{layout.n_layers}"
        )
    return layout.blocks[layer] if layer < layout.n_layers else layout.final_norm


# Decoder blocks are called with the residual as the first positional argument in every
# supported model, but a keyword call would be equally valid, so both are handled.
def _get_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _set_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _map_output(output, fn):
    """Apply ``fn`` to a module's output tensor, which attention modules return as ``(out, weights)``."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


@contextmanager
def _registered(register) -> Iterator[None]:
    """Run ``register(handles)`` and remove every handle it appended on exit, whatever happens."""
    handles: list = []
    try:
        register(handles)
        yield
    finally:
        for handle in handles:
            handle.remove()


class ResidualCapture:
    """Residual vectors gathered by ``read_residual``.

    Each forward call appends, per layer, a CPU tensor [batch, n_positions, d_model] in the
    model's dtype to ``calls[layer]``. ``stack()`` concatenates calls along the batch and returns
    [batch_total, n_layers_requested, n_positions, d_model].
    """

    def __init__(self, layers: list[int], positions: list[int]):
        self.layers = list(layers)
        self.positions = list(positions)
        self.sites = [site_name(layer) for layer in self.layers]
        self.calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        # Sequence length of each call at the first requested layer: the prompt length for
        # a prefill, 1 for each cached generation step.
        self.call_lengths: list[int] = []

    def _record(self, layer: int, x: torch.Tensor) -> None:
        # x: [batch, tokens, d_model]. Only the requested columns are gathered, on the
        # device, before the copy, so a long prompt never costs a full-activation copy.
        if x.shape[1] < max(-p for p in self.positions):
            raise ValueError(
                f"read_residual: positions {self.positions} need at least {max(-p for p in self.positions)} tokens, "
                f"got a call with {x.shape[1]}"
            )
        if layer == self.layers[0]:
            self.call_lengths.append(int(x.shape[1]))
        index = torch.tensor([x.shape[1] + p for p in self.positions], device=x.device)
        self.calls[layer].append(x.detach().index_select(1, index).to("cpu"))

    def stack(self) -> torch.Tensor:
        """[batch_total, n_layers_requested, n_positions, d_model], calls concatenated along batch."""
        counts = {len(v) for v in self.calls.values()}
        if counts == {0}:
            raise RuntimeError("read_residual captured nothing: run a forward pass inside the with block")
        if len(counts) != 1:
            raise RuntimeError(
                f"read_residual: layers saw different numbers of calls {counts}; was a forward interrupted?"
            )
        return torch.stack([torch.cat(self.calls[layer], dim=0) for layer in self.layers], dim=1)

    def clear(self) -> None:
        for layer in self.layers:
            self.calls[layer].clear()
        self.call_lengths.clear()


@contextmanager
def read_residual(model: nn.Module, layers: list[int], positions: list[int]) -> Iterator[ResidualCapture]:
    """Capture the residual stream at block inputs ``layers`` and negative ``positions``.

    Inputs: layer indices in 0..n_layers (n_layers = pre-norm final residual); positions as
    negative offsets from the end (valid for every row under left padding).
    Yields a ``ResidualCapture``; after the forward pass(es), ``capture.stack()`` is
    [batch, len(layers), len(positions), d_model] on the CPU in the model's dtype.
    """
    if not positions or any(p >= 0 for p in positions):
        raise ValueError(f"positions must be negative offsets from the end (e.g. [-5, -1]), got {positions}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"read_residual: layers {layers} list a layer twice")
    layout = find_layout(model)
    capture = ResidualCapture(layers, positions)

    def register(handles):
        for layer in capture.layers:

            def hook(module, args, kwargs, layer=layer):
                capture._record(layer, _get_input(args, kwargs))

            handles.append(_resid_module(layout, layer).register_forward_pre_hook(hook, with_kwargs=True))

    with _registered(register):
        yield capture


@contextmanager
def add_direction(model: nn.Module, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Add ``vector`` (d_model,), already scaled as alpha * r_hat, to the input of block ``layer``.

    The pre-hook runs on every forward call, so generated tokens (seq len 1 with a KV cache)
    are steered as well as the prompt. ``layer == n_layers`` adds to the final residual.
    """
    layout = find_layout(model)
    if vector.shape != (layout.d_model,):
        raise ValueError(f"add_direction: vector has shape {tuple(vector.shape)}, expected ({layout.d_model},)")
    cache: dict = {}

    def hook(module, args, kwargs):
        x = _get_input(args, kwargs)
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = vector.detach().to(device=x.device, dtype=x.dtype)
        return _set_input(args, kwargs, x + cache[key])

    with _registered(
        lambda h: h.append(_resid_module(layout, layer).register_forward_pre_hook(hook, with_kwargs=True))
    ):
        yield


def orthonormal_basis(basis: torch.Tensor) -> torch.Tensor:
    """[k, d] (or [d]) directions -> [d, k] float64 matrix Q with orthonormal columns spanning them."""
    basis = basis.detach().to(torch.float64).reshape(-1, basis.shape[-1])
    q, r = torch.linalg.qr(basis.T)  # q: [d, k]
    if torch.any(torch.abs(torch.diagonal(r)) < 1e-8 * torch.abs(r).max()):
        raise ValueError(
            f"the {basis.shape[0]} directions to ablate are linearly dependent (or zero); pass independent directions"
        )
    return q


@contextmanager
def _projected_everywhere(layout: Layout, project) -> Iterator[None]:
    """Apply ``project`` to every block's input (pre-hook) and every attention and MLP output added to the residual."""

    def pre_hook(module, args, kwargs):
        return _set_input(args, kwargs, project(_get_input(args, kwargs)))

    def out_hook(module, args, output):
        return _map_output(output, project)

    def register(handles):
        for i in range(layout.n_layers):
            handles.append(layout.blocks[i].register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(layout.attn_out[i].register_forward_hook(out_hook))
            handles.append(layout.mlp_out[i].register_forward_hook(out_hook))

    with _registered(register):
        yield


@contextmanager
def ablate_directions(model: nn.Module, basis: torch.Tensor) -> Iterator[None]:
    """Project the span of ``basis`` [k, d_model] out of the residual stream everywhere.

    Applies x <- x - (x Q) Q^T, with Q [d_model, k] an orthonormal basis (QR), to every
    block's input (pre-hook) and to every attention and MLP output that is added to the
    residual (forward hooks), on all positions including generated ones.
    """
    layout = find_layout(model)
    q64 = orthonormal_basis(basis)
    if q64.shape[0] != layout.d_model:
        raise ValueError(f"ablate_directions: basis has d={q64.shape[0]}, the model has d_model={layout.d_model}")
    cache: dict = {}

    def project(x: torch.Tensor) -> torch.Tensor:
        # The projection is computed in float32 at least, so that bfloat16 residuals of
        # norm ~100 do not leave a visible component behind from rounding in the dot product.
        dtype = torch.promote_types(x.dtype, torch.float32)
        key = (x.device, dtype)
        if key not in cache:
            cache[key] = q64.to(device=x.device, dtype=dtype)
        q = cache[key]
        xf = x.to(dtype)
        return (xf - (xf @ q) @ q.T).to(x.dtype)  # (xf @ q): [..., k]

    with _projected_everywhere(layout, project):
        yield


def _row_vectors(model: nn.Module, vectors: torch.Tensor, name: str) -> tuple[Layout, torch.Tensor]:
    """Check per-row vectors [batch, d_model] against the model; returns its layout and them in float64."""
    layout = find_layout(model)
    if vectors.ndim != 2 or vectors.shape[1] != layout.d_model:
        raise ValueError(
            f"{name}: vectors have shape {tuple(vectors.shape)}, expected [batch, {layout.d_model}] (one row per batch "
            "row)"
        )
    v64 = vectors.detach().to(torch.float64)
    if not bool(torch.isfinite(v64).all()):
        raise ValueError(f"{name}: vectors contain NaN or inf; pass finite directions")
    return layout, v64


def _check_batch(name: str, x: torch.Tensor, n_rows: int) -> None:
    if x.shape[0] != n_rows:
        raise ValueError(
            f"{name}: the forward pass has batch {x.shape[0]}, but {n_rows} per-row vectors were given; pass one "
            "vector per batch row"
        )


@contextmanager
def ablate_rows(model: nn.Module, units: torch.Tensor) -> Iterator[None]:
    """Project batch row b's own direction ``units[b]`` out of its residual stream everywhere.

    ``units`` [batch, d_model] (each row normalised here in float64; an all-zero row leaves its
    batch row unchanged). Like ``ablate_directions`` with one direction per row: applies
    x[b] <- x[b] - (x[b]·u_b) u_b, in float32 at least, to every block's input and every
    attention and MLP output added to the residual. Every forward pass inside the block must
    have exactly ``batch`` rows, in the order of ``units``.
    """
    layout, u64 = _row_vectors(model, units, "ablate_rows")
    length = u64.norm(dim=-1, keepdim=True)
    u64 = torch.where(length > 0, u64 / torch.where(length > 0, length, 1.0), 0.0)
    cache: dict = {}

    def project(x: torch.Tensor) -> torch.Tensor:
        _check_batch("ablate_rows", x, len(u64))
        # float32 at least, as in ablate_directions, so rounding in the dot product of
        # bfloat16 residuals leaves no visible component behind.
        dtype = torch.promote_types(x.dtype, torch.float32)
        key = (x.device, dtype)
        if key not in cache:
            cache[key] = u64.to(device=x.device, dtype=dtype)[:, :, None]  # [batch, d, 1]
        u = cache[key]
        xf = x.to(dtype)  # [batch, tokens, d]
        return (xf - torch.bmm(torch.bmm(xf, u), u.transpose(1, 2))).to(x.dtype)  # bmm(xf, u): [batch, tokens, 1]

    with _projected_everywhere(layout, project):
        yield


@contextmanager
def add_rows(model: nn.Module, layers: list[int], vectors: torch.Tensor) -> Iterator[None]:
    """Add ``vectors[b]`` [batch, d_model] to the input of block ``layers[b]``, for batch row b only.

    Like ``add_direction`` with one (layer, vector) per batch row: the vector is cast to the
    residual's dtype and added at every position; other rows at that block get exactly + 0.
    Every forward pass inside the block must have exactly ``batch`` rows.
    """
    layout, _ = _row_vectors(model, vectors, "add_rows")
    if len(layers) != len(vectors):
        raise ValueError(f"add_rows: {len(layers)} layers for {len(vectors)} vectors; pass one layer per vector")
    for layer in set(layers):
        _resid_module(layout, layer)  # range check
    vectors = vectors.detach()
    per_layer = {}
    for layer in sorted(set(layers)):
        rows = torch.tensor([l == layer for l in layers])
        per_layer[layer] = torch.where(rows[:, None], vectors, torch.zeros((), dtype=vectors.dtype))  # [batch, d]
    cache: dict = {}

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            x = _get_input(args, kwargs)
            _check_batch("add_rows", x, len(layers))
            key = (layer, x.device, x.dtype)
            if key not in cache:
                cache[key] = per_layer[layer].to(device=x.device, dtype=x.dtype)[:, None, :]  # [batch, 1, d]
            return _set_input(args, kwargs, x + cache[key])

        return hook

    def register(handles):
        for layer in per_layer:
            handles.append(_resid_module(layout, layer).register_forward_pre_hook(make_hook(layer), with_kwargs=True))

    with _registered(register):
        yield


def _project_output_rows(module: nn.Module, r: torch.Tensor) -> None:
    """W_out <- W_out - r r^T W_out (and b <- b - (b.r) r) for a map that writes d_model outputs."""
    w = module.weight.data
    w64, r_ = w.to(torch.float64), r.to(w.device)
    if isinstance(module, Conv1D):  # weight [in, d_model]: output coordinates are the columns
        w.copy_((w64 - torch.outer(w64 @ r_, r_)).to(w.dtype))
    elif isinstance(module, nn.Linear):  # weight [d_model, in]
        w.copy_((w64 - torch.outer(r_, r_ @ w64)).to(w.dtype))
    else:
        raise UnsupportedArchitectureError(
            f"cannot orthogonalise {type(module).__name__}: expected nn.Linear or Conv1D"
        )
    if getattr(module, "bias", None) is not None:
        b = module.bias.data
        b64 = b.to(torch.float64)
        b.copy_((b64 - (b64 @ r_) * r_).to(b.dtype))


def _project_embedding(embedding: nn.Module, r: torch.Tensor) -> None:
    """W_E [vocab, d] <- W_E - (W_E r) r^T."""
    w = embedding.weight.data
    w64, r_ = w.to(torch.float64), r.to(w.device)
    w.copy_((w64 - torch.outer(w64 @ r_, r_)).to(w.dtype))


def _untie_unembedding(model: nn.Module, embed: nn.Module) -> None:
    """Give lm_head its own copy of the weights it shares with the embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or head.weight is not embed.weight:
        return
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    # The config must say so too, or from_pretrained would re-tie lm_head to the edited
    # embedding when the copy is reloaded; transformers 5 caches the tie map on the model.
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def orthogonalize_weights(model: nn.Module, direction: torch.Tensor, strict: bool = True) -> nn.Module:
    """Return a deep copy of ``model`` with ``direction`` (d_model,) projected out of its weights.

    Edits the token (and learned positional) embedding, every attention output projection and
    every MLP down projection, including biases, so that no block can write along r_hat. The
    unembedding is left unchanged (untied first if shared), matching hook ablation, which
    never touches lm_head. The copy is saveable with ``save_pretrained(dir, safe_serialization=True)``.

    Blocks that normalise sublayer outputs before the residual add (Gemma-2/3, OLMo-2) cannot
    be made exactly equivalent by editing weights; ``strict=True`` raises for them, and
    ``strict=False`` edits the projections anyway (an approximation).
    """
    layout = find_layout(model)
    cls = type(model).__name__
    if layout.normed_outputs and strict:
        raise UnsupportedArchitectureError(
            f"{cls} normalises attention/MLP outputs before adding them to the residual, so weight "
            "orthogonalisation is not equivalent to hook ablation there; use ablate_directions, or pass strict=False "
            "for the approximation."
        )
    missing = [
        f"blocks.{i}.{kind}"
        for i in range(layout.n_layers)
        for kind, mods in (("attn", layout.attn_proj), ("mlp", layout.mlp_proj))
        if mods[i] is None
    ]
    if missing:
        raise UnsupportedArchitectureError(
            f"{cls}: no output projection found for {', '.join(missing[:4])}; tried attention "
            f"{'/'.join(ATTN_PROJ_NAMES)} and MLP {'/'.join(MLP_PROJ_NAMES)} (as nn.Linear or Conv1D writing d_model "
            "outputs)."
        )
    if direction.shape != (layout.d_model,):
        raise ValueError(
            f"orthogonalize_weights: direction has shape {tuple(direction.shape)}, expected ({layout.d_model},)"
        )
    r = direction.detach().to(torch.float64)
    r = r / r.norm()

    edited = copy.deepcopy(model)
    new = find_layout(edited)
    with torch.no_grad():
        _untie_unembedding(edited, new.embed)
        _project_embedding(new.embed, r)
        if new.pos_embed is not None:
            # Hook ablation removes r_hat from block 0's input, which includes learned
            # positional embeddings (GPT-2's wpe), so they must be projected as well.
            _project_embedding(new.pos_embed, r)
        for module in new.attn_proj + new.mlp_proj:
            _project_output_rows(module, r)
    return edited
