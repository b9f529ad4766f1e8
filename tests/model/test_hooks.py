"""Read/add/ablate hooks and weight orthogonalisation, checked against independent computations."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, EXACT_ORTHO_ARCHS, batch, tiny_model

from refusal_atlas.model.hooks import (
    ablate_directions,
    ablate_rows,
    add_direction,
    add_rows,
    orthogonalize_weights,
    read_residual,
    site_name,
)
from refusal_atlas.model.layout import UnsupportedArchitectureError, find_layout

POSITIONS = [-3, -2, -1]


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _unit(d: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()


def _pre_norm_final(model, enc) -> torch.Tensor:
    """Output of the last block, taken with a forward hook: an independent pre-norm reference."""
    layout = find_layout(model)
    seen = []
    handle = layout.blocks[-1].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        model(**enc)
    finally:
        handle.remove()
    return seen[0]


def test_site_names():
    assert site_name(12) == "blocks.12.resid_pre"
    assert site_name(3, "attn_out") == "blocks.3.attn_out" and site_name(0, "mlp_out") == "blocks.0.mlp_out"


@pytest.mark.parametrize("arch", ARCHS)
def test_read_matches_hidden_states_under_left_padding(arch):
    model = tiny_model(arch, scale=3.0)
    enc = batch()
    assert (enc["attention_mask"][:, 0] == 0).any()
    reference = _pre_norm_final(model, enc)
    with read_residual(model, [0, 1, 2], POSITIONS) as cap:
        out = model(**enc, output_hidden_states=True)
    acts = cap.stack()
    assert acts.shape == (3, 3, 3, 32) and acts.device.type == "cpu" and acts.dtype == torch.float32
    assert cap.sites == ["blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.2.resid_pre"]
    for i, layer in enumerate([0, 1]):
        assert torch.equal(acts[:, i], out.hidden_states[layer][:, POSITIONS])
    assert torch.equal(acts[:, 2], reference[:, POSITIONS])
    # transformers returns the *normed* final state as hidden_states[-1]; layer L is pre-norm.
    final_norm = find_layout(model).final_norm
    assert torch.allclose(final_norm(acts[:, 2]), out.hidden_states[-1][:, POSITIONS], atol=1e-5)
    assert not torch.allclose(acts[:, 2], out.hidden_states[-1][:, POSITIONS], atol=1e-3)


def test_read_keeps_model_dtype_and_accumulates_calls():
    model = tiny_model("llama").to(torch.bfloat16)
    enc = batch()
    with read_residual(model, [1], [-1]) as cap:
        model(**enc)
        model(**enc)
    acts = cap.stack()
    assert acts.dtype == torch.bfloat16 and acts.shape == (6, 1, 1, 32)
    assert torch.equal(acts[:3], acts[3:])
    assert cap.call_lengths == [9, 9]


def test_add_direction_shifts_residual_by_exactly_alpha_r():
    model = tiny_model("llama")
    enc = batch()
    vector = 4.0 * _unit(32)
    with read_residual(model, [0, 1, 2], POSITIONS) as plain:
        model(**enc)
    # The read hook is registered after the add hook, so it sees the steered input.
    with add_direction(model, 1, vector), read_residual(model, [0, 1, 2], POSITIONS) as steered:
        model(**enc)
    a, b = plain.stack(), steered.stack()
    assert torch.equal(a[:, 0], b[:, 0])  # upstream of the steered block: untouched
    assert torch.allclose(b[:, 1] - a[:, 1], vector.expand(3, 3, 32), atol=1e-6)
    assert not torch.allclose(a[:, 2], b[:, 2], atol=1e-2)  # downstream it propagates
    assert _no_hooks(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2", "olmo2", "phi3"])
def test_ablation_zeroes_projection_everywhere(arch):
    model = tiny_model(arch, scale=3.0)
    enc = batch()
    layout = find_layout(model)
    basis = torch.stack([_unit(32, 1), _unit(32, 2) + 0.5 * _unit(32, 1)])  # not orthonormal on purpose
    q, _ = torch.linalg.qr(basis.T)
    outputs = []
    with ablate_directions(model, basis), read_residual(model, list(range(layout.n_layers + 1)), POSITIONS) as cap:
        # Also check what each block writes (its attention and MLP outputs) and returns.
        handles = [
            m.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
            for m in layout.attn_out + layout.mlp_out + layout.blocks
        ]
        try:
            model(**enc)
        finally:
            for h in handles:
                h.remove()
    acts = cap.stack()
    with read_residual(model, [1], POSITIONS) as plain:
        model(**enc)
    assert (plain.stack() @ q).abs().max() > 0.1  # without ablation the component is there
    assert (acts @ q).abs().max() < 1e-5
    mask = enc["attention_mask"].bool()
    assert len(outputs) == 3 * layout.n_layers
    assert max((o[mask] @ q).abs().max().item() for o in outputs) < 1e-5
    assert _no_hooks(model)


@pytest.mark.parametrize("context", ["read", "add", "ablate"])
def test_hooks_removed_after_exception(context):
    model = tiny_model("gpt2")
    assert _no_hooks(model)
    managers = {
        "read": lambda: read_residual(model, [0, 1, 2], [-1]),
        "add": lambda: add_direction(model, 0, torch.ones(32)),
        "ablate": lambda: ablate_directions(model, torch.ones(1, 32)),
    }
    with pytest.raises(RuntimeError, match="boom"):
        with managers[context]():
            assert not _no_hooks(model)
            model(**batch())
            raise RuntimeError("boom")
    assert _no_hooks(model)
    # An error raised inside a hook during the forward pass cleans up too.
    with pytest.raises(ValueError, match="need at least 50 tokens"):
        with read_residual(model, [1], [-50]):
            model(**batch())
    assert _no_hooks(model)


def test_hook_arguments_are_validated():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="negative"):
        with read_residual(model, [0], [0]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with add_direction(model, 3, torch.ones(32)):
            pass
    with pytest.raises(ValueError, match="linearly dependent"):
        with ablate_directions(model, torch.stack([torch.ones(32), 2 * torch.ones(32)])):
            pass
    assert _no_hooks(model)


@pytest.mark.parametrize("arch", EXACT_ORTHO_ARCHS)
def test_orthogonalized_weights_match_hook_ablation(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch, scale=3.0)
    enc = batch()
    mask = enc["attention_mask"].bool()
    r = _unit(32, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ablate_directions(model, r[None]):
        hooked = model(**enc).logits
    edited = orthogonalize_weights(model, 5.0 * r)  # any scale: the direction is normalised
    plain = model(**enc).logits
    ortho = edited(**enc).logits
    assert (hooked - plain)[mask].abs().max() > 1e-3  # the ablation does something
    assert (ortho - hooked)[mask].abs().max() <= 1e-4
    # The original is untouched and the unembedding is unchanged (untied where it was tied).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(edited.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert (find_layout(edited).embed.weight @ r).abs().max() < 1e-5

    edited.save_pretrained(tmp_path / "ortho", safe_serialization=True)
    assert (tmp_path / "ortho" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ortho", attn_implementation="eager").eval()
    assert (reloaded(**enc).logits - ortho)[mask].abs().max() <= 1e-5


def test_orthogonalize_refuses_normed_output_blocks_unless_asked():
    model = tiny_model("gemma2")
    with pytest.raises(UnsupportedArchitectureError, match="Gemma2ForCausalLM normalises"):
        orthogonalize_weights(model, _unit(32))
    edited = orthogonalize_weights(model, _unit(32), strict=False)
    assert (find_layout(edited).attn_proj[0].weight.T @ _unit(32)).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
def test_ablate_rows_and_add_rows_match_one_direction_per_row(arch):
    model = tiny_model(arch, scale=3.0)
    enc = batch(lengths=(7, 7, 7))
    units = torch.stack([_unit(32, s) for s in (1, 2, 3)])
    units[1] *= 5.0  # normalised inside, as ablate_directions' QR does
    with ablate_rows(model, units):
        rows = model(**enc).logits
    for b in range(3):
        with ablate_directions(model, units[b][None]):
            alone = model(input_ids=enc["input_ids"][b : b + 1], attention_mask=enc["attention_mask"][b : b + 1]).logits
        torch.testing.assert_close(rows[b : b + 1], alone, rtol=1e-5, atol=1e-5)
    layers, vectors = [0, 1, 0], units * torch.tensor([[2.0], [0.5], [-3.0]])
    with add_rows(model, layers, vectors):
        rows = model(**enc).logits
    for b in range(3):
        with add_direction(model, layers[b], vectors[b]):
            alone = model(input_ids=enc["input_ids"][b : b + 1], attention_mask=enc["attention_mask"][b : b + 1]).logits
        torch.testing.assert_close(rows[b : b + 1], alone, rtol=1e-5, atol=1e-5)
    assert _no_hooks(model)


def test_row_hooks_reject_a_batch_of_another_size_and_bad_vectors():
    model = tiny_model("llama")
    enc = batch(lengths=(5, 5))
    with pytest.raises(
        ValueError, match=r"ablate_rows: the forward pass has batch 2, but 3 per-row vectors were given"
    ):
        with ablate_rows(model, torch.zeros(3, 32)):
            model(**enc)
    with pytest.raises(ValueError, match=r"add_rows: vectors have shape \(2, 16\), expected \[batch, 32\]"):
        with add_rows(model, [0, 1], torch.zeros(2, 16)):
            pass
    with pytest.raises(ValueError, match="NaN or inf"):
        with ablate_rows(model, torch.full((2, 32), float("nan"))):
            pass
    with pytest.raises(ValueError, match="2 layers for 1 vectors"):
        with add_rows(model, [0, 1], torch.zeros(1, 32)):
            pass
    assert _no_hooks(model)
