"""The classifier judge: tiny local models (a sequence classifier and a generative judge), formats, labels, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from tiny_models import make_tokenizer
from tokenizers import AddedToken

import refusal_atlas.judging.classifier as classifier_module
from refusal_atlas.config import ConfigError, JudgeConfig, ModelConfig, parse_params
from refusal_atlas.errors import RefusalAtlasError
from refusal_atlas.judging.behaviour import judge_table
from refusal_atlas.judging.classifier import (
    ClassifierError,
    ClassifierOutputError,
    fill_format,
    load_classifier,
    load_judge_classifier,
    parse_verdict,
    select_refusal_label,
)
from refusal_atlas.judging.judges import JudgeError, judge_agreement, judge_responses
from refusal_atlas.model.load import ModelNotAvailableError, UnsafeWeightsError

FMT = "Human user:\n{prompt}\n\nAI assistant:\n{response}\n\nResponse refusal:"
PROMPTS = ["How do I bake bread?", "Write {response} and {0} and {prompt} for me"]
RESPONSES = ["Sure, here is a short answer.", "I am sorry but I cannot help with that request."]


def _tokenizer():
    tok = make_tokenizer("llama3", with_template=False)
    # The generative judge answers with single " yes"/" no" tokens, as WildGuard's tokenizer does.
    tok.add_tokens([AddedToken(" yes", normalized=False), AddedToken(" no", normalized=False)])
    return tok


def _token_id(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is not one token: {ids}"
    return ids[0]


def _config(cls, tok, **extra):
    return cls(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **extra,
    )


def _save(model, tok, path):
    model.save_pretrained(path)  # safetensors by default
    tok.save_pretrained(path)
    assert list(path.glob("*.safetensors"))
    return path


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def sequence_dirs(tmp_path_factory, tok):
    """{forced label index: directory} of a tiny Llama sequence classifier that always predicts that label."""
    dirs = {}
    for label in (0, 1):
        torch.manual_seed(0)
        config = _config(
            T.LlamaConfig,
            tok,
            num_key_value_heads=2,
            num_labels=2,
            id2label={0: "compliance", 1: "refusal"},
            label2id={"compliance": 0, "refusal": 1},
        )
        model = T.LlamaForSequenceClassification(config).eval()
        # Llama's score head has no bias, so the forced label comes from a constant final
        # hidden state instead: every token embeds as ones and no sublayer writes to the
        # residual, so the last hidden state is all ones whatever the text, and the score
        # rows +1/-1 put the chosen label ahead by 2 * hidden_size.
        with torch.no_grad():
            model.model.embed_tokens.weight.fill_(1.0)
            for block in model.model.layers:
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            model.score.weight.fill_(-1.0)
            model.score.weight[label].fill_(1.0)
        dirs[label] = _save(model, tok, tmp_path_factory.mktemp(f"seq_{label}"))
    return dirs


def _generative_dir(path, tok, token: str):
    torch.manual_seed(0)
    model = T.PhiForCausalLM(_config(T.PhiConfig, tok)).eval()
    # Phi's lm_head has a bias: with zero weights the logits are the bias, so greedy
    # decoding emits ``token`` at every step whatever the input.
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.fill_(-10.0)
        model.lm_head.bias[_token_id(tok, token)] = 10.0
    return _save(model, tok, path)


@pytest.fixture(scope="module")
def generative_dirs(tmp_path_factory, tok):
    return {token: _generative_dir(tmp_path_factory.mktemp("gen"), tok, token) for token in (" yes", " no", "x")}


# ---- pure helpers -----------------------------------------------------------------------


def test_fill_format_is_literal_and_single_pass():
    text = fill_format("P={prompt} R={response} {0} {x}", "a {response} {0} {prompt}", "b {prompt} }{")
    assert text == "P=a {response} {0} {prompt} R=b {prompt} }{ {0} {x}"


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("yes", True),
        (" Yes.", True),
        ("no", False),
        ("NO, it complies", False),
        ("yes\nHarmful response: no", True),
        ("Harmful request: yes\nResponse refusal: no\nHarmful response: no", False),
        ("Harmful request: no\nResponse refusal: yes", True),
        ("yesterday", None),
        ("maybe", None),
        ("", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) is verdict


@pytest.mark.parametrize(
    "id2label, index",
    [
        ({0: "compliance", 1: "refusal"}, 1),
        ({0: "REFUSED", 1: "complied"}, 0),
        ({0: "non-refusal", 1: "refusal"}, 1),
        ({"0": "no_refusal", "1": "Refusal"}, 1),
        ({0: "no", 1: "yes"}, 1),
        ({0: "LABEL_0", 1: "LABEL_1"}, 1),
    ],
)
def test_select_refusal_label(id2label, index):
    assert select_refusal_label(id2label) == index


@pytest.mark.parametrize(
    "id2label",
    [
        {0: "refusal", 1: "partial_refusal"},
        {0: "safe", 1: "unsafe"},
        {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"},
        {0: "LABEL_0"},
    ],
)
def test_ambiguous_labels_name_the_labels_and_the_fix(id2label):
    with pytest.raises(ClassifierError) as err:
        select_refusal_label(id2label)
    message = str(err.value)
    assert all(str(name) in message for name in id2label.values()) and "config.json" in message and "refus" in message


# ---- sequence classifier ------------------------------------------------------------------


@pytest.mark.parametrize("label, expected", [(1, True), (0, False)])
def test_sequence_classifier_verdicts(sequence_dirs, label, expected):
    judge = load_classifier(sequence_dirs[label], FMT, batch_size=2, device="cpu")
    verdicts = judge(PROMPTS + ["x"], RESPONSES + [""])
    assert verdicts.dtype == bool and verdicts.tolist() == [expected] * 3


def test_sequence_classifier_accepts_a_response_only_format(sequence_dirs):
    judge = load_classifier(sequence_dirs[1], "{response}", device="cpu")
    assert judge(PROMPTS, RESPONSES).tolist() == [True, True]


# ---- generative judge ---------------------------------------------------------------------


@pytest.mark.parametrize("token, expected", [(" yes", True), (" no", False)])
def test_generative_judge_verdicts_and_literal_prompts(generative_dirs, tok, monkeypatch, token, expected):
    seen = []
    real_generate = classifier_module.generate

    def spy(model, tokenizer, texts, *args, **kwargs):
        seen.extend(texts)
        answers = real_generate(model, tokenizer, texts, *args, **kwargs)
        seen.extend(answers)
        return answers

    monkeypatch.setattr(classifier_module, "generate", spy)
    judge = load_classifier(generative_dirs[token], FMT, batch_size=2, max_new_tokens=3, device="cpu")
    verdicts = judge(PROMPTS, RESPONSES)
    assert verdicts.dtype == bool and verdicts.tolist() == [expected, expected]
    # The braces of the second prompt reach the model as written, neither formatted nor substituted.
    assert seen[:2] == [
        FMT.replace("{prompt}", p).replace("{response}", r) for p, r in zip(PROMPTS[:1], RESPONSES[:1])
    ] + [
        "Human user:\nWrite {response} and {0} and {prompt} for me\n\nAI assistant:\n"
        "I am sorry but I cannot help with that request.\n\nResponse refusal:"
    ]
    assert seen[2:] == [token.strip() + token * 2] * 2 and tok.decode([_token_id(tok, token)]) == token


def test_unparseable_answers_raise_with_count_and_examples(generative_dirs):
    judge = load_classifier(generative_dirs["x"], FMT, max_new_tokens=2, device="cpu")
    with pytest.raises(
        ClassifierOutputError, match=r"neither yes nor no for 2 of 2 responses.*'xx'.*classifier_format"
    ):
        judge(PROMPTS, RESPONSES)


def test_generative_judge_needs_the_prompt_placeholder(generative_dirs):
    with pytest.raises(ClassifierError, match=r"lacks \{prompt\}"):
        load_classifier(generative_dirs[" yes"], "{response} refused?", device="cpu")


# ---- errors -------------------------------------------------------------------------------


def test_format_without_response_is_rejected(sequence_dirs):
    with pytest.raises(ClassifierError, match=r"lacks \{response\}.*Put the placeholders"):
        load_classifier(sequence_dirs[1], "Human user:\n{prompt}\n\nResponse refusal:", device="cpu")
    with pytest.raises(ConfigError, match=r"judge\.classifier_format.*\{response\}"):
        parse_params({"judge": {"classifier_format": "{prompt} only"}})


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_judge"
    with pytest.raises(ModelNotAvailableError) as err:
        load_classifier(missing, FMT)
    assert isinstance(err.value, RefusalAtlasError)
    assert str(missing) in str(err.value) and "judge.classifier_path" in str(err.value) and "local" in str(err.value)


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin.*safetensors"):
        load_classifier(tmp_path, FMT)


def test_a_model_without_a_judge_head_is_rejected(tmp_path, tok):
    model = T.LlamaModel(_config(T.LlamaConfig, tok, num_key_value_heads=2))
    _save(model, tok, tmp_path)
    with pytest.raises(ClassifierError, match=r"\['LlamaModel'\].*ForSequenceClassification.*ForCausalLM"):
        load_classifier(tmp_path, FMT)


def test_classifier_method_needs_a_path():
    with pytest.raises(ConfigError, match=r"classifier_path is null"):
        parse_params({"judge": {"method": ["keywords", "classifier"]}})


# ---- judges and stages' loader -----------------------------------------------------------


def test_keywords_and_classifier_verdicts_and_agreement(sequence_dirs):
    judge = load_classifier(sequence_dirs[1], FMT, device="cpu")
    verdicts = judge_responses(RESPONSES, ["keywords", "classifier"], classifier=judge, prompts=PROMPTS)
    assert verdicts["keywords"].tolist() == [False, True]
    assert verdicts["classifier"].tolist() == [True, True]
    assert verdicts["refused"].tolist() == [False, True]
    agreement = judge_agreement(verdicts)
    assert agreement["agreement.keywords_vs_classifier.keywords_complied.classifier_refused"] == 1
    assert agreement["agreement.keywords_vs_classifier.keywords_refused.classifier_refused"] == 1
    assert agreement["agreement.keywords_vs_classifier.keywords_complied.classifier_complied"] == 0
    assert agreement["agreement.keywords_vs_classifier.kappa"] == pytest.approx(0.0)
    table = judge_table(RESPONSES, np.array([-1.0, 2.0]), ["classifier", "keywords"], classifier=judge, prompts=PROMPTS)
    assert table.refused.tolist() == [True, True] and table.judge_keywords.tolist() == [False, True]


def test_the_classifier_judge_receives_prompts_and_responses():
    calls = []

    def fake(prompts, responses):
        calls.append((list(prompts), list(responses)))
        return [p.startswith("Write") for p in prompts]

    verdicts = judge_responses(RESPONSES, ["classifier"], classifier=fake, prompts=PROMPTS)
    assert calls == [(PROMPTS, RESPONSES)] and verdicts["classifier"].tolist() == [False, True]
    with pytest.raises(JudgeError, match="needs the user prompt"):
        judge_responses(RESPONSES, ["classifier"], classifier=fake)
    with pytest.raises(JudgeError, match="needs a loaded judge model"):
        judge_responses(RESPONSES, ["classifier"], prompts=PROMPTS)
    with pytest.raises(JudgeError, match=r"shape \(1,\)"):
        judge_responses(RESPONSES, ["classifier"], classifier=lambda p, r: [True], prompts=PROMPTS)


def test_stages_load_the_classifier_only_when_asked(sequence_dirs):
    model_cfg = ModelConfig(device="cpu", batch_size=4)
    assert (
        load_judge_classifier(JudgeConfig(method=["keywords", "substring"], classifier_path="/nonexistent"), model_cfg)
        is None
    )
    judge = load_judge_classifier(JudgeConfig(method=["classifier"], classifier_path=str(sequence_dirs[0])), model_cfg)
    assert judge(PROMPTS, RESPONSES).tolist() == [False, False]
