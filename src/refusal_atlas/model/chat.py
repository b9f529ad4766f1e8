"""Chat templates, prompt formatting and end-of-instruction positions, from the tokenizer's own template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import BatchEncoding

from refusal_atlas.errors import RefusalAtlasError


class ChatTemplateError(RefusalAtlasError, ValueError):
    """The tokenizer has no chat template and none was configured, or the template rejects the messages."""


class PromptTooLongError(RefusalAtlasError, ValueError):
    """Some formatted prompts are longer than ``model.max_prompt_tokens``."""


# ---------------------------------------------------------------------------------------
# Chat templates and end-of-instruction positions
# ---------------------------------------------------------------------------------------


def resolve_chat_template(tokenizer, chat_template: str | None = None) -> str | None:
    """The template in use: the tokenizer's own, else ``chat_template`` (model.chat_template), else None."""
    template = getattr(tokenizer, "chat_template", None) or chat_template
    if isinstance(template, dict):  # named templates; the default one formats plain chats
        template = template.get("default")
    return template or None


def format_prompts(
    tokenizer,
    instructions: list[str],
    system_prompt: str | None = None,
    chat_template: str | None = None,
    template_kwargs: dict | None = None,
) -> list[str]:
    """Render each instruction as a single-turn chat ending where the assistant's answer starts.

    The tokenizer's own template is used; ``chat_template`` (model.chat_template) only when it
    has none. Input: n instruction strings. Output: n formatted prompt strings (including BOS if the
    template writes it). Instructions are passed to Jinja as message *data*, never as
    template source, so braces or template syntax in a prompt are rendered literally.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    if template is None:
        raise ChatTemplateError(
            f"the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '?')}) has no chat "
            "template and none was given; set model.chat_template in params.yaml to the model's Jinja chat template."
        )
    out = []
    for text in instructions:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        try:
            rendered = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
            )
        except Exception as err:  # Jinja's TemplateError and raise_exception() surface as various types.
            hint = (
                " (this template may not support a system message; set model.system_prompt: null)"
                if system_prompt
                else ""
            )
            raise ChatTemplateError(
                f"the chat template failed to render a prompt{hint}: {type(err).__name__}: {err}"
            ) from err
        out.append(rendered)
    return out


@dataclass(frozen=True)
class EoiSpan:
    """End-of-instruction tokens: the template tokens between the user's text and the answer.

    ``offsets`` are negative positions from the end of a (left-padded) prompt, ``-k … -1``;
    ``token_ids``/``tokens`` are the ids and token strings at those offsets.
    """

    offsets: list[int]
    token_ids: list[int]
    tokens: list[str]


# Sentinels whose final characters differ (letter, digit, punctuation) so the common suffix
# of their tokenisations stops exactly at the template, and a merge between the user's last
# character and the template's first shows up as a shorter span instead of a wrong one.
_SENTINELS = ("Sentinel request alpha", "x 12345", "What is it?!")


def eoi_tokens(
    tokenizer,
    system_prompt: str | None = None,
    chat_template: str | None = None,
    template_kwargs: dict | None = None,
) -> EoiSpan:
    """Derive the end-of-instruction span from the chat template.

    Formats several different user texts, tokenises each whole prompt (as the model sees it)
    and returns the longest common suffix of token ids. For Llama-3 this is
    ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`` (5 tokens).
    """
    formatted = format_prompts(tokenizer, list(_SENTINELS), system_prompt, chat_template, template_kwargs)
    ids = [tokenizer(f, add_special_tokens=False)["input_ids"] for f in formatted]
    k = 0
    while all(k < len(seq) for seq in ids) and len({seq[-1 - k] for seq in ids}) == 1:
        k += 1
    if k == 0:
        raise ChatTemplateError(
            "the chat template adds no tokens after the user's text, so there are no end-of-instruction positions."
        )
    suffix = ids[0][len(ids[0]) - k :]
    return EoiSpan(list(range(-k, 0)), suffix, tokenizer.convert_ids_to_tokens(suffix))


def raise_if_too_long(lengths: Sequence[int], max_tokens: int, names: Sequence[str] | None = None) -> None:
    """Raise ``PromptTooLongError`` naming every prompt whose token count is over ``max_tokens``.

    ``names`` (e.g. prompt ids) label the offenders in the message; by default they are
    ``#<index>`` in ``lengths``.
    """
    over = [i for i, n in enumerate(lengths) if n > max_tokens]
    if over:
        label = (lambda i: str(names[i])) if names is not None else (lambda i: f"#{i}")
        shown = ", ".join(f"{label(i)} ({lengths[i]} tokens)" for i in over[:5])
        raise PromptTooLongError(
            f"{len(over)} of {len(lengths)} prompts exceed max_prompt_tokens={max_tokens}: {shown}"
            f"{' …' if len(over) > 5 else ''}. Raise model.max_prompt_tokens or shorten/filter these prompts."
        )


def check_prompt_lengths(
    tokenizer, formatted: Sequence[str], max_tokens: int, names: Sequence[str] | None = None
) -> list[int]:
    """Token count of each formatted prompt, after ``raise_if_too_long`` on all of them.

    Stages and batch loops call this on the whole set before any work, so a bad prompt fails in
    seconds and the message names prompts the user can find.
    """
    lengths = (
        [len(x) for x in tokenizer(list(formatted), add_special_tokens=False)["input_ids"]] if len(formatted) else []
    )
    raise_if_too_long(lengths, max_tokens, names)
    return lengths


def tokenize_prompts(tokenizer, formatted: list[str], max_tokens: int) -> BatchEncoding:
    """Tokenise formatted prompts into a left-padded batch.

    Input: n formatted strings. Output: BatchEncoding with ``input_ids`` and
    ``attention_mask`` of shape [n, max_len] (torch.long). Special tokens are not added
    because the template already wrote them. Raises ``PromptTooLongError`` if any prompt
    has more than ``max_tokens`` tokens.
    """
    enc = tokenizer(formatted, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    raise_if_too_long(enc["attention_mask"].sum(dim=1).tolist(), max_tokens)
    return enc
