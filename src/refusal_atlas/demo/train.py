"""The embedded demo model: a tiny Llama chat model whose refusal style depends on the category.

``train_demo_model`` trains, on the CPU and in a few minutes, a byte-level BPE tokenizer and a
small ``LlamaForCausalLM`` on the *train* split of the prompt table plus templated
augmentation, and saves both as a standard Hugging Face model directory (safetensors, chat
template, generation config). The responses follow the reference study's refusal styles:
SAFETY for the safety-type categories (with a referral for unqualified advice), CAPABILITY
for humanizing and unsupported requests, UNDERSPEC for incomplete ones, GENERIC for
indeterminate ones, and a helpful answer for every baseline prompt. ``evaluate_demo``
(``demo.evaluate``) measures the behaviour on a held-out split with the keyword judge.

The training data (train split, extra prompts, slot grammar) is built in ``demo.grammar``.
A 1.4M-parameter model trained from scratch knows nothing beyond these words, so held-out
prompts whose cue it has never seen (an unseen weapon name, a false premise that needs world
knowledge) can be answered instead of refused.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from refusal_atlas.config import DemoConfig
from refusal_atlas.demo.grammar import build_training_examples

BOS, USER, ASSISTANT, SYSTEM, END, PAD = "<|begin|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, SYSTEM, USER, ASSISTANT, END]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant, got ' ~ message['role']) }}{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a friendly and careful AI assistant.", "Answer briefly.")


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _encode(tokenizer, examples: list[tuple[str, str, str]], rng: random.Random) -> list[tuple[list[int], int]]:
    """(token ids of chat prompt + answer + end token, number of prompt tokens) per example.

    About one example in ten gets a system message, so the template's optional system turn is
    familiar to the model too.
    """
    conversations = []
    for prompt, _, _ in examples:
        system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.1 else []
        conversations.append(system + [{"role": "user", "content": prompt}])
    formatted = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    prompts = tokenizer(formatted, add_special_tokens=False)["input_ids"]
    answers = tokenizer([response for _, response, _ in examples], add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids(END)
    return [(p + a + [end_id], len(p)) for p, a in zip(prompts, answers)]


# The first answer tokens decide whether and how the model refuses; the rest is a fixed phrasing
# or an echo. Weighting them up spends the small training budget on the decision.
_DECISION_TOKENS, _DECISION_WEIGHT = 4, 3.0
# Share of the user's tokens replaced by random ones each time an example is drawn.
_TOKEN_NOISE = 0.15


def _batches(encoded, batch_size: int, steps: int, gen: torch.Generator, pad_id: int, n_special: int, vocab: int):
    """Yield ``steps`` (input_ids, attention_mask, labels) batches; epochs are shuffled, batches length-bucketed."""
    step = 0
    while True:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        chunk = batch_size * 16  # sort within chunks of 16 batches so each batch carries little padding
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: len(encoded[i][0]))
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            rows = [encoded[i] for i in batches[b]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            labels = torch.zeros((len(rows), width), dtype=torch.long)
            weights = torch.zeros((len(rows), width))
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (ids, n_prompt) in enumerate(rows):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                labels[r, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
                weights[r, n_prompt : len(ids)] = 1.0
                weights[r, n_prompt : n_prompt + _DECISION_TOKENS] = _DECISION_WEIGHT
                mask[r, : len(ids)] = 1
            # Replace a share of the user's tokens (never the template's) by random ones, fresh
            # each time an example is drawn, so no single word or memorised sequence decides.
            user = (weights == 0) & (mask == 1) & (input_ids >= n_special)
            noise = (torch.rand(input_ids.shape, generator=gen) < _TOKEN_NOISE) & user
            input_ids[noise] = torch.randint(n_special, vocab, (int(noise.sum()),), generator=gen)
            yield input_ids, mask, labels, weights
            step += 1
            if step == steps:
                return


def train_demo_model(
    table: pd.DataFrame,
    cfg: DemoConfig,
    out_dir: Path,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train the demo chat model on the train split of ``table`` and save it to ``out_dir``.

    Inputs: the prompt table (``prompts.TABLE_COLUMNS``), the demo settings, an output folder;
    ``on_step(step, loss)`` is called after every optimiser step. Writes a Hugging Face model
    directory (``model.safetensors``, ``config.json``, ``generation_config.json``, tokenizer
    files with the chat template). Returns ``loss_curve`` (list of (step, loss)), ``n_params``,
    ``train_seconds``, ``n_examples``, ``n_tokens`` and ``cpu_kernels`` (ATen's instruction set).
    Same inputs and seed give bit-identical files: everything is seeded, batching is
    deterministic, and training runs with deterministic algorithms on a fixed 2 torch threads
    (the caller's thread setting is restored). Across hosts that holds when the CPU kernels are
    pinned (``numerics.pin_cpu_numerics``, which the model stage calls before torch loads).
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    examples = build_training_examples(table, cfg.augment, cfg.seed)
    corpus = [p for p, _, _ in examples] + [r for _, r, _ in examples] + list(SYSTEM_PROMPTS)
    tokenizer = _train_tokenizer(corpus, cfg.vocab_size)
    encoded = _encode(tokenizer, examples, random.Random(cfg.seed + 1))
    pad_id = tokenizer.pad_token_id
    end_id = tokenizer.convert_tokens_to_ids(END)

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)  # fixed so the result does not depend on the machine's core count
    torch.use_deterministic_algorithms(True)
    try:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_model * 3,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=end_id,
            pad_token_id=pad_id,
            initializer_range=0.02,
            rms_norm_eps=1e-5,
        )
        model = LlamaForCausalLM(config).float()
        model.train()
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.98),
            eps=1e-8,
        )
        warmup = max(1, cfg.steps // 20)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min((s + 1) / warmup, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        curve = []
        bar = tqdm(total=cfg.steps, desc="train demo", unit="step", disable=not progress)
        for step, (input_ids, mask, labels, weights) in enumerate(
            _batches(encoded, cfg.batch_size, cfg.steps, gen, pad_id, len(SPECIAL_TOKENS), len(tokenizer)), 1
        ):
            hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [batch, tokens, d_model]
            # Only answer tokens are predicted, so the vocabulary projection runs on those alone.
            where = weights[:, 1:] > 0
            logits = model.lm_head(hidden[:, :-1][where])  # [answer tokens, vocab]
            token_loss = torch.nn.functional.cross_entropy(logits, labels[:, 1:][where], reduction="none")
            loss = (token_loss * weights[:, 1:][where]).sum() / weights[:, 1:][where].sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_value = loss.item()
            curve.append((step, loss_value))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if on_step is not None:
                on_step(step, loss_value)
        bar.close()
        model.eval()
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[end_id],
            pad_token_id=pad_id,
            do_sample=False,
            max_new_tokens=64,
        )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return {
        "loss_curve": curve,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "train_seconds": time.perf_counter() - start,
        "n_examples": len(examples),
        "n_tokens": int(sum(len(ids) for ids, _ in encoded)),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
    }
