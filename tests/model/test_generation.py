"""Batched greedy generation and first-token scores on tiny models with a real chat template."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch
from tiny_models import make_tokenizer, tiny_model

from refusal_atlas.model.chat import PromptTooLongError, format_prompts
from refusal_atlas.model.generation import (
    encode_prefixed,
    first_token_logprobs,
    forward_tokens_per_s,
    generate,
    generate_scored,
    refusal_scores,
    refusal_token_ids,
    score_prefixed_rows,
    stop_token_ids,
)
from refusal_atlas.model.hooks import add_direction, add_rows, read_residual

INSTRUCTIONS = [
    "Tell me a story about a dragon and a knight.",
    "Hi",
    "How do I bake bread?",
    "What is the capital of France? Tell me a short answer.",
    "Write a poem",
]


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer("llama3")
    # Scaled weights give peaked next-token distributions, so greedy choices do not hinge on
    # float rounding between differently padded batches.
    model = tiny_model("llama", vocab=len(tok), scale=4.0)
    return model, tok, format_prompts(tok, INSTRUCTIONS)


def test_batched_equals_one_at_a_time_in_input_order(setup):
    model, tok, formatted = setup
    batched = generate(model, tok, formatted, max_new_tokens=8, batch_size=3)
    single = [generate(model, tok, [f], max_new_tokens=8, batch_size=1)[0] for f in formatted]
    assert batched == single
    assert len(set(batched)) > 1, "different prompts should give different continuations"
    assert all(isinstance(t, str) and t == t.strip() for t in batched)
    assert generate(model, tok, formatted, max_new_tokens=8, batch_size=5) == batched  # deterministic
    assert generate(model, tok, formatted[::-1], max_new_tokens=8, batch_size=2) == batched[::-1]


def test_steering_applies_to_prompt_and_generated_tokens(setup):
    model, tok, formatted = setup
    plain = generate(model, tok, formatted[:2], max_new_tokens=6, batch_size=2)
    vector = 40.0 * torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    # The outer read sees block 1's input before the addition, the inner one after it.
    with (
        read_residual(model, [1], [-1]) as before,
        add_direction(model, 1, vector),
        read_residual(model, [1], [-1]) as after,
    ):
        steered = generate(model, tok, formatted[:2], max_new_tokens=6, batch_size=2)
    assert steered != plain
    assert after.call_lengths[0] > 1 and after.call_lengths[1:] == [1] * (len(after.call_lengths) - 1)
    assert len(after.call_lengths) >= 2, "the cached decoding steps must run through the hook"
    for pre, post in zip(before.calls[1], after.calls[1]):
        assert torch.allclose(post - pre, vector.expand_as(pre), atol=1e-5)


def test_stop_strings_cut_the_response(setup):
    model, tok, formatted = setup
    [full] = generate(model, tok, formatted[:1], max_new_tokens=12, batch_size=1)
    stop = full[4:7]
    assert len(stop) == 3 and stop.strip()
    [cut] = generate(model, tok, formatted[:1], max_new_tokens=12, batch_size=1, stop_strings=[stop])
    assert cut == full.split(stop, 1)[0].strip()


def test_generation_stops_at_end_of_turn_token(setup):
    model, tok, formatted = setup
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    # This test vocabulary holds every family's end-of-turn token, so all of them count.
    end_of_turn = set(tok.convert_tokens_to_ids(["<end_of_turn>", "<|im_end|>", "<|end|>"]))
    assert (
        set(stop_token_ids(model, tok)) == {tok.eos_token_id, eot, model.generation_config.eos_token_id} | end_of_turn
    )
    # Make <|eot_id|> the certain next token after any input: generation must stop after the
    # prefill (one forward call) instead of running all 5 steps and emitting skipped specials.
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([eot]), 1e4))
    try:
        with read_residual(model, [0], [-1]) as cap:
            assert generate(model, tok, formatted[:2], max_new_tokens=5, batch_size=2) == ["", ""]
    finally:
        handle.remove()
    assert len(cap.call_lengths) == 1


def test_prompt_limit_is_checked_on_every_prompt_before_any_batch(setup):
    model, tok, formatted = setup
    long_one = format_prompts(tok, ["word " * 80])[0]
    prompts = [*formatted, long_one, *formatted]
    limit = max(len(tok(f, add_special_tokens=False)["input_ids"]) for f in formatted)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(
            PromptTooLongError,
            match=rf"^1 of {len(prompts)} prompts exceed max_prompt_tokens={limit}: #{len(formatted)} \(",
        ):
            generate(model, tok, prompts, max_new_tokens=2, batch_size=2, max_prompt_tokens=limit)
        with pytest.raises(PromptTooLongError, match=rf"^1 of {len(prompts)} prompts"):
            first_token_logprobs(model, tok, prompts, batch_size=2, max_prompt_tokens=limit)
    finally:
        handle.remove()
    assert calls == []  # named by its index in the caller's list, before the model ran at all
    assert len(generate(model, tok, formatted, max_new_tokens=2, batch_size=2, max_prompt_tokens=limit)) == len(
        formatted
    )


def test_refusal_token_ids_first_tokens_deduplicated():
    tok = make_tokenizer("llama3")
    ids = refusal_token_ids(tok, ["I", "As", "I'm sorry", "Sorry"])
    assert len(ids) == 3 and len(set(ids)) == 3
    first = [tok(s, add_special_tokens=False)["input_ids"][0] for s in ("I", "As", "Sorry")]
    assert ids == first and tok.decode([ids[0]]) == "I"
    assert tok("I'm sorry", add_special_tokens=False)["input_ids"][0] == ids[0]  # the duplicate that was dropped


def test_refusal_scores_are_log_odds_of_first_token(setup):
    model, tok, formatted = setup
    ids = refusal_token_ids(tok, ["I", "As", "Sorry"])
    scores = refusal_scores(model, tok, formatted, ids, batch_size=2)
    assert scores.shape == (len(formatted),) and scores.dtype == np.float64 and np.isfinite(scores).all()
    logp = first_token_logprobs(model, tok, formatted, batch_size=5)
    assert logp.shape == (len(formatted), len(tok)) and logp.dtype == torch.float32
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(formatted)), atol=1e-5)
    p = logp.double().exp()[:, ids].sum(-1).numpy()
    np.testing.assert_allclose(scores, np.log(p / (1 - p)), rtol=1e-6, atol=1e-6)
    # Batch composition and padding do not change a prompt's score.
    alone = np.array([refusal_scores(model, tok, [f], ids, batch_size=1)[0] for f in formatted])
    np.testing.assert_allclose(scores, alone, atol=1e-5)
    # And the last position is the generation step: the greedy first token is logp's argmax.
    first = generate(model, tok, formatted[:1], max_new_tokens=1, batch_size=1)[0]
    assert tok.decode([int(logp[0].argmax())]).strip() == first


@pytest.mark.parametrize("steer", [False, True])
def test_generate_scored_reads_the_prompt_scores_from_its_own_prefill(setup, steer):
    model, tok, formatted = setup
    vector = 40.0 * torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(1)), dim=0)
    with add_direction(model, 1, vector) if steer else contextlib.nullcontext():
        responses, logp = generate_scored(model, tok, formatted, max_new_tokens=4, batch_size=2)
        reference = first_token_logprobs(model, tok, formatted, batch_size=2)
        assert responses == generate(model, tok, formatted, max_new_tokens=4, batch_size=2)
    assert logp.shape == reference.shape == (len(formatted), len(tok)) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, reference, rtol=1e-5, atol=1e-5)  # in input order, under the same hooks
    unsteered = generate_scored(model, tok, formatted, max_new_tokens=1, batch_size=2)[1]
    assert (logp - unsteered).abs().max() > 1.0 if steer else torch.equal(logp, unsteered)


def test_forward_throughput_counts_the_real_tokens_of_one_batch(setup):
    model, tok, formatted = setup
    # A forward pass made to last 1 s (and a little): the throughput is the batch's unpadded tokens over that.
    handle = model.register_forward_pre_hook(lambda module, args: time.sleep(1.0))
    try:
        rate = forward_tokens_per_s(model, tok, formatted[:2], batch_size=4, repeats=2)
    finally:
        handle.remove()
    n_tokens = 2 * sum(
        len(tok(f, add_special_tokens=False)["input_ids"]) for f in formatted[:2]
    )  # repeated to fill 4 rows
    assert n_tokens / 1.3 < rate <= n_tokens / 1.0  # counting 2 rows or padding would leave this band


def test_model_generation_config_does_not_change_greedy_decoding(setup):
    import copy

    model, tok, formatted = setup
    expected = generate(model, tok, formatted[:3], max_new_tokens=8, batch_size=3)
    saved = copy.deepcopy(model.generation_config)
    try:
        # transformers 5 fills unset fields of the passed config from the model's own.
        model.generation_config.update(do_sample=True, temperature=0.3, top_p=0.5, repetition_penalty=5.0)
        assert generate(model, tok, formatted[:3], max_new_tokens=8, batch_size=3) == expected
    finally:
        model.generation_config = saved


@pytest.mark.parametrize("family,arch", [("chatml", "llama"), ("chatml", "qwen2"), ("llama3", "gpt2")])
def test_score_prefixed_rows_matches_whole_prompts_under_the_same_hooks(family, arch):
    tok = make_tokenizer(family)
    model = tiny_model(arch, vocab=len(tok), scale=4.0)
    formatted = format_prompts(tok, INSTRUCTIONS)
    prompts = encode_prefixed(tok, formatted)
    whole = [tok(f, add_special_tokens=False)["input_ids"] for f in formatted]
    assert [prompts.prefix + s for s in prompts.suffixes] == whole and prompts.lengths == [len(w) for w in whole]
    assert len(prompts.prefix) >= (10 if family == "chatml" else 1) and min(map(len, prompts.suffixes)) >= 1
    vectors = {
        0: torch.zeros(32),
        1: 30.0 * torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0),
    }
    rows = [(i, g) for g in (1, 0) for i in range(len(formatted))]
    seen = []

    def intervene(groups):
        seen.append(list(groups))
        return add_rows(model, [1] * len(groups), torch.stack([vectors[g] for g in groups]))

    tally = {}
    got = score_prefixed_rows(
        model,
        prompts,
        [i for i, _ in rows],
        [g for _, g in rows],
        intervene,
        lambda logp, idx: logp[:, 5],
        rows_per_pass=4,
        tally=tally,
    )
    plain = first_token_logprobs(model, tok, formatted, batch_size=2)[:, 5]
    with add_direction(model, 1, vectors[1]):
        steered = first_token_logprobs(model, tok, formatted, batch_size=3)[:, 5]
    np.testing.assert_allclose(got, np.r_[steered.numpy(), plain.numpy()], rtol=1e-5, atol=1e-5)
    # The prefix once per distinct group, before any pass; then each pass's rows' suffixes on it.
    groups = [g for _, g in rows]
    assert seen == [[1, 0], *[groups[k : k + 4] for k in range(0, len(groups), 4)]]
    assert tally["tokens"] == sum(len(s) for s in prompts.suffixes) * 2 + len(prompts.prefix) * 2
    with pytest.raises(PromptTooLongError):
        encode_prefixed(tok, formatted, max_prompt_tokens=5)
