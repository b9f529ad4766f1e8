"""Cross-lingual transfer of the refusal direction (PolyRefuse: Arditi et al.'s splits translated into 13 languages).

For each language's harmful and harmless prompts (the prompts stage's crosslingual.parquet):
the language's own difference-of-means direction at the pooled direction's site, its cosine
with the pooled direction (learnt from the manifest's sets) and with the English one, and what
the pooled direction does to the language's first-token refusal score (Arditi et al.'s
log-odds): ablated everywhere on the harmful prompts, added at its layer on the harmless ones.
``chars_per_token`` says how well the tokenizer covers the language: the demo's tokenizer
was trained on English templates, so its other languages fall apart into short pieces and
their numbers mean little; a real multilingual model's do.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from refusal_atlas.analysis.extraction import extract_batch
from refusal_atlas.config import ModelConfig
from refusal_atlas.model.chat import format_prompts
from refusal_atlas.model.generation import refusal_scores
from refusal_atlas.model.hooks import ablate_directions, add_direction
from refusal_atlas.steering.interventions import alpha_vector

REFERENCE = "en"
MIN_PER_SIDE = 8  # a language with fewer prompts a side (after the length filter) is skipped, with the reason


def _residuals(model, tokenizer, formatted: list[str], layer: int, position: int, mcfg: ModelConfig) -> np.ndarray:
    batches = [formatted[i : i + mcfg.batch_size] for i in range(0, len(formatted), mcfg.batch_size)]
    parts = [extract_batch(model, tokenizer, b, [layer], [position], mcfg.max_prompt_tokens) for b in batches]
    return np.concatenate(parts)[:, 0, 0].astype(np.float64)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) or 1.0)


def chars_per_token(tokenizer, texts: list[str]) -> float:
    """Characters per token over ``texts`` (no special tokens): about 4 for English under an English tokenizer."""
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return sum(len(t) for t in texts) / max(tokens, 1)


def crosslingual_transfer(
    model,
    tokenizer,
    table: pd.DataFrame,
    site: dict,
    alpha: float,
    mcfg: ModelConfig,
    refusal_ids: list[int],
) -> dict:
    """Per language (``table``: language, role harmful/harmless, text): prompt counts, ``chars_per_token``, the cosine
    of its own direction with the pooled one (``site``: layer, position, unit, mean_resid_norm) and with English's,
    and the mean refusal log-odds on its harmful prompts without and with the pooled direction ablated, and on its
    harmless prompts without and with it added at ``alpha`` times the mean residual norm."""
    layer, position = int(site["layer"]), int(site["position"])
    unit = np.asarray(site["unit"], dtype=np.float64)
    unit_t = torch.tensor(unit, dtype=torch.float32)
    added = alpha_vector(unit_t, alpha, "norm", float(site["mean_resid_norm"]))
    out, directions = {}, {}

    def score(formatted: list[str]) -> float:
        return float(np.mean(refusal_scores(model, tokenizer, formatted, refusal_ids, mcfg.batch_size,
                                            mcfg.max_prompt_tokens)))  # fmt: skip

    for language, rows in table.groupby("language", sort=False):
        texts, formatted, dropped = {}, {}, 0
        for role in ("harmful", "harmless"):
            chat = format_prompts(tokenizer, rows.text[rows.role == role].tolist(), mcfg.system_prompt,
                                  mcfg.chat_template, mcfg.chat_template_kwargs)  # fmt: skip
            # A tokenizer that covers a language poorly makes long prompts of it: those over max_prompt_tokens are
            # left out and counted, rather than failing the stage for one language.
            fits = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) <= mcfg.max_prompt_tokens for c in chat]
            texts[role] = [t for t, ok in zip(rows.text[rows.role == role], fits) if ok]
            formatted[role] = [c for c, ok in zip(chat, fits) if ok]
            dropped += fits.count(False)
        if min(len(f) for f in formatted.values()) < MIN_PER_SIDE:
            out[language] = {"skipped": f"fewer than {MIN_PER_SIDE} prompts a side within max_prompt_tokens="
                                        f"{mcfg.max_prompt_tokens} ({dropped} too long)"}  # fmt: skip
            continue
        acts = {role: _residuals(model, tokenizer, f, layer, position, mcfg) for role, f in formatted.items()}
        directions[language] = _unit(acts["harmful"].mean(0) - acts["harmless"].mean(0))
        with ablate_directions(model, unit_t[None]):
            harmful_ablated = score(formatted["harmful"])
        with add_direction(model, layer, added):
            harmless_added = score(formatted["harmless"])
        out[language] = {
            "n_harmful": len(texts["harmful"]),
            "n_harmless": len(texts["harmless"]),
            "n_too_long": dropped,
            "chars_per_token": chars_per_token(tokenizer, texts["harmful"] + texts["harmless"]),
            "cos_pooled": float(directions[language] @ unit),
            "refusal_score": {
                "harmful": score(formatted["harmful"]),
                "harmful_ablated": harmful_ablated,
                "harmless": score(formatted["harmless"]),
                "harmless_added": harmless_added,
            },
        }
    if REFERENCE in directions:
        for language, direction in directions.items():
            out[language]["cos_english"] = float(direction @ directions[REFERENCE])
    return {"site": {"layer": layer, "position": position}, "alpha": alpha, "languages": out}
