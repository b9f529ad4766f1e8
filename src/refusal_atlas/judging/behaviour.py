"""What the model does with prompts: resumable batched generation, judging, refusal rates.

Generation for hours on a real model must not be lost to a kill: responses are kept in
chunk files under a parts folder keyed by a fingerprint of the inputs, and a rerun only
generates the chunks that are missing. The parts are scratch; the stage removes them
once its real outputs are written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from refusal_atlas.config import BaselineConfig, ModelConfig
from refusal_atlas.data.atomic import write_json
from refusal_atlas.digest import json_sha256
from refusal_atlas.judging.judges import ClassifierJudge, judge_agreement, judge_responses
from refusal_atlas.model.chat import check_prompt_lengths, format_prompts
from refusal_atlas.model.generation import generate_scored, kl_first_token, refusal_log_odds, refusal_token_ids

# Chunk files hold one record per prompt (response and scores); the folder names the format,
# so a chunk left by an older version is never read as this one.
PARTS_FORMAT = "records2"


def fingerprint(*parts: object) -> str:
    """Short sha256 of JSON-serialisable inputs."""
    return json_sha256(list(parts))[:16]


def generate_resumable(
    generate_chunk: Callable[[range], list],
    n: int,
    parts_dir: Path,
    key: str,
    chunk_size: int,
    desc: str = "generate",
    progress: bool = True,
) -> list:
    """``generate_chunk(rows)`` over ``range(n)`` chunk by chunk, keeping each finished chunk in ``parts_dir/key``.

    ``generate_chunk`` returns one JSON-serialisable record per row (a response, with any
    scores read from the same generation). Chunk files from other keys (older inputs) are
    never read, so old and new records cannot mix. Returns the records in row order.
    """
    folder = parts_dir / f"{key}-{PARTS_FORMAT}"
    out: list = []
    starts = range(0, n, chunk_size)
    resumed = sum((folder / f"{start:08d}.json").exists() for start in starts)
    if resumed:
        print(f"{desc}: resuming, {resumed} of {len(starts)} chunks already generated in {folder}", file=sys.stderr)
    for start in tqdm(starts, desc=desc, unit="chunk", disable=not progress):
        part = folder / f"{start:08d}.json"
        if part.exists():
            out += json.loads(part.read_text())
            continue
        records = generate_chunk(range(start, min(start + chunk_size, n)))
        write_json(part, records)
        out += records
    return out


def generate_scored_resumable(
    model,
    tokenizer,
    formatted: Sequence[str],
    refusal_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int | None,
    parts_dir: Path,
    key: str,
    chunk_size: int,
    hooks: Callable[[], AbstractContextManager] = nullcontext,
    base_logprobs: Mapping[int, torch.Tensor] | None = None,
    desc: str = "generate",
    progress: bool = True,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Greedy responses to ``formatted`` under ``hooks()``, resumably, with what their prefill gives for free.

    Returns (responses, refusal log-odds float64 [n], first-token KL(base || hooked) float64 for
    the rows in ``base_logprobs`` (row in ``formatted`` -> unhooked log-probs [vocab]), in row
    order; empty when none is given). Chunks are kept as ``generate_resumable`` keeps them.
    """
    base_logprobs = base_logprobs or {}

    def generate_chunk(rows: range) -> list[dict]:
        with hooks():
            responses, logprobs = generate_scored(
                model,
                tokenizer,
                [formatted[i] for i in rows],
                max_new_tokens,
                batch_size,
                max_prompt_tokens=max_prompt_tokens,
            )
        scores = refusal_log_odds(logprobs, list(refusal_ids)).tolist()
        based = [k for k, i in enumerate(rows) if i in base_logprobs]
        kls = (
            dict(
                zip(
                    based,
                    kl_first_token(torch.stack([base_logprobs[rows[k]] for k in based]), logprobs[based]).tolist(),
                )
            )
            if based
            else {}
        )
        return [
            {"response": r, "refusal_score": s, "kl_first_token": kls.get(k)}
            for k, (r, s) in enumerate(zip(responses, scores))
        ]

    records = generate_resumable(
        generate_chunk, len(formatted), parts_dir, key, chunk_size, desc=desc, progress=progress
    )
    return (
        [r["response"] for r in records],
        np.array([r["refusal_score"] for r in records], dtype=np.float64),
        np.array([r["kl_first_token"] for r in records if r["kl_first_token"] is not None], dtype=np.float64),
    )


def judge_table(
    responses: Sequence[str],
    scores: np.ndarray,
    methods: Sequence[str],
    classifier: ClassifierJudge | None = None,
    prompts: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per response: ``refused`` (first judge), each judge's own verdict, ``refusal_score``.

    ``classifier`` and ``prompts`` (the raw user prompts, one per response) are needed only
    when ``methods`` includes ``classifier``; see ``judge_responses``.
    """
    verdicts = judge_responses(list(responses), list(methods), scores=scores, classifier=classifier, prompts=prompts)
    frame = pd.DataFrame({"refused": verdicts["refused"], **{f"judge_{m}": verdicts[m] for m in methods}})
    frame["refusal_score"] = np.asarray(scores, dtype=np.float64)
    return frame


def refusal_rates(table: pd.DataFrame) -> dict:
    """Refusal rate per category, role and split, plus each judge's agreement (DVC metrics)."""

    def rate(cols: list[str]) -> dict:
        out: dict = {}
        for key, value in table.groupby(cols)["refused"].mean().items():
            key = key if isinstance(key, tuple) else (key,)
            node = out
            for k in key[:-1]:
                node = node.setdefault(k, {})
            node[key[-1]] = round(float(value), 6)
        return out

    judges = {c.removeprefix("judge_"): table[c].to_numpy() for c in table.columns if c.startswith("judge_")}
    metrics = {
        "refusal_rate": {
            "overall": round(float(table.refused.mean()), 6),
            "by_category": rate(["category"]),
            "by_role": rate(["role"]),
            "by_split": rate(["split"]),
            "by_category_split": rate(["category", "split"]),
        },
        "n": int(len(table)),
    }
    if len(judges) > 1:
        metrics["judges"] = judge_agreement(judges)
    return metrics


def baseline_behaviour(
    model, tokenizer, identity: dict, table: pd.DataFrame, cfg: BaselineConfig, mcfg: ModelConfig,
    judges: Sequence[str], parts_dir: Path, classifier=None, progress: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """The unsteered model's response to every prompt of ``table``, judged.

    Every formatted prompt's length is checked before any generation. Generation resumes from
    ``parts_dir`` chunks keyed by the model identity, the prompts and the settings. Returns
    prompt_id, category, role, split, response, refused, each judge's verdict and refusal_score.
    """
    texts = table.text.tolist()
    formatted = format_prompts(tokenizer, texts, mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs)
    check_prompt_lengths(tokenizer, formatted, mcfg.max_prompt_tokens, table.prompt_id.tolist())
    key = fingerprint(identity, formatted, cfg.model_dump(), mcfg.batch_size, mcfg.refusal_tokens)
    responses, scores, _ = generate_scored_resumable(
        model, tokenizer, formatted, refusal_token_ids(tokenizer, mcfg.refusal_tokens), cfg.max_new_tokens,
        mcfg.batch_size, mcfg.max_prompt_tokens, parts_dir, key, chunk_size=8 * mcfg.batch_size, desc="baseline",
        progress=progress,
    )  # fmt: skip
    judged = judge_table(responses, scores, judges, classifier=classifier, prompts=texts)
    columns = table[["prompt_id", "category", "role", "split"]]
    return pd.concat([columns, pd.Series(responses, name="response"), judged], axis=1)
