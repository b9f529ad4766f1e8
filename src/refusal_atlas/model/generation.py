"""Batched greedy generation and first-token scores, under whatever hooks are active.

Prompts are sorted by length so each batch carries little padding, run left-padded, and
results are returned in the caller's order. Nothing here registers hooks: steering is the
caller's ``with add_direction(...)`` / ``with ablate_directions(...)`` block.
"""

from __future__ import annotations

import copy
import inspect
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from refusal_atlas.model.chat import check_prompt_lengths, tokenize_prompts

# Tokens that end an assistant turn in common chat templates; each is used as a stop token
# only if the tokenizer has it, so no family is singled out.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>", "<|eom_id|>")


def _input_device(model: nn.Module) -> torch.device:
    # With device_map="auto" the blocks are spread over devices; inputs go where the
    # embedding lives and accelerate moves activations from there.
    return model.get_input_embeddings().weight.device


def _batches(tokenizer, formatted: list[str], batch_size: int, max_tokens: int) -> Iterator[tuple[list[int], dict]]:
    """Yield (input indices, left-padded encoding) for length-sorted batches of ``formatted``.

    Every prompt's length is checked before the first batch, so an overlong prompt fails at
    once and is named by its index in ``formatted``.
    """
    lengths = check_prompt_lengths(tokenizer, formatted, max_tokens)
    # Longest first so an out-of-memory error shows up in the first batch; ties keep input
    # order, which makes the batching (and so the results) deterministic.
    order = sorted(range(len(formatted)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, tokenize_prompts(tokenizer, [formatted[i] for i in idx], max_tokens)


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Sorted ids that end generation: eos from tokenizer and generation_config, plus known end-of-turn tokens."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(x) for x in source)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def _greedy_config(
    model: nn.Module, tokenizer, max_new_tokens: int, stop_strings: list[str] | None
) -> GenerationConfig:
    # transformers 5 fills every unset (None) field of a passed GenerationConfig from the
    # model's own generation_config, so penalties a model ships with (e.g. repetition_penalty)
    # would silently apply; plain greedy decoding is spelt out field by field instead.
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        stop_strings=stop_strings or None,
    )


class _FirstStepLogprobs(LogitsProcessor):
    """Keeps the first step's float32 log-softmax, [batch, vocab] on the CPU: the prompts'
    next-token distribution, which the prefill computes anyway (see ``generate_scored``)."""

    def __init__(self):
        self.logprobs: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.logprobs is None:
            self.logprobs = torch.log_softmax(scores.float(), dim=-1).cpu()
        return scores


@torch.inference_mode()
def generate_scored(
    model: nn.Module,
    tokenizer,
    formatted: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop_strings: list[str] | None = None,
    max_prompt_tokens: int | None = None,
    progress: bool = False,
) -> tuple[list[str], torch.Tensor]:
    """Greedy continuations of formatted prompts, and each prompt's next-token log-probabilities.

    Inputs: n formatted prompts (chat template applied); ``stop_strings`` optionally end a
    response early (the text is cut before the first one). Output: n response strings in
    input order, decoded without special tokens and stripped, and float32 [n, vocab] on the
    CPU: the distribution of the first generated token, read from the generation's own
    prefill, so scoring the prompts costs no second forward pass (equal to
    ``first_token_logprobs`` up to float rounding). Deterministic.
    """
    config = _greedy_config(model, tokenizer, max_new_tokens, stop_strings)
    device = _input_device(model)
    out: list[str | None] = [None] * len(formatted)
    rows: dict[int, torch.Tensor] = {}
    batches = list(_batches(tokenizer, formatted, batch_size, max_prompt_tokens or sys.maxsize))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")
    for idx, enc in batches:
        enc = enc.to(device)
        # generate() needs the tokenizer to match stop strings against token pieces.
        extra = {"tokenizer": tokenizer} if stop_strings else {}
        first = _FirstStepLogprobs()
        ids = model.generate(
            **enc, generation_config=config, logits_processor=LogitsProcessorList([first]), **extra
        )  # [batch, prompt_len + new]
        texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text, logp in zip(idx, texts, first.logprobs):
            for stop in stop_strings or ():
                text = text.split(stop, 1)[0]
            out[i] = text.strip()
            rows[i] = logp
    logprobs = torch.stack([rows[i] for i in range(len(formatted))]) if formatted else torch.empty(0, 0)
    return out, logprobs


