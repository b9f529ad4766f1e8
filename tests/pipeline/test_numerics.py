"""Byte-identical outputs on any x86-64 host: every stage pins its CPU kernels before torch and numpy load.

An AVX2-only host is simulated by forcing the kernel choices it would make (ATen, MKL, oneDNN
and OpenBLAS at their AVX2 branches); this host's own choice (AVX-512 where it has it) is the
other side. A stage's outputs, as recorded in dvc.lock, must be the same bytes on both.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import yaml
from helpers import REPO, reduce_repo, run
from tiny_models import make_tokenizer, tiny_model

from refusal_atlas.pipeline.numerics import CPU_NUMERICS, OPT_OUT, on_x86_64

pytestmark = pytest.mark.skipif(not on_x86_64(), reason="the pins are x86-64 instruction sets")


def _has_avx512() -> bool:
    return "avx512f" in open("/proc/cpuinfo").read()  # noqa: SIM115


def test_pinned_cpu_kernels_reach_torch_and_numpy_before_they_load():
    """ATen and MKL at their AVX2 branches, OpenBLAS at its Haswell kernels, numpy at its AVX2 loops; a value the
    user set wins."""
    code = (
        "from refusal_atlas.pipeline.numerics import pin_cpu_numerics; pin_cpu_numerics(); import os, torch; "
        "print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in CPU_NUMERICS and k != OPT_OUT}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["AVX2", "AVX2,STRICT"]
    # A value the user set wins, and it does reach torch: here the portable scalar kernels.
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "ATEN_CPU_CAPABILITY": "default"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["DEFAULT", "AVX2,STRICT"]
    late = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; from refusal_atlas.pipeline.numerics import pin_cpu_numerics; pin_cpu_numerics()",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert late.returncode != 0 and "must run before torch and numpy are imported" in late.stderr
    # numpy's OpenBLAS (and scipy's, which geometry uses through scikit-learn) run their Haswell (AVX2) kernels.
    code = (
        "from refusal_atlas.pipeline.numerics import pin_cpu_numerics; pin_cpu_numerics(); "
        "import numpy, scipy.linalg, threadpoolctl; "
        "print(sorted({i['architecture'] for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas'}))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
        == "['Haswell']"
    )
    # numpy's own loops (exp, log1p, tanh, sin, cos) run the AVX2 ones an AVX2-only host runs (X86_V3 is the most it
    # enables).
    code = (
        "import hashlib, numpy as np; x = np.linspace(-5, 5, 10001); print(hashlib.sha256(b''.join(f(a).tobytes() "
        "for f in (np.exp, np.log1p, np.tanh, np.sin, np.cos) for a in (x, x.astype(np.float32)))).hexdigest())"
    )

    def digest(pin: bool, extra: dict) -> str:
        prefix = "from refusal_atlas.pipeline.numerics import pin_cpu_numerics; pin_cpu_numerics(); " if pin else ""
        return subprocess.run(
            [sys.executable, "-W", "ignore", "-c", prefix + code],
            env={**env, **extra},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    pinned = digest(True, {})
    assert pinned == digest(False, {"NPY_ENABLE_CPU_FEATURES": "X86_V3"})
    if _has_avx512():
        assert pinned != digest(False, {}), (
            "numpy's AVX-512 loops gave the AVX2 bits: the check cannot tell the two apart here"
        )
    # The opt-out leaves the host's own kernels; a misspelt value stops with what to set.
    code = (
        "from refusal_atlas.pipeline.numerics import pin_cpu_numerics; pin_cpu_numerics(); "
        "import os; print(os.environ.get('ATEN_CPU_CAPABILITY'))"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], env={**env, OPT_OUT: "native"}, capture_output=True, text=True, check=True
        ).stdout.strip()
        == "None"
    )
    bad = subprocess.run([sys.executable, "-c", code], env={**env, OPT_OUT: "fast"}, capture_output=True, text=True)
    assert (
        bad.returncode != 0 and f"{OPT_OUT}='fast': expected 'portable'" in bad.stderr and "Traceback" not in bad.stderr
    )


def test_every_stage_pins_before_anything_else():
    for stage in sorted((REPO / "stages").glob("*.py")):
        body = [
            node
            for node in ast.parse(stage.read_text()).body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        ]
        assert [ast.unparse(node) for node in body[:2]] == [
            "from refusal_atlas.pipeline.numerics import pin_cpu_numerics",
            "pin_cpu_numerics()",
        ], stage.name


def _outs(repo, stages: list[str]) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {(stage, out["path"]): out.get("md5") for stage in stages for out in lock[stage]["outs"]}


@pytest.mark.slow
def test_stage_outputs_are_the_same_bytes_on_an_avx2_only_host(repo_copy, tmp_path):
    """baseline (generation and first-token scores) and activations (hooked forward passes, a Zarr store) on a
    tiny real chat model: this host as it is, then as an AVX2-only host, then on one thread; then, where this host
    has AVX-512 and the pins are lifted, the bytes change, which is what the pins are for."""
    model_dir = tmp_path / "qwen-tiny"
    tok = make_tokenizer("chatml")
    model = tiny_model("qwen2", vocab=len(tok), seed=0, scale=20.0)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    reduce_repo(repo_copy, ["humanizing", "benign"], {"humanizing": 24, "benign": 24})
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["prompts"]["min_per_category"] = 24
    params["model"].update(name=str(model_dir), max_prompt_tokens=240)
    params["baseline"]["max_new_tokens"] = 8
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = ["baseline", "activations"]
    if set(os.environ) & {*CPU_NUMERICS, OPT_OUT}:
        pytest.skip(
            f"the caller's environment sets {sorted(set(os.environ) & {*CPU_NUMERICS, OPT_OUT})}, which decide the "
            "kernels here"
        )
    run(["dvc", "repro", "activations"], repo_copy, timeout=600)
    here = _outs(repo_copy, stages)
    assert len(here) >= 3 and all(here.values())

    def rerun(env: dict) -> dict:
        for stage in stages:
            run(["dvc", "repro", "-f", "-s", stage], repo_copy, env=env, timeout=600)
        return _outs(repo_copy, stages)

    assert rerun(CPU_NUMERICS) == here  # an AVX2-only host chooses these kernels itself
    assert rerun({"OMP_NUM_THREADS": "1"}) == here  # a host with another core count: one thread instead of two
    if _has_avx512():
        native = {
            "ATEN_CPU_CAPABILITY": "avx512",
            "MKL_CBWR": "AUTO",
            "ONEDNN_MAX_CPU_ISA": "ALL",
            "OPENBLAS_CORETYPE": "SkylakeX",
        }
        changed = {k for k, v in rerun(native).items() if v != here[k]}
        assert changed, "without the pins this AVX-512 host should compute other bits"
