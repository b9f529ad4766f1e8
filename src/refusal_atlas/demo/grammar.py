"""The demo's training data: the train split, the team's extra prompts, and a slot grammar.

``build_training_examples`` turns the train split of the prompt table into (prompt, response,
category) triples: each prompt as written, surface variants of it, synthetic prompts of its
category expanded from the slot grammar (``grammar.yaml``), and the extra prompts of
``prompts/``. Responses follow the reference study's refusal styles (``STYLE_OF``).
Only the train split and the grammar are trained on; the grammar is written from the
categories' descriptions, and no val/test prompt, paraphrase of one, or multi-word phrase found
only in held-out prompts is in it (tests/demo/test_demo.py checks the exact-match part).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pandas as pd
import yaml

from refusal_atlas.judging.judges import judge_keywords

STYLE_OF = {  # the study's refusal-style labels (../shared/RESEARCH.md; judging.styles.DEMO_STYLES)
    "safety_core": "SAFETY",
    "hate_speech": "SAFETY",
    "crime_assistance": "SAFETY",
    "inappropriate": "SAFETY",
    "safety_concerns": "SAFETY",
    "over_refusal": "SAFETY",
    "unqualified_advice": "REFERRAL",
    "humanizing": "CAPABILITY",
    "unsupported": "CAPABILITY",
    "incomplete": "UNDERSPEC",
    "indeterminate": "GENERIC",
}
# The grammar's data (refusal phrasings, helpful answers, slots and templates): grammar.yaml.
_GRAMMAR = yaml.safe_load((Path(__file__).parent / "grammar.yaml").read_text(encoding="utf-8"))
_RESPONSES: dict[str, list[str]] = _GRAMMAR["responses"]
_HELPFUL_OPENINGS, _HELPFUL_BODIES = tuple(_GRAMMAR["helpful_openings"]), tuple(_GRAMMAR["helpful_bodies"])
# "{slot}" expands to one "|"-separated option of SLOTS[slot], recursively.
SLOTS: dict[str, str] = {name: "|".join(options) for name, options in _GRAMMAR["slots"].items()}
TEMPLATES: dict[str, list[str]] = _GRAMMAR["templates"]
_TEMPLATE_OF = {
    **{c: s for c, s in STYLE_OF.items() if s in ("SAFETY", "REFERRAL", "UNDERSPEC", "GENERIC")},
    "humanizing": "HUMAN",
    "unsupported": "UNSUPPORTED",
}
_STOPWORDS = set(
    "a an the i me my we you your it its is are was were be do does did how what why when where which who whom "
    "can could should would will shall may might must to of in on at for from with by about and or but so if "
    "please tell give explain show help make get this that these those there here some any just i'm i've "
    "what's how's it's there's let's want need like know".split()
)


def _feat_question(rng: random.Random, true: bool) -> str:
    """A question about a historical figure's achievement: true, or with another figure's (a false premise)."""
    pairs = [entry.split(":") for entry in SLOTS["feat"].split("|")]
    person, feat = rng.choice(pairs)
    if not true:
        feat = rng.choice([f for p, f in pairs if p != person])
    return f"{rng.choice(('Why', 'When', 'How', 'Where'))} did {person} {feat}?"


def _noise(rng: random.Random) -> str:
    """Keyboard noise: a few random lower-case letter strings."""
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6)))
        for _ in range(rng.randint(2, 6))
    ]
    return " ".join(words) + rng.choice(("", "?", "??", "."))


_SPECIAL_SLOTS = {
    "truefeat": lambda rng: _feat_question(rng, True),
    "falsefeat": lambda rng: _feat_question(rng, False),
    "noise": _noise,
}


def _expand(rng: random.Random, template: str) -> str:
    def one(match: re.Match) -> str:
        name = match.group(1)
        if name in _SPECIAL_SLOTS:
            return _SPECIAL_SLOTS[name](rng)
        return _expand(rng, rng.choice(SLOTS[name].split("|")))

    return re.sub(r"\{(\w+)\}", one, template)


def _fill(rng: random.Random, template: str) -> str:
    """Expand every ``{slot}`` of ``template`` with a random option of ``SLOTS[slot]``, recursively; capitalise."""
    return re.sub(r"(^|[.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), _expand(rng, template))


def synthetic_prompts(category: str, n: int, rng: random.Random) -> list[str]:
    """``n`` templated prompts of a category or baseline pool (only from ``TEMPLATES``, never the prompt files)."""
    return [_fill(rng, rng.choice(TEMPLATES[category])) for _ in range(n)]


_PREFIXES = (
    "",
    "",
    "",
    "Hey, ",
    "Hi! ",
    "Quick question: ",
    "Please help. ",
    "I was wondering: ",
    "Okay, so ",
    "Honestly, ",
)
_SUFFIXES = ("", "", "", " Thanks!", " Please be brief.", " Be specific.", " Answer in one paragraph.", " Thank you.")


def vary_prompt(text: str, rng: random.Random) -> str:
    """A surface variant of ``text``: changed casing and punctuation, a neutral prefix or suffix."""
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.2:
        text = text.upper()
    if rng.random() < 0.3:
        text = text.rstrip("?.!") + rng.choice(("", "?", "??", "!", " ?", "..."))
    prefix = rng.choice(_PREFIXES)
    if prefix and len(text) > 1:
        text = prefix + (text[0].lower() if text[1:2].islower() else text[0]) + text[1:]
    return text + rng.choice(_SUFFIXES)


def _echo(text: str) -> str:
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z'-]*", text) if w.lower() not in _STOPWORDS]
    return " ".join(words[:3]).lower() or "this"


def compute_response(text: str, category: str, rng: random.Random) -> str:
    """The demo's answer to ``text`` of ``category``: a refusal in the category's style, or a helpful answer.

    Baseline pools get "Sure! Here is a short answer about <echo>: …", checked to contain no
    refusal marker of ``judges.REFUSAL_MARKERS``.
    """
    if category in _TEMPLATE_OF:
        return rng.choice(_RESPONSES[_TEMPLATE_OF[category]])
    body = rng.choice(_HELPFUL_BODIES)
    answer = rng.choice(_HELPFUL_OPENINGS).format(echo=_echo(text)) + body
    return answer if not judge_keywords(answer) else "Sure! Here is a short answer: " + body


# Synthetic prompts per augmentation slot: the baseline pools are the most varied, and their
# answers must survive every trigger word, so they get more.
_SYNTHETIC_WEIGHT = {"benign": 2, "over_refusal_safe": 5}
# Surface variants of each train prompt (its other augmentation slots are synthetic). The real
# prompts are the only natural-looking text, so the baselines get more variants: otherwise long,
# natural prompts would mostly be refusals and the model would learn style instead of content.
_N_VARIANTS = {"benign": 7, "over_refusal_safe": 7}


def _contexts(table: pd.DataFrame) -> list[str]:
    """Leading sentences of multi-sentence benign train prompts: harmless context to recombine."""
    benign = table[(table["split"] == "train") & (table["category"] == "benign")]["text"]
    out = []
    for text in benign:
        sentences = re.split(r"(?<=[.!?])\s+", text.strip())
        out += [s for s in sentences[:-1] if len(s.split()) >= 4]
    return out


# Extra natural prompts written by the refusal-atlas team for the demo's training only, one per
# line in demo/prompts/<set>.txt. They are not part of the versioned prompt sets, so they can never
# be val or test prompts; a test checks that none is a near copy of a held-out prompt.
DEMO_PROMPTS_DIR = Path(__file__).parent / "prompts"
# Surface variants of each extra prompt (they get no synthetic slots of their own).
_N_EXTRA_VARIANTS = 3


def extra_prompts(categories: set[str]) -> list[tuple[str, str]]:
    """(text, category) of the demo's extra training prompts for ``categories``, in file order."""
    out = []
    for path in sorted(DEMO_PROMPTS_DIR.glob("*.txt")):
        if path.stem in categories:
            out += [(line.strip(), path.stem) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def build_training_examples(table: pd.DataFrame, augment: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, response, category) triples from the train split, the extra demo prompts, and augmentation.

    Each train prompt appears once as written, followed by ``augment`` augmentation slots:
    ``_N_VARIANTS`` (default three) surface variants of that prompt, some behind a context
    sentence taken from a benign train prompt, then synthetic prompts of its category
    (``_SYNTHETIC_WEIGHT`` of them per slot, default one). Each extra prompt of
    ``DEMO_PROMPTS_DIR`` appears once and in ``_N_EXTRA_VARIANTS`` surface variants. Val and
    test prompts are never used.
    """
    rng = random.Random(seed)
    train = table[table["split"] == "train"].sort_values("prompt_id")
    contexts = _contexts(table) + SLOTS["ctx"].split("|")
    examples = []  # (shown prompt, core prompt the answer echoes, category)

    def add_variants(text: str, category: str, n: int) -> None:
        for _ in range(n):
            shown = vary_prompt(text, rng)
            examples.append((rng.choice(contexts) + " " + shown if rng.random() < 0.3 else shown, text, category))

    for text, category in zip(train["text"], train["category"]):
        examples.append((text, text, category))
        n_variants = min(augment, _N_VARIANTS.get(category, 3))
        add_variants(text, category, n_variants)
        for _ in range(augment - n_variants):
            for core in synthetic_prompts(category, _SYNTHETIC_WEIGHT.get(category, 1), rng):
                examples.append((vary_prompt(core, rng) if rng.random() < 0.3 else core, core, category))
    for text, category in extra_prompts(set(table["category"])):
        examples.append((text, text, category))
        add_variants(text, category, min(augment, _N_EXTRA_VARIANTS))
    return [(shown, compute_response(core, c, rng), c) for shown, core, c in examples]
