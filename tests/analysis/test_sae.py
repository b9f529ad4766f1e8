"""The SAE analysis on SAEs with planted latents, the built-in TopK trainer on a planted dictionary, the sae-lens
format both ways (with the real sae-lens, the [sae] extra), and the reader's messages on bad folders.

The stage itself runs on planted stores in tests/analysis/test_geometry_stage.py and on the smoke pipeline in
tests/e2e/test_pipeline_e2e.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from refusal_atlas.analysis.sae import (
    SaeError,
    SparseAutoencoder,
    category_latents,
    firing_rates,
    hook_layer,
    latent_overlap,
    load_sae,
    sae_direction,
    save_sae,
    train_topk_sae,
)

D_IN, D_SAE = 32, 24
PLANTED = {"cat_a": [3, 7], "cat_b": [7, 11], "cat_c": [15, 19]}


def _orthonormal_atoms(rng, n: int, d: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, d)))[0][:n].astype(np.float32)  # [n, d] orthonormal rows


def planted_sae(rng, architecture: str = "standard") -> SparseAutoencoder:
    """Decoder rows orthonormal, encoder their transpose: latent i reads the coefficient of atom i exactly, and
    fires (ReLU past b_enc, or JumpReLU past its threshold) only where that coefficient exceeds 0.5."""
    atoms = _orthonormal_atoms(rng, D_SAE, D_IN)
    extra = {"threshold": np.full(D_SAE, 0.5, np.float32)} if architecture == "jumprelu" else {}
    b_enc = np.zeros(D_SAE, np.float32) if architecture == "jumprelu" else np.full(D_SAE, -0.5, np.float32)
    return SparseAutoencoder(
        architecture=architecture,
        W_enc=atoms.T.copy(),
        b_enc=b_enc,
        W_dec=atoms,
        b_dec=np.zeros(D_IN, np.float32),
        layer=2,
        **extra,
    )


def planted_sides(sae: SparseAutoencoder, rng, n: int = 60):
    """Targets of each category carry its planted latents (coefficient 2-3) on top of the background every prompt
    has: each unplanted latent on with probability 0.15. Baselines have the background alone."""
    free = [i for i in range(D_SAE) if not any(i in p for p in PLANTED.values())]

    def background(m):
        coef = np.zeros((m, D_SAE))
        coef[:, free] = (rng.random((m, len(free))) < 0.15) * rng.uniform(1, 3, (m, len(free)))
        return coef

    sides = {}
    for name, latents in PLANTED.items():
        target = background(n)
        target[:, latents] = rng.uniform(2, 3, (n, len(latents)))
        noise = 0.05 * rng.standard_normal((2, n, D_IN))
        sides[name] = (target @ sae.W_dec + noise[0], background(n) @ sae.W_dec + noise[1])
    return sides


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_the_analysis_finds_the_planted_latents(architecture, tmp_path):
    rng = np.random.default_rng(0)
    sae = planted_sae(rng, architecture)
    save_sae(sae, tmp_path / "sae")  # and read back: the analysis runs on what the stage would load
    sae = load_sae(tmp_path / "sae")
    table, top = category_latents(sae, planted_sides(sae, rng), top_k=2)

    assert {n: sorted(t) for n, t in top.items()} == PLANTED
    assert (table.rate_target[table.latent.isin([3, 7, 11, 15, 19])] == 1.0).all()
    assert table.rate_diff.min() > 0.7  # the background fires at ~0.15 on both sides
    common, jaccard = latent_overlap(top)
    assert common == 0.0
    assert jaccard.loc["cat_a", "cat_b"] == pytest.approx(1 / 3)  # {3, 7} and {7, 11}
    assert jaccard.loc["cat_a", "cat_c"] == 0.0 and (np.diag(jaccard) == 1.0).all()
    for name, latents in PLANTED.items():
        expected = sae.W_dec[latents].sum(0)
        assert sae_direction(sae, top[name]) @ expected / np.linalg.norm(expected) == pytest.approx(1.0, abs=1e-6)


def test_only_latents_firing_more_on_hr_than_on_bc_are_kept():
    rng = np.random.default_rng(2)
    sae = planted_sae(rng)
    target, baseline = planted_sides(sae, rng)["cat_a"]
    table, top = category_latents(sae, {"same": (baseline, baseline), "cat_a": (target, baseline)}, top_k=D_SAE)
    assert top["same"] == [] and "same" not in set(table.direction)  # no difference: no latent, no SAE direction
    assert set(top["cat_a"]) >= {3, 7} and (table.rate_diff > 0).all()


def test_the_overlap_of_identical_top_sets_is_complete():
    common, jaccard = latent_overlap({"a": [1, 2, 3], "b": [3, 2, 1], "c": [2, 1, 3]})
    assert common == 1.0 and (jaccard.to_numpy() == 1.0).all()
    common, _ = latent_overlap({"a": [1, 2, 3, 4], "b": [1, 2, 5, 6]})
    assert common == 0.5


def test_topk_training_recovers_a_planted_dictionary_deterministically():
    rng = np.random.default_rng(1)
    atoms = _orthonormal_atoms(rng, 16, D_IN)
    coef = (rng.random((3000, 16)) < 0.15) * rng.uniform(1, 3, (3000, 16))
    x = (coef @ atoms + 0.02 * rng.standard_normal((3000, D_IN)) + 4.0).astype(np.float32)
    args = dict(d_sae=48, k=4, steps=800, batch_size=128, lr=3e-3, seed=0, layer=1)
    sae, info = train_topk_sae(x, **args)
    again, _ = train_topk_sae(x, **args)

    assert np.array_equal(sae.W_enc, again.W_enc) and np.array_equal(sae.W_dec, again.W_dec)  # seeded, deterministic
    assert info["fvu"] < 0.1 and 3.9 < info["l0"] <= 4.0 and info["n_train"] == 3000  # at most k fire (ReLU'd top k)
    assert info["fvu"] < info["loss_curve"][0][1]  # it learnt
    rows = sae.W_dec / np.linalg.norm(sae.W_dec, axis=1, keepdims=True)
    best = (np.abs(atoms @ rows.T)).max(1)  # each planted atom's best-matching learnt decoder row
    assert (best > 0.9).sum() >= 12, best.round(2)
    assert sae.hook_name == "blocks.1.hook_resid_pre" and sae.layer == 1
    assert firing_rates(sae, x).sum() == pytest.approx(info["l0"])  # rates and l0 count the same firings


def test_hook_names_map_to_block_inputs():
    assert hook_layer("blocks.3.hook_resid_pre") == 3
    assert hook_layer("blocks.3.hook_resid_post") == 4  # block 3's output is block 4's input
    with pytest.raises(SaeError, match="hook_attn_out.*residual-stream"):
        hook_layer("blocks.3.attn.hook_attn_out")


def _write(folder, cfg: dict, tensors: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _tensors(d_in=4, d_sae=6, threshold=False):
    rng = np.random.default_rng(0)
    t = {
        "W_enc": rng.standard_normal((d_in, d_sae)),
        "b_enc": rng.standard_normal(d_sae),
        "W_dec": rng.standard_normal((d_sae, d_in)),
        "b_dec": rng.standard_normal(d_in),
    }
    return {**t, "threshold": np.abs(rng.standard_normal(d_sae))} if threshold else t


def test_a_pre_6_topk_config_is_read_as_sae_lens_reads_it(tmp_path):
    cfg = {"d_in": 4, "d_sae": 6, "hook_point": "blocks.1.hook_resid_post", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 2}, "apply_b_dec_to_input": False}  # fmt: skip
    sae = load_sae(_write(tmp_path / "old", cfg, _tensors()))
    assert (sae.architecture, sae.k, sae.layer, sae.apply_b_dec_to_input) == ("topk", 2, 2, False)
    acts = sae.encode(np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32))
    assert ((acts > 0).sum(1) <= 2).all()


@pytest.mark.parametrize(
    "cfg,tensors,message",
    [
        ({"architecture": "gated", "d_in": 4, "d_sae": 6, "metadata": {"hook_name": "blocks.0.hook_resid_pre"}},
         _tensors(), r"architecture 'gated' is not supported.*standard, jumprelu, topk"),
        ({"architecture": "standard", "d_in": 4, "d_sae": 6, "metadata": {"hook_name": "blocks.0.hook_mlp_out"}},
         _tensors(), r"hook 'blocks.0.hook_mlp_out' is not a residual-stream hook"),
        ({"architecture": "jumprelu", "d_in": 4, "d_sae": 6, "metadata": {"hook_name": "blocks.0.hook_resid_pre"}},
         _tensors(), r"missing tensor\(s\) threshold for a jumprelu SAE"),
        ({"architecture": "standard", "d_in": 5, "d_sae": 6, "metadata": {"hook_name": "blocks.0.hook_resid_pre"}},
         _tensors(), r"shapes disagree with d_in=5, d_sae=6: W_enc \(4, 6\) \(expected \(5, 6\)\)"),
        ({"architecture": "standard", "d_in": 4, "d_sae": 6, "normalize_activations": "expected_average_only_in",
          "metadata": {"hook_name": "blocks.0.hook_resid_pre"}},
         _tensors(), r"normalize_activations 'expected_average_only_in' is not supported.*fold"),
    ],
)  # fmt: skip
def test_bad_sae_folders_fail_with_what_where_and_how_to_fix(tmp_path, cfg, tensors, message):
    folder = _write(tmp_path / "sae", cfg, tensors)
    with pytest.raises(SaeError, match=message) as err:
        load_sae(folder)
    assert str(folder) in str(err.value)


def test_a_folder_without_weights_names_both_files(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(SaeError, match=r"no sae_weights.safetensors.*cfg.json and sae_weights.safetensors"):
        load_sae(tmp_path)


# ---- sae-lens itself (the [sae] extra, part of [dev]): its files load here and ours load there. ----


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_sae_lens_and_refusal_atlas_read_each_others_files_and_encode_alike(architecture, tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is the [sae] extra: pip install -e '.[sae]'")
    import torch
    from sae_lens.saes.sae import SAEMetadata

    module, cls = {
        "standard": ("standard_sae", "StandardSAE"),
        "jumprelu": ("jumprelu_sae", "JumpReLUSAE"),
        "topk": ("topk_sae", "TopKSAE"),
    }[architecture]
    import importlib

    mod = importlib.import_module(f"sae_lens.saes.{module}")
    kwargs = {"k": 5} if architecture == "topk" else {}
    cfg = getattr(mod, f"{cls}Config")(
        d_in=16, d_sae=40, metadata=SAEMetadata(hook_name="blocks.2.hook_resid_pre", model_name="demo"), **kwargs
    )
    theirs = getattr(mod, cls)(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # sae-lens initialises biases (and thresholds) at zero: give them values to check
        for name, p in theirs.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if name != "threshold" else p.copy_(0.2 * torch.rand_like(p))
    theirs.save_model(tmp_path / "theirs")
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    with torch.no_grad():
        expected = theirs.encode(torch.from_numpy(x)).numpy()

    ours = load_sae(tmp_path / "theirs")
    assert (ours.architecture, ours.layer, ours.d_sae) == (architecture, 2, 40)
    np.testing.assert_allclose(ours.encode(x), expected, rtol=1e-5, atol=1e-5)
    assert 0 < (expected > 0).mean() < 1  # some latents fire, some do not: the comparison means something

    save_sae(ours, tmp_path / "ours")
    back = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    assert type(back).__name__ == cls and back.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    with torch.no_grad():
        np.testing.assert_allclose(back.encode(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
