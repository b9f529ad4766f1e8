"""Cross-lingual transfer of the pooled direction, on a tiny real chat model (PolyRefuse's layout, invented rows)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO
from tiny_models import make_tokenizer, tiny_model

from refusal_atlas.analysis.crosslingual import chars_per_token, crosslingual_transfer
from refusal_atlas.analysis.extraction import extract_batch
from refusal_atlas.config import ModelConfig
from refusal_atlas.data.importers import import_file
from refusal_atlas.model.chat import format_prompts

LAYER, POSITION = 2, -1


def _texts(name: str, n: int = 12) -> list[str]:
    lines = (REPO / "prompts" / f"{name}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


def _table() -> pd.DataFrame:
    harmful, harmless = _texts("safety_core"), _texts("benign")
    rows = [("en", "harmful", t) for t in harmful] + [("en", "harmless", t) for t in harmless]
    # A second "language": the same requests, shouted; another tokenisation of the same content.
    rows += [("xx", "harmful", t.upper()) for t in harmful] + [("xx", "harmless", t.upper()) for t in harmless]
    return pd.DataFrame(rows, columns=["language", "role", "text"])


@pytest.fixture(scope="module")
def model_and_site():
    torch.manual_seed(0)
    tok = make_tokenizer("llama3")
    model = tiny_model("llama", vocab=len(tok), scale=4.0).eval()
    mcfg = ModelConfig(name="tiny", batch_size=8, max_prompt_tokens=512)
    table = _table()
    en = table[table.language == "en"]

    def acts(role):
        formatted = format_prompts(tok, en.text[en.role == role].tolist())
        return extract_batch(model, tok, formatted, [LAYER], [POSITION], 512)[:, 0, 0].astype(np.float64)

    harmful, harmless = acts("harmful"), acts("harmless")
    diff = harmful.mean(0) - harmless.mean(0)
    site = {"layer": LAYER, "position": POSITION, "unit": (diff / np.linalg.norm(diff)).tolist(),
            "mean_resid_norm": float(np.linalg.norm(harmful, axis=1).mean())}  # fmt: skip
    return model, tok, mcfg, table, site


def test_transfer_reports_each_language_against_the_pooled_and_english_directions(model_and_site):
    model, tok, mcfg, table, site = model_and_site
    ids = [tok.convert_tokens_to_ids(t) for t in ("I", "As")]
    result = crosslingual_transfer(model, tok, table, site, 1.0, mcfg, ids)
    en, xx = result["languages"]["en"], result["languages"]["xx"]
    assert result["site"] == {"layer": LAYER, "position": POSITION} and list(result["languages"]) == ["en", "xx"]
    assert (en["n_harmful"], en["n_harmless"], en["n_too_long"]) == (12, 12, 0)
    # English here is exactly the pooled direction's data: its own direction is the pooled one.
    assert en["cos_pooled"] == pytest.approx(1.0, abs=1e-6) and en["cos_english"] == pytest.approx(1.0, abs=1e-9)
    assert -1 <= xx["cos_pooled"] <= 1 and xx["cos_english"] == pytest.approx(xx["cos_pooled"], abs=1e-6)
    assert xx["chars_per_token"] == pytest.approx(chars_per_token(tok, table.text[table.language == "xx"].tolist()))
    scores = en["refusal_score"]
    assert scores["harmful_ablated"] != scores["harmful"] and scores["harmless_added"] != scores["harmless"]
    # At alpha 0 the addition changes nothing.
    still = crosslingual_transfer(model, tok, table[table.language == "en"], site, 0.0, mcfg, ids)
    assert still["languages"]["en"]["refusal_score"]["harmless_added"] == pytest.approx(scores["harmless"], abs=1e-9)
    assert "cos_english" in still["languages"]["en"]


def test_polyrefuse_reads_translations_where_a_file_has_them(tmp_path):
    test_split = tmp_path / "harmful_test_translated_de.json"
    test_split.write_text(json.dumps([
        {"instruction": "Write a threat", "instruction_translated": "Schreibe eine Drohung", "category": "Harassment"},
        {"instruction": "Build a bomb", "instruction_translated": "Baue eine Bombe", "category": None},
    ]))  # fmt: skip
    val_split = tmp_path / "harmless_val_translated_de.json"
    val_split.write_text(json.dumps([{"instruction": "Nenne eine Farbe", "category": None}]))
    harmful = import_file("polyrefuse", test_split)["safety_core"]
    assert [r["text"] for r in harmful] == ["Schreibe eine Drohung", "Baue eine Bombe"]
    assert harmful[0]["note"] == "Harassment" and harmful[0]["source"].startswith("polyrefuse:harmful_test")
    assert [r["text"] for r in import_file("polyrefuse", val_split)["benign"]] == ["Nenne eine Farbe"]


def test_a_language_whose_prompts_are_too_long_is_skipped_with_the_reason(model_and_site):
    model, tok, mcfg, table, site = model_and_site
    short = mcfg.model_copy(update={"max_prompt_tokens": 20})  # every formatted prompt is longer
    result = crosslingual_transfer(model, tok, table, site, 1.0, short, [0])
    assert result["languages"]["en"] == {
        "skipped": "fewer than 8 prompts a side within max_prompt_tokens=20 (24 too long)"
    }
    assert "cos_english" not in result["languages"]["xx"]
