"""Shared pieces of the extraction benchmark: model presets, synthetic prompts, the
library's extraction-to-store path, machine information.

Imported by test_bench_activations.py and by rss_worker.py (which runs in a fresh
subprocess so that its peak RSS is its own).
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from refusal_atlas.analysis.extraction import extract_to_store, store_order
from refusal_atlas.data import store
from refusal_atlas.model.chat import tokenize_prompts

# Randomly initialised Llama configurations (no download).
PRESETS = {
    # ~110M parameters in the decoder body + embedding (plus a 24.6M untied LM head).
    "100m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        intermediate_size=2048,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
    ),
    # ~11M: for the memory runs (2048 prompts) and for quick dry runs.
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=688,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}

BATCH_SIZE = 16
MIN_LEN, MAX_LEN = 48, 128
POSITIONS = [-5, -4, -3, -2, -1]
STORE_DTYPE = "float32"


def build_model(preset: str):
    """A float32 LlamaForCausalLM in eval mode, weights from ``torch.manual_seed(0)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=512, torch_dtype="float32")
    return LlamaForCausalLM(config).eval()


def build_tokenizer(vocab_size: int):
    """A word-level fast tokenizer in which the word ``t{i}`` is token id ``i``.

    It lets the benchmark drive the library's real, string-based extraction path
    (``extract_to_store`` → ``extract_batch`` → ``tokenize_prompts``) with random token
    ids, and tokenises the same prompts into exactly the same batches for the other
    methods.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="t0", unk_token="t0")


def make_prompts(n: int, vocab_size: int, seed: int = 0) -> pd.DataFrame:
    """``n`` prompts of random token ids (1..vocab-1), lengths uniform in [48, 128], in store order.

    Columns: the store's prompt coordinates plus ``formatted`` (the prompt as ``t{id}`` words).
    The order is the library's own ``store_order`` (by length, then id), so batches hold
    similar lengths.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=n)
    formatted = [" ".join(f"t{i}" for i in rng.integers(1, vocab_size, size=k)) for k in lengths]
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"p{i:05d}" for i in range(n)],
            "category": "bench",
            "role": "target",
            "split": "train",
            "refused": False,
            "text": formatted,
            "formatted": formatted,
        }
    )
    return store_order(prompts, lengths)


def n_batches(n_prompts: int) -> int:
    return -(-n_prompts // BATCH_SIZE)


def tokenized_batches(tokenizer, prompts: pd.DataFrame) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches exactly as ``extract_batch`` tokenises them (``tokenize_prompts``)."""
    formatted = prompts["formatted"].tolist()
    out = []
    for b in range(n_batches(len(formatted))):
        enc = tokenize_prompts(tokenizer, formatted[b * BATCH_SIZE : (b + 1) * BATCH_SIZE], MAX_LEN)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def all_layers(model) -> list[int]:
    """Block inputs 0..L-1 plus the final pre-norm residual L."""
    return list(range(model.config.num_hidden_layers + 1))


def create_bench_store(model, path: Path, prompts: pd.DataFrame) -> None:
    """An empty float32 store for ``prompts`` (store order), all L+1 sites, the 5 positions."""
    store.create_store(
        path,
        prompts,
        all_layers(model),
        POSITIONS,
        [f"tok{p}" for p in POSITIONS],
        model.config.hidden_size,
        STORE_DTYPE,
        BATCH_SIZE,
        {"inputs_fingerprint": "bench"},
    )


def extract_batches(model, tokenizer, path: Path, prompts: pd.DataFrame, batches: list[int]) -> None:
    """The library's ``extract_to_store`` on the given write batches: per batch, tokenise
    (``tokenize_prompts``), hooked forward of ``model.base_model`` (``read_residual``),
    ``check_values``, ``store.write_batch``."""
    extract_to_store(
        model,
        tokenizer,
        path,
        prompts["formatted"].tolist(),
        prompts["prompt_id"].tolist(),
        all_layers(model),
        POSITIONS,
        batches,
        BATCH_SIZE,
        STORE_DTYPE,
        MAX_LEN,
        progress=False,
    )


def extract_with_store(model, tokenizer, path: Path, prompts: pd.DataFrame) -> None:
    """refusal-atlas extraction as the pipeline runs it: create the store, extract every
    batch into it, ``finalize_store``."""
    create_bench_store(model, path, prompts)
    extract_batches(model, tokenizer, path, prompts, list(range(n_batches(len(prompts)))))
    store.finalize_store(path)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else (platform.processor() or "unknown")


def machine_info() -> dict:
    import nnsight
    import transformers
    import zarr

    return {
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "nnsight": nnsight.__version__,
        "loadavg_1_5_15": list(os.getloadavg()),
    }


def rss_now_kb() -> int:
    """Current resident set size (VmRSS) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def hwm_kb() -> int:
    """Peak resident set size since start or the last ``reset_hwm`` (VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ≥ 4.0: write 5 to clear_refs); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
