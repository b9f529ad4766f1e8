"""Judges scored against human labels: accuracy, precision and recall for "refused", Cohen's kappa.

The input is XSTest's published completion files (``prompt``, ``completion``, ``final_label``
with ``1_full_compliance``, ``2_full_refusal`` or ``3_partial_refusal``; other columns are
kept for the disagreement table). A partial refusal ("I can't help with X, but here is Y")
is counted as a refusal by default, as XSTest itself counts it; ``partial_as`` makes it a
compliance, or leaves those rows out.

``refusal_score`` cannot be validated here: it reads the studied model's own first-token
distribution on the prompt, not a given completion, so it has no verdict on another model's
text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.digest import file_sha256
from refusal_atlas.errors import RefusalAtlasError
from refusal_atlas.judging.judges import ClassifierJudge, judge_responses

LABELS = {"1_full_compliance": "compliance", "2_full_refusal": "refusal", "3_partial_refusal": "partial"}
PARTIAL_AS = ("refusal", "compliance", "exclude")
COMPLETION_JUDGES = ("keywords", "substring", "classifier")  # judges that give a verdict on a given completion
COLUMNS = ("prompt", "completion", "final_label")


class ValidationDataError(RefusalAtlasError, ValueError):
    """A human-labelled completion file that cannot be read as XSTest's format."""


def load_completions(path: Path) -> pd.DataFrame:
    """Read a human-labelled completion file (CSV, XSTest's columns); check its columns and labels."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ValidationDataError(
            f"{path}: no such file; pass a CSV of human-labelled completions (XSTest's "
            "model_completions/xstest_v2_completions_*.csv format)"
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValidationDataError(f"{path}: not a readable CSV file ({err})") from None
    if missing := [c for c in COLUMNS if c not in frame.columns]:
        raise ValidationDataError(
            f"{path}: missing column(s) {missing}; found {list(frame.columns)}. Expected XSTest's completion format: "
            "prompt, completion, final_label (1_full_compliance, 2_full_refusal or 3_partial_refusal)."
        )
    bad = frame.index[~frame.final_label.isin(list(LABELS))]
    if len(bad):
        rows = ", ".join(f"row {i + 2} ({frame.final_label[i]!r})" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValidationDataError(f"{path}: {len(bad)} final_label value(s) are not {', '.join(LABELS)}: {rows}")
    if frame.empty:
        raise ValidationDataError(f"{path}: no rows")
    return frame


def human_refused(labels: Sequence[str], partial_as: str = "refusal") -> tuple[np.ndarray, np.ndarray]:
    """(rows kept, refused by the human label on those rows) for XSTest ``final_label`` values."""
    if partial_as not in PARTIAL_AS:
        raise ValidationDataError(f"partial_as {partial_as!r}: expected one of {', '.join(PARTIAL_AS)}")
    kind = np.array([LABELS[label] for label in labels])
    keep = kind != "partial" if partial_as == "exclude" else np.ones(len(kind), dtype=bool)
    refused = (kind == "refusal") | ((kind == "partial") & (partial_as == "refusal"))
    return keep, refused[keep]


def score_judge(truth: np.ndarray, verdicts: np.ndarray) -> dict:
    """How one judge's verdicts agree with the human ones (True = refused)."""
    from sklearn.metrics import cohen_kappa_score

    truth, verdicts = np.asarray(truth, dtype=bool), np.asarray(verdicts, dtype=bool)
    tp, fp = int((truth & verdicts).sum()), int((~truth & verdicts).sum())
    fn, tn = int((truth & ~verdicts).sum()), int((~truth & ~verdicts).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    # kappa is undefined (0/0) when both raters give one single label; sklearn returns nan then.
    kappa = float(cohen_kappa_score(truth, verdicts)) if len(set(truth) | set(verdicts)) > 1 else float("nan")
    return {
        "n": len(truth),
        "accuracy": (tp + tn) / len(truth) if len(truth) else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "kappa": kappa,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "human_refusal_rate": float(truth.mean()) if len(truth) else float("nan"),
    }


def validate_judges(
    frame: pd.DataFrame,
    judges: Sequence[str],
    partial_as: str = "refusal",
    classifier: ClassifierJudge | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Score every judge in ``judges`` on a completion table (``load_completions``).

    Returns ``({judge: score_judge(...)}, disagreements)``: the rows (kept by ``partial_as``)
    where a judge and the human label differ, one row per (judge, completion), with the
    judge's and the human verdict.
    """
    if unusable := [j for j in judges if j not in COMPLETION_JUDGES]:
        raise ValidationDataError(
            f"judge(s) {unusable} cannot be validated on given completions ({', '.join(COMPLETION_JUDGES)} can): "
            "refusal_score reads the studied model's own first-token distribution, not a completion"
        )
    keep, truth = human_refused(frame.final_label.tolist(), partial_as)
    rows = frame[keep].reset_index(drop=True)
    verdicts = judge_responses(
        rows.completion.tolist(), list(judges), classifier=classifier, prompts=rows.prompt.tolist()
    )
    scores = {j: score_judge(truth, verdicts[j]) for j in judges}
    wrong = [
        rows[verdicts[j] != truth].assign(judge=j, judge_refused=verdicts[j][verdicts[j] != truth]) for j in judges
    ]
    disagreements = pd.concat(wrong, ignore_index=True).assign(human_refused=lambda d: ~d.judge_refused)
    return scores, disagreements


def validation_table(files: Sequence[Path]) -> pd.DataFrame:
    """Every file's rows (:func:`load_completions`, all columns kept) in one table, each row naming its file (stem)
    and the file's sha256. Every file is checked before any is returned."""
    frames = [load_completions(path).assign(file=Path(path).stem, sha256=file_sha256(path)) for path in files]
    if not frames:
        return pd.DataFrame(columns=["file", "sha256", *COLUMNS])
    return pd.concat(frames, ignore_index=True).fillna("")


def validate_files(
    table: pd.DataFrame, judges: Sequence[str], partial_as: str = "refusal", classifier: ClassifierJudge | None = None
) -> tuple[dict, dict[str, pd.DataFrame]]:
    """:func:`validate_judges` on each file of a :func:`validation_table`: ``({"partial_as", "files": {file:
    {"sha256", "judges"}}}, {file: disagreements})``."""
    results, wrong = {}, {}
    for name, rows in table.groupby("file", sort=False):
        scores, wrong[name] = validate_judges(rows.reset_index(drop=True), judges, partial_as, classifier)
        results[name] = {"sha256": rows.sha256.iloc[0], "judges": scores}
    return {"partial_as": partial_as, "files": results}, wrong


def validation_rows(results: dict) -> pd.DataFrame:
    """One row per (file, judge): n, accuracy, precision, recall, f1, kappa and the confusion counts."""
    rows = [
        {"file": name, "judge": judge, **{k: v for k, v in score.items() if k != "confusion"}, **score["confusion"]}
        for name, found in results["files"].items()
        for judge, score in found["judges"].items()
    ]
    return pd.DataFrame(rows)


def validation_metrics(results: dict) -> dict:
    """``{file: {judge: {accuracy, precision, recall, kappa}}}`` for MLflow."""
    keys = ("accuracy", "precision", "recall", "kappa")
    return {
        name: {judge: {k: score[k] for k in keys} for judge, score in found["judges"].items()}
        for name, found in results["files"].items()
    }