def generate(
    model: nn.Module,
    tokenizer,
    formatted: list[str],
    max_new_tokens: int,
    batch_size: int,
    stop_strings: list[str] | None = None,
    max_prompt_tokens: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy continuations of formatted prompts: ``generate_scored``'s responses alone."""
    return generate_scored(
        model, tokenizer, formatted, max_new_tokens, batch_size, stop_strings, max_prompt_tokens, progress
    )[0]


def refusal_token_ids(tokenizer, strings: list[str]) -> list[int]:
    """First token id of each string, encoded without special tokens; duplicates removed, order kept."""
    ids: list[int] = []
    for s in strings:
        encoded = tokenizer(s, add_special_tokens=False)["input_ids"]
        if not encoded:
            raise ValueError(f"refusal string {s!r} encodes to no tokens")
        if encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def forward_logprobs(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """float32 log-softmax of the next-token logits at the last ``keep`` positions: [batch, keep, vocab].

    Explicit position ids make a left-padded row see the same positions as it would alone
    (models' forward otherwise numbers pad tokens too), so values do not depend on which rows
    share the batch; only the kept positions' logits are materialised where the model allows.
    """
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    accepted = inspect.signature(model.forward).parameters
    kwargs = {"position_ids": positions} if "position_ids" in accepted else {}
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False, **kwargs).logits[:, -keep:, :]
    return torch.log_softmax(logits.float(), dim=-1)


def _forward_last(model: nn.Module, enc) -> torch.Tensor:
    """float32 log-softmax of the next-token logits at the last position: [batch, vocab]."""
    return forward_logprobs(model, enc["input_ids"], enc["attention_mask"])[:, -1, :]


@torch.inference_mode()
def first_token_logprobs(
    model: nn.Module,
    tokenizer,
    formatted: list[str],
    batch_size: int,
    max_prompt_tokens: int | None = None,
) -> torch.Tensor:
    """Next-token log-probabilities after each prompt: float32 [n, vocab] on the CPU, input order."""
    device = _input_device(model)
    rows: dict[int, torch.Tensor] = {}
    for idx, enc in _batches(tokenizer, formatted, batch_size, max_prompt_tokens or sys.maxsize):
        logp = _forward_last(model, enc.to(device)).cpu()
        rows.update(zip(idx, logp))
    return torch.stack([rows[i] for i in range(len(formatted))])


@torch.inference_mode()
def forward_tokens_per_s(
    model: nn.Module,
    tokenizer,
    formatted: list[str],
    batch_size: int,
    max_prompt_tokens: int | None = None,
    repeats: int = 3,
) -> float:
    """Plain forward throughput, the floor that batched scoring is measured against: real tokens per second.

    One batch of ``batch_size`` whole prompts (``formatted`` repeated as needed), run as
    ``first_token_logprobs`` runs it (last-position logits only), once to warm up and then
    ``repeats`` times; the median time counts.
    """
    batch = (list(formatted) * (batch_size // max(1, len(formatted)) + 1))[:batch_size]
    _, enc = next(_batches(tokenizer, batch, batch_size, max_prompt_tokens or sys.maxsize))
    enc = enc.to(_input_device(model))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        _forward_last(model, enc)[:, 0].cpu()  # .cpu() waits for an accelerator
        times.append(time.perf_counter() - start)
    return int(enc["attention_mask"].sum()) / float(np.median(times[1:]))


def refusal_scores(
    model: nn.Module,
    tokenizer,
    formatted: list[str],
    token_ids: list[int],
    batch_size: int,
    max_prompt_tokens: int | None = None,
) -> np.ndarray:
    """First-token refusal log-odds per prompt: float64 [n].

    score = log(p / (1 - p)) with p = sum of next-token probabilities of ``token_ids`` at the
    last prompt position (Arditi et al. 2024). Computed from log-probabilities so p near 0 or 1
    stays finite.
    """
    return refusal_log_odds(
        first_token_logprobs(model, tokenizer, formatted, batch_size, max_prompt_tokens), token_ids
    ).numpy()


def refusal_log_odds(logp: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Refusal log-odds from next-token log-probabilities: [n, vocab] -> float64 [n] (see ``refusal_scores``)."""
    logp = logp.double()
    log_p = torch.logsumexp(logp[:, token_ids], dim=-1)
    # log(1 - p) = log(-expm1(log p)), accurate for p close to 1.
    log_not_p = torch.log(-torch.expm1(log_p).clamp(max=-torch.finfo(torch.float64).tiny))
    return log_p - log_not_p


def kl_first_token(base_logprobs, steered_logprobs) -> np.ndarray:
    """KL(base || steered) in nats per prompt: float64 [n].

    Inputs: log-probabilities [n, vocab] (torch or numpy), e.g. from ``first_token_logprobs``
    without and with the hook. Terms where the base probability is 0 contribute 0.
    """
    p_log = torch.as_tensor(base_logprobs).double()
    q_log = torch.as_tensor(steered_logprobs).double()
    if p_log.shape != q_log.shape or p_log.ndim != 2:
        raise ValueError(
            f"kl_first_token: shapes {tuple(p_log.shape)} and {tuple(q_log.shape)}; expected equal [n, vocab]"
        )
    return kl_rows(p_log, q_log).numpy()


def kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL over the last axis of two log-probability tensors, clamped at 0 against rounding."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(-1).clamp(min=0.0)


# -------- Many interventions over one prompt set, sharing the prompts' common prefix --------


@dataclass(frozen=True)
class PrefixedPrompts:
    """Prompts tokenised once and split at their longest common prefix of token ids.

    ``prefix``: the P shared ids (P may be 0); ``suffixes``: each prompt's remaining ids, at
    least one per prompt so its last position is scored in the suffix pass; ``pad_id``: the id
    written under masked (left) padding.
    """

    prefix: list[int]
    suffixes: list[list[int]]
    pad_id: int

    @property
    def lengths(self) -> list[int]:
        """Full token count of each prompt."""
        return [len(self.prefix) + len(s) for s in self.suffixes]


def encode_prefixed(tokenizer, formatted: list[str], max_prompt_tokens: int | None = None) -> PrefixedPrompts:
    """Tokenise ``formatted`` once (no special tokens, as ``tokenize_prompts``) and split off the shared prefix.

    Chat-formatted prompts share their template's opening (a system prompt, role header):
    that prefix is run once per intervention and its KV cache reused for every prompt.
    Raises ``PromptTooLongError`` as ``first_token_logprobs`` does.
    """
    lengths = check_prompt_lengths(tokenizer, formatted, max_prompt_tokens or sys.maxsize)
    ids = tokenizer(list(formatted), add_special_tokens=False)["input_ids"] if formatted else []
    if any(n == 0 for n in lengths):
        raise ValueError(
            f"encode_prefixed: prompt #{lengths.index(0)} encodes to no tokens; every prompt needs at least one"
        )
    n = min(lengths, default=1) - 1  # keep >= 1 suffix token per prompt
    for seq in ids[1:]:
        n = next((i for i in range(n) if seq[i] != ids[0][i]), n)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PrefixedPrompts(
        prefix=list(ids[0][:n]) if ids else [], suffixes=[list(seq[n:]) for seq in ids], pad_id=int(pad)
    )


def _concat_caches(parts: list) -> object:
    """One KV cache holding the rows of ``parts`` (caches over the same positions) one after another."""
    out = copy.copy(parts[0])
    out.layers = [copy.copy(layer) for layer in parts[0].layers]
    for i, layer in enumerate(out.layers):
        layer.keys, layer.values = (
            torch.cat([getattr(p.layers[i], name) for p in parts]) for name in ("keys", "values")
        )
    return out


def _gather_rows(cache, index: torch.Tensor) -> object:
    """A new KV cache whose row i is row ``index[i]`` of ``cache`` (which is left unchanged)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in out.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    return out


@torch.inference_mode()
def score_prefixed_rows(
    model: nn.Module,
    prompts: PrefixedPrompts,
    row_prompt: Sequence[int],
    row_group: Sequence[int],
    intervene: Callable[[list[int]], AbstractContextManager],
    reduce: Callable[[torch.Tensor, list[int]], torch.Tensor],
    rows_per_pass: int,
    tally: dict | None = None,
    on_pass: Callable[[int], object] | None = None,
    skip: Callable[[int], bool] | None = None,
    on_values: Callable[[list[int], np.ndarray], object] | None = None,
) -> np.ndarray:
    """One score per row, each row a (prompt, intervention group) pair, under per-row hooks.

    Inputs: ``row_prompt[r]`` indexes ``prompts``; ``row_group[r]`` names the row's
    intervention (e.g. a candidate direction). ``intervene(groups)`` returns the context
    manager (e.g. ``ablate_rows``) under which a forward pass whose batch row i belongs to
    ``groups[i]`` runs. ``reduce(logp [R, vocab] float32, prompt indices [R])`` turns the
    next-token log-probabilities after each row's prompt into one value per row.

    The shared prefix is run once per distinct group, under that group's hooks (so it is
    intervened on exactly as in a full pass), and its KV cache kept. Rows are then run
    ``rows_per_pass`` at a time, in the given order: their left-padded suffixes on their
    groups' prefix KV rows,
    with the attention mask covering prefix and suffix and position ids continuing after the
    prefix (pads masked), and only the last position's logits are computed. ``tally`` (if
    given) gets ``"tokens"`` (real tokens run, prefixes included) and ``"padded_tokens"`` added;
    ``on_pass(n_rows)`` (if given) is called after each pass, e.g. a progress bar's update.
    ``skip(row)`` (if given) is asked as each pass is filled: a row it skips is not run (its
    value is NaN), so a caller that learns from ``on_values(rows, values)``, called after each
    pass, can stop scoring a group early. Output: float64 [n_rows].
    """
    device = _input_device(model)
    accepted = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    n_prefix, out = len(prompts.prefix), np.full(len(row_prompt), np.nan)
    tally = {} if tally is None else tally
    if n_prefix:  # the prefix once per group, under its hooks; every pass then reuses its KV rows
        distinct = list(dict.fromkeys(row_group))
        slot = {g: i for i, g in enumerate(distinct)}
        step = max(1, rows_per_pass)
        parts = []
        for start in range(0, len(distinct), step):
            chunk = distinct[start : start + step]
            ids = torch.tensor(prompts.prefix, device=device).expand(len(chunk), n_prefix)
            with intervene(chunk):
                parts.append(
                    model(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        position_ids=torch.arange(n_prefix, device=device).expand_as(ids),
                        use_cache=True,
                        **keep,
                    ).past_key_values
                )
        prefix_cache = _concat_caches(parts)
        tally["tokens"] = tally.get("tokens", 0) + len(distinct) * n_prefix
        tally["padded_tokens"] = tally.get("padded_tokens", 0) + len(distinct) * n_prefix
    todo, skip = iter(range(len(row_prompt))), skip or (lambda row: False)
    while rows := _fill(todo, rows_per_pass, skip):
        index, groups = [row_prompt[r] for r in rows], [row_group[r] for r in rows]
        kwargs = {}
        if n_prefix:
            kwargs = {
                "past_key_values": _gather_rows(prefix_cache, torch.tensor([slot[g] for g in groups], device=device)),
                "use_cache": True,
            }
        width = max(len(prompts.suffixes[i]) for i in index)
        ids = torch.full((len(index), width), prompts.pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            suffix = prompts.suffixes[i]
            ids[row, width - len(suffix) :] = torch.tensor(suffix)
            mask[row, width - len(suffix) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = n_prefix + (mask.cumsum(-1) - 1).clamp(min=0)  # a left-padded row continues at P, as if alone
        full_mask = torch.cat([torch.ones((len(index), n_prefix), dtype=torch.long, device=device), mask], dim=1)
        with intervene(groups):
            logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, **kwargs, **keep).logits[
                :, -1, :
            ]
        out[rows] = reduce(torch.log_softmax(logits.float(), dim=-1), index).double().cpu().numpy()
        tally["tokens"] = tally.get("tokens", 0) + int(mask.sum())
        tally["padded_tokens"] = tally.get("padded_tokens", 0) + mask.numel()
        if on_values is not None:
            on_values(rows, out[rows])
        if on_pass is not None:
            on_pass(len(index))
    return out


def _fill(todo: Iterator[int], size: int, skip: Callable[[int], bool]) -> list[int]:
    """The next ``size`` rows of ``todo`` that ``skip`` keeps (fewer at the end)."""
    rows: list[int] = []
    for r in todo:
        if not skip(r):
            rows.append(r)
            if len(rows) == size:
                break
    return rows
