"""Chat templates, end-of-instruction spans and prompt tokenisation on real template strings."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, LLAMA3, make_tokenizer

from refusal_atlas.model.chat import ChatTemplateError, PromptTooLongError, eoi_tokens, format_prompts, tokenize_prompts

EXPECTED_EOI = {
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"],
    "gemma": ["<end_of_turn>", "Ċ", "<start_of_turn>", "model", "Ċ"],
    "chatml": ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"],
    "mistral": ["[/INST]"],
    "phi3": ["<|end|>", "Ċ", "<|assistant|>", "Ċ"],
}
# Endings that tokenise differently (letters, digits, punctuation, trailing space, non-ASCII).
INSTRUCTIONS = [
    "Hi",
    "How do I bake bread?",
    "Yes.",
    "No!",
    "Write 12 poems about the sea.",
    "Tell me a story about a dragon and a knight, please! ",
    "Café au lait",
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eoi_span_per_family(family):
    tok = make_tokenizer(family)
    span = eoi_tokens(tok)
    assert span.tokens == EXPECTED_EOI[family]
    assert span.offsets == list(range(-len(EXPECTED_EOI[family]), 0))
    assert span.token_ids == tok.convert_tokens_to_ids(EXPECTED_EOI[family])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_left_padding_keeps_eoi_offsets(family):
    tok = make_tokenizer(family)
    span = eoi_tokens(tok)
    enc = tokenize_prompts(tok, format_prompts(tok, INSTRUCTIONS), max_tokens=128)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask[:, 0] == 0).sum() >= 4, "the batch should really be padded"
    assert (mask[:, -1] == 1).all(), "padding must be on the left"
    assert ids[:, span.offsets].tolist() == [span.token_ids] * len(INSTRUCTIONS)
    # The user's text ends right before the span: the token before it is not a template token.
    assert all(ids[i, span.offsets[0] - 1].item() not in span.token_ids[:1] for i in range(len(INSTRUCTIONS)))


def test_llama3_prompt_text_and_single_bos():
    tok = make_tokenizer("llama3")
    [prompt] = format_prompts(tok, ["  Hello there  "], system_prompt="Be brief.")
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenize_prompts(tok, [prompt], 64)["input_ids"][0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_template_kwargs_reach_the_template():
    tok = make_tokenizer("chatml")
    span = eoi_tokens(tok, template_kwargs={"enable_thinking": False})
    assert span.tokens == EXPECTED_EOI["chatml"] + ["<think>", "ĊĊ", "</think>", "ĊĊ"]
    assert len(eoi_tokens(tok).offsets) == 5


def test_prompt_text_is_data_not_template_code():
    tok = make_tokenizer("chatml")
    nasty = "{{ 7 * 7 }} {% for x in range(3) %}{{ x }}{% endfor %} {user} %s {0}"
    [prompt] = format_prompts(tok, [nasty])
    assert f"<|im_start|>user\n{nasty}<|im_end|>" in prompt
    assert "49" not in prompt and "012" not in prompt


def test_missing_template_raises_and_fallback_is_used():
    tok = make_tokenizer("llama3", with_template=False)
    with pytest.raises(ChatTemplateError, match="model.chat_template"):
        format_prompts(tok, ["hi"])
    with pytest.raises(ChatTemplateError):
        eoi_tokens(tok)
    assert format_prompts(tok, ["hi"], chat_template=LLAMA3) == format_prompts(make_tokenizer("llama3"), ["hi"])
    assert eoi_tokens(tok, chat_template=LLAMA3).tokens == EXPECTED_EOI["llama3"]


def test_template_rejecting_system_prompt_gives_clear_error():
    tok = make_tokenizer("gemma")
    with pytest.raises(ChatTemplateError, match="system"):
        format_prompts(tok, ["hi"], system_prompt="You are helpful.")


def test_system_prompt_folded_by_mistral_template_keeps_eoi():
    tok = make_tokenizer("mistral")
    [prompt] = format_prompts(tok, ["hi"], system_prompt="Be brief.")
    assert prompt == "<s>[INST] Be brief.\n\nhi[/INST]"
    assert eoi_tokens(tok, system_prompt="Be brief.").tokens == ["[/INST]"]


def test_eoi_excludes_tokens_that_merge_with_user_text():
    # A plain-text template: punctuation before "\n\n" merges into one pre-token under the
    # Llama-3 split regex ("?\n\n"), so the newline cannot belong to the span.
    tok = make_tokenizer("llama3", with_template=False)
    # (The final newline is an expression because Jinja drops a template's trailing newline.)
    template = "{% for m in messages %}### Instruction:\n{{ m['content'] }}\n\n{% endfor %}{{ '### Response:\\n' }}"
    span = eoi_tokens(tok, chat_template=template)
    text = "".join(span.tokens).replace("Ġ", " ").replace("Ċ", "\n")
    assert text == "### Response:\n"
    assert tok.tokenize(format_prompts(tok, ["No!"], chat_template=template)[0])[-len(span.tokens) - 1] == "!ĊĊ"
    enc = tokenize_prompts(tok, format_prompts(tok, INSTRUCTIONS, chat_template=template), 128)
    assert enc["input_ids"][:, span.offsets].tolist() == [span.token_ids] * len(INSTRUCTIONS)


def test_prompt_too_long_lists_offenders():
    tok = make_tokenizer("llama3")
    formatted = format_prompts(tok, ["short", "word " * 60, "ok", "many words " * 40])
    with pytest.raises(PromptTooLongError) as err:
        tokenize_prompts(tok, formatted, max_tokens=40)
    msg = str(err.value)
    assert "2 of 4 prompts exceed max_prompt_tokens=40" in msg and "#1 (" in msg and "#3 (" in msg and "#0" not in msg
    enc = tokenize_prompts(tok, formatted[::2], max_tokens=40)
    assert enc["input_ids"].dtype == torch.long and enc["input_ids"].shape[0] == 2
