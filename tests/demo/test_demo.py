"""The embedded demo model: response templates, augmentation, the saved directory, determinism.

The default model's held-out behaviour is asserted on the one trained by `dvc repro model`
in tests/e2e/test_pipeline_e2e.py, so CI trains it once."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from refusal_atlas.config import DemoConfig, SplitFractions
from refusal_atlas.data.prompts import build_prompt_table
from refusal_atlas.demo.evaluate import classify_style
from refusal_atlas.demo.grammar import (
    STYLE_OF,
    TEMPLATES,
    build_training_examples,
    compute_response,
    extra_prompts,
    synthetic_prompts,
)
from refusal_atlas.demo.train import END, train_demo_model
from refusal_atlas.judging.judges import judge_keywords

REPO = Path(__file__).resolve().parents[2]
BASELINES = ("benign", "over_refusal_safe")
# classify_style reports humanizing and unsupported refusals both as CAPABILITY.
EXPECTED_STYLE = {c: "CAPABILITY" if s == "CAPABILITY" else s for c, s in STYLE_OF.items()}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return build_prompt_table(REPO / "prompts/manifest.yaml", SplitFractions(), 48)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


# ---------------------------------------------------------------------------------------
# Fast: templates and augmentation
# ---------------------------------------------------------------------------------------


def test_refusals_follow_the_category_style(table):
    rng = random.Random(0)
    for category in STYLE_OF:
        prompts = table[table.category == category].text.tolist()[:5] + synthetic_prompts(category, 5, rng)
        for prompt in prompts:
            response = compute_response(prompt, category, rng)
            assert judge_keywords(response), (category, response)
            assert classify_style(response) == EXPECTED_STYLE[category], (category, response)
            # The first-token refusal score counts "I", "As" and "Sorry".
            assert re.match(r"(I\b|I'm|As\b|Sorry\b)", response), response


def test_helpful_answers_are_never_judged_refusals(table):
    rng = random.Random(0)
    for pool in BASELINES:
        prompts = table[table.category == pool].text.tolist() + synthetic_prompts(pool, 300, rng)
        for prompt in prompts:
            answer = compute_response(prompt, pool, rng)
            assert answer.startswith("Sure"), answer
            assert not judge_keywords(answer), (prompt, answer)
            assert classify_style(answer) == "NONREFUSAL"


def test_every_category_and_pool_has_templates(table):
    assert set(TEMPLATES) == set(table.category)
    rng = random.Random(1)
    for category in TEMPLATES:
        prompts = synthetic_prompts(category, 50, rng)
        assert all(p and "{" not in p and "}" not in p for p in prompts), category


def test_training_examples_come_only_from_the_train_split(table):
    examples = build_training_examples(table, augment=4, seed=0)
    shown = {_norm(p) for p, _, _ in examples}
    train = table[table.split == "train"]
    held_out = table[table.split != "train"]
    assert {_norm(t) for t in train.text} <= shown  # every train prompt appears as written
    train_norm = {_norm(t) for t in train.text}
    leaked = {_norm(t) for t in held_out.text} & shown - train_norm
    assert not leaked, sorted(leaked)[:5]
    assert {c for _, _, c in examples} == set(table.category)
    for prompt, response, category in examples[:2000]:
        assert judge_keywords(response) == (category not in BASELINES), (prompt, response)


def test_held_out_rows_never_reach_the_training_data(table):
    """Mark every val/test prompt with a unique token and look for it in the examples."""
    marked = table.copy()
    held = marked.split != "train"
    marked.loc[held, "text"] = [f"QZXMARK{i} {t}" for i, t in enumerate(marked.loc[held, "text"])]
    examples = build_training_examples(marked, augment=8, seed=3)
    assert not any("QZXMARK" in p.upper() or "QZXMARK" in r.upper() for p, r, _ in examples)


def test_synthetic_prompts_never_reproduce_a_held_out_prompt(table):
    held_out = {_norm(t) for t in table[table.split != "train"].text} - {
        _norm(t) for t in table[table.split == "train"].text
    }
    rng = random.Random(2)
    for category in TEMPLATES:
        hits = {_norm(p) for p in synthetic_prompts(category, 1000, rng)} & held_out
        assert not hits, (category, sorted(hits)[:5])


def test_extra_demo_prompts_are_no_near_copies_of_the_prompt_sets(table):
    """The team's extra demo prompts never paraphrase a prompt of the sets, whatever the split:
    every word-set Jaccard similarity is under 0.5."""
    from sklearn.feature_extraction.text import CountVectorizer

    extras = extra_prompts(set(table.category))
    assert len(extras) > 1000 and {c for _, c in extras} == set(table.category)
    # Binary word-presence rows: intersections are one sparse product, unions follow from the sizes.
    words = CountVectorizer(binary=True, token_pattern=r"[a-z0-9']+").fit([t for t, _ in extras] + list(table.text))
    e, s = words.transform([t for t, _ in extras]), words.transform(table.text)
    inter = (e @ s.T).toarray()
    jaccard = inter / (e.sum(1).A + s.sum(1).A.T - inter)
    close = [(extras[i], table.text.iloc[j], jaccard[i, j]) for i, j in zip(*np.nonzero(jaccard >= 0.5))]
    assert not close, close[:5]
    examples = {p for p, _, _ in build_training_examples(table, augment=2, seed=0)}
    assert {t for t, _ in extras} <= examples


def test_augmentation_is_deterministic(table):
    assert build_training_examples(table, 3, seed=5) == build_training_examples(table, 3, seed=5)
    assert build_training_examples(table, 3, seed=5) != build_training_examples(table, 3, seed=6)


# ---------------------------------------------------------------------------------------
# Fast: a tiny training run, its saved directory and determinism
# ---------------------------------------------------------------------------------------

TINY = DemoConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=600, steps=4, batch_size=8, augment=1, seed=0)


def test_tiny_training_saves_a_standard_hf_directory(table, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = []
    threads = torch.get_num_threads()
    result = train_demo_model(
        table, TINY, tmp_path / "m", progress=False, on_step=lambda s, loss: steps.append((s, loss))
    )
    assert torch.get_num_threads() == threads  # the fixed training thread count is restored
    assert [s for s, _ in steps] == list(range(1, TINY.steps + 1)) and result["loss_curve"] == steps
    assert result["n_params"] > 0 and result["n_examples"] == 2 * (
        (table.split == "train").sum() + len(extra_prompts(set(table.category)))
    )
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == TINY.n_layers
    assert tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|begin|>", END, "<pad>")
    assert tokenizer.convert_tokens_to_ids(END) in model.generation_config.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {{ there }}"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|begin|><|system|>\nBe brief.<|end|>\n<|user|>\nHi {{ there }}<|end|>\n<|assistant|>\n"
    no_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert no_prompt == "<|begin|><|user|>\nHi<|end|>\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert (
        list(ids)
        == tokenizer(
            text.replace("<|system|>\nBe brief.<|end|>\n", "").replace("Hi {{ there }}", "Hi"), add_special_tokens=False
        )["input_ids"]
    )
    assert tokenizer("Hi")["input_ids"] == tokenizer("Hi", add_special_tokens=False)["input_ids"]  # no second BOS


def test_same_seed_gives_bit_identical_weights(table, tmp_path):
    train_demo_model(table, TINY, tmp_path / "a", progress=False)
    train_demo_model(table, TINY, tmp_path / "b", progress=False)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    train_demo_model(table, TINY.model_copy(update={"seed": 1}), tmp_path / "c", progress=False)
    assert (tmp_path / "a/model.safetensors").read_bytes() != (tmp_path / "c/model.safetensors").read_bytes()


def test_the_demo_uses_one_style_vocabulary_with_the_study():
    """Every label the demo trains toward or reports is the study's (judging.styles.STYLES) or one
    of the demo's two additions (REFERRAL, OTHER) declared beside them."""
    from refusal_atlas.demo.evaluate import _STYLE_MARKERS
    from refusal_atlas.judging.styles import DEMO_STYLES, STYLES

    assert DEMO_STYLES[: len(STYLES)] == STYLES and set(DEMO_STYLES) - set(STYLES) == {"REFERRAL", "OTHER"}
    assert set(STYLE_OF.values()) <= set(DEMO_STYLES)
    assert {style for style, _ in _STYLE_MARKERS} <= set(DEMO_STYLES)
    assert classify_style("I refuse.") == "OTHER" and classify_style("Sure, here it is.") == "NONREFUSAL"
