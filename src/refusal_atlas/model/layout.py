"""Find a decoder's blocks, sublayers and projections by structure, never by family name.

Every path here is an attribute path tried in order: a new architecture either matches a known path
or fails with an error that names its class and the paths that were tried.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from refusal_atlas.errors import RefusalAtlasError


class UnsupportedArchitectureError(RefusalAtlasError, ValueError):
    """No known attribute path matches the model's decoder blocks or their sublayers."""


# ---------------------------------------------------------------------------------------
# Layout: where the blocks, sublayers and projections live
# ---------------------------------------------------------------------------------------

BLOCK_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.model.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "model.decoder.layers",
    "backbone.layers",
    "layers",
    "h",
)
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
EMBED_NAMES = ("embed_tokens", "wte", "embed_in", "word_embeddings")
POS_EMBED_NAMES = ("wpe", "embed_positions", "position_embeddings")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ATTN_PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo")
MLP_PROJ_NAMES = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")


@dataclass(frozen=True)
class Layout:
    """Where a decoder's residual stream is read and written.

    ``attn_out[l]``/``mlp_out[l]`` are the modules whose forward output is what block ``l``
    adds to the residual stream; for blocks that normalise a sublayer's output before the
    add (Gemma-2/3, OLMo-2) that is the post-sublayer norm, not the attention/MLP itself.
    ``attn_proj[l]``/``mlp_proj[l]`` are the linear maps that write into the residual
    (``None`` where none was found, e.g. mixture-of-experts MLPs).
    """

    blocks: list[nn.Module]
    attn: list[nn.Module]
    mlp: list[nn.Module]
    attn_out: list[nn.Module]
    mlp_out: list[nn.Module]
    attn_proj: list[nn.Module | None]
    mlp_proj: list[nn.Module | None]
    embed: nn.Module
    pos_embed: nn.Module | None
    final_norm: nn.Module
    normed_outputs: bool
    blocks_path: str

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.embed.weight.shape[1])


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first_child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        child = getattr(module, n, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _writes_d_model(module: nn.Module, d_model: int) -> bool:
    """True if ``module`` is a Linear or Conv1D whose output dimension is ``d_model``."""
    if isinstance(module, Conv1D):  # GPT-2's Conv1D stores its weight as [in, out].
        return module.weight.shape[1] == d_model
    return isinstance(module, nn.Linear) and module.weight.shape[0] == d_model


def _projection(sub: nn.Module, names: tuple[str, ...], d_model: int) -> nn.Module | None:
    for n in names:
        child = getattr(sub, n, None)
        if isinstance(child, nn.Module) and _writes_d_model(child, d_model):
            return child
    return None


def find_layout(model: nn.Module) -> Layout:
    """Find blocks, sublayer outputs, embeddings, final norm and output projections by attribute path.

    Input: a Hugging Face causal LM. Output: a ``Layout``. Raises ``UnsupportedArchitectureError``
    naming the model class and the paths tried when nothing matches.
    """
    cls = type(model).__name__
    blocks_path = next(
        (p for p in BLOCK_PATHS if isinstance(_get_path(model, p), nn.ModuleList) and len(_get_path(model, p)) > 0),
        None,
    )
    if blocks_path is None:
        raise UnsupportedArchitectureError(
            f"{cls}: found no decoder blocks; tried the attribute paths {', '.join(BLOCK_PATHS)}."
        )
    blocks = list(_get_path(model, blocks_path))
    container = _get_path(model, blocks_path.rpartition(".")[0]) if "." in blocks_path else model

    try:
        embed = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        embed = None
    embed = embed if embed is not None else _first_child(container, EMBED_NAMES)
    final_norm = _first_child(container, FINAL_NORM_NAMES)
    pos_embed = next((m for n in POS_EMBED_NAMES if isinstance(m := getattr(container, n, None), nn.Embedding)), None)
    if embed is None or getattr(embed, "weight", None) is None or embed.weight.ndim != 2:
        raise UnsupportedArchitectureError(
            f"{cls}: found no token embedding; tried get_input_embeddings() and {', '.join(EMBED_NAMES)} next to "
            f"{blocks_path}."
        )
    if final_norm is None:
        raise UnsupportedArchitectureError(
            f"{cls}: found no final norm next to {blocks_path}; tried {', '.join(FINAL_NORM_NAMES)}."
        )
    d_model = int(embed.weight.shape[1])

    attn, mlp, attn_out, mlp_out, attn_proj, mlp_proj = [], [], [], [], [], []
    normed = False
    for i, block in enumerate(blocks):
        a, m = _first_child(block, ATTN_NAMES), _first_child(block, MLP_NAMES)
        if a is None or m is None:
            raise UnsupportedArchitectureError(
                f"{cls}: block {i} ({type(block).__name__}) has no attention ({', '.join(ATTN_NAMES)}) "
                f"or MLP ({', '.join(MLP_NAMES)}) submodule."
            )
        # A block with a post-feed-forward norm normalises each sublayer's output before
        # adding it to the residual (x + norm(attn(x'))), so those norms are what writes
        # into the stream. In Llama-style blocks post_attention_layernorm is the *pre*-MLP
        # norm instead, which is why the post-feed-forward norm decides.
        post_ff = getattr(block, "post_feedforward_layernorm", None)
        post_attn = getattr(block, "post_attention_layernorm", None)
        if isinstance(post_ff, nn.Module) and isinstance(post_attn, nn.Module):
            normed = True
            attn_out.append(post_attn)
            mlp_out.append(post_ff)
        else:
            attn_out.append(a)
            mlp_out.append(m)
        attn.append(a)
        mlp.append(m)
        attn_proj.append(_projection(a, ATTN_PROJ_NAMES, d_model))
        mlp_proj.append(_projection(m, MLP_PROJ_NAMES, d_model))
    return Layout(
        blocks, attn, mlp, attn_out, mlp_out, attn_proj, mlp_proj, embed, pos_embed, final_norm, normed, blocks_path
    )
