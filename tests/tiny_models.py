"""Tiny random models and a small byte-level BPE tokenizer for the model-layer tests.

Imported explicitly by test_models/test_hooks/test_templates/test_generation. Everything is
built from config classes and the ``tokenizers`` library: nothing is downloaded.
"""

from __future__ import annotations

import functools

import torch
import transformers as T
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------

_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _decoder(cls, vocab: int, **extra):
    base = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **_IDS,
    )
    return cls(**{**base, **extra})


ARCH_CONFIGS = {
    "llama": lambda v: _decoder(T.LlamaConfig, v),
    "qwen2": lambda v: _decoder(T.Qwen2Config, v),
    "qwen3": lambda v: _decoder(T.Qwen3Config, v, head_dim=8),
    "gemma2": lambda v: _decoder(T.Gemma2Config, v, head_dim=8),
    "gemma3": lambda v: _decoder(T.Gemma3TextConfig, v, head_dim=8),
    "mistral": lambda v: _decoder(T.MistralConfig, v),
    "phi3": lambda v: _decoder(T.Phi3Config, v),
    "gpt2": lambda v: T.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=256, **_IDS),
    "gpt_neox": lambda v: T.GPTNeoXConfig(
        vocab_size=v,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        **_IDS,
    ),
    "olmo2": lambda v: _decoder(T.Olmo2Config, v),
}
ARCHS = list(ARCH_CONFIGS)
# Architectures whose blocks add sublayer outputs un-normalised, so weight orthogonalisation
# is exactly equivalent to hook ablation.
EXACT_ORTHO_ARCHS = ["llama", "qwen2", "mistral", "phi3", "gpt2", "gpt_neox"]


def tiny_model(arch: str, vocab: int = 128, seed: int = 0, scale: float = 1.0):
    """A float32 eval-mode random model with 2 blocks and d_model 32.

    ``scale`` multiplies every weight matrix so logits spread out; with the default 0.02
    initialisation the next-token distribution is almost flat and greedy choices would hinge
    on float rounding.
    """
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(ARCH_CONFIGS[arch](vocab), attn_implementation="eager")
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.mul_(scale)
    return model.eval().requires_grad_(False)


def batch(vocab: int = 128, lengths=(9, 6, 4), seed: int = 1) -> dict:
    """A left-padded batch of random ids: input_ids and attention_mask [len(lengths), max(lengths)]."""
    g = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, width - length :] = torch.randint(3, vocab, (length,), generator=g)
        mask[i, width - length :] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------------------
# Tokenizer and chat templates
# ----------------------------------------------------------------------------------------

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
PHI3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'system') %}{{'<|system|>' + '\n' + message['content'] + '<|end|>' + '\n'}}"
    "{% elif (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif message['role'] == 'assistant' %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)

# (template, bos, eos) per family; the special tokens are shared by one vocabulary.
FAMILIES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>"),
    "gemma": (GEMMA, "<bos>", "<eos>"),
    "chatml": (CHATML, None, "<|endoftext|>"),
    "mistral": (MISTRAL, "<s>", "</s>"),
    "phi3": (PHI3, "<s>", "<|endoftext|>"),
}
SPECIAL_TOKENS = [
    "<pad>",
    "<unk>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<think>",
    "</think>",
]
# Llama-3's pre-tokenisation regex, so "\n\n" and " word" pieces behave as in the real tokenizer.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WORDS = (
    "I am sorry but I cannot help with that request . As an AI assistant I can help you write a poem about the sea "
    "How do I bake bread ? What is the capital of France ? Tell me a story about a dragon and a knight . "
    "Sure , here is a short answer : the sky is blue because of scattering . system user model assistant "
    "You are Qwen , created by Alibaba Cloud . You are a helpful assistant . "
    "Sentinel request alpha What is it ?! x 12345"
)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train a byte-level BPE (vocab 400) once on chat-like text; returns its JSON."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # The punctuation-before-newlines lines teach merges such as "!\n\n" that cross the
    # boundary between a user's text and a plain-text template.
    corpus = [WORDS] * 20 + [
        "user\n\n",
        "assistant\n\n",
        "model\n",
        "\n\n",
        "system\n",
        "Really?!\n\nYes.\n\nNo!\n\n",
    ] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def make_tokenizer(family: str = "llama3", with_template: bool = True) -> T.PreTrainedTokenizerFast:
    """A fast tokenizer with the given family's special tokens and (optionally) its chat template."""
    template, bos, eos = FAMILIES[family]
    tok = T.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in {bos, eos, "<unk>", "<pad>"}],
    )
    tok.chat_template = template if with_template else None
    tok.padding_side = "left"
    return tok
