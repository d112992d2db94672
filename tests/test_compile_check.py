"""The Triton kernels compile for sm_90 (H100/H200), checked on this machine without a GPU
(bench/compile_check.py). The interpreter that runs them elsewhere in the suite checks what they
compute; only the GPU compiler checks that they build."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def _run(*args, interpret=False, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _jit_kernels():
    """Names of the @triton.jit functions that are launched (``*_kernel``) in kernels/."""
    names = set()
    for path in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    proc = _run("-m", "fastcore.bench.compile_check", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    assert {r["kernel"] for r in rows} == _jit_kernels(), "a kernel in kernels/ is missing from the check"
    for r in rows:
        assert 0 <= r["shared_bytes"] <= 227 * 1024 and r["num_warps"] in (1, 2, 4, 8, 16), r
        assert r["registers"] is None or 16 <= r["registers"] <= 255, r
    # The configs the launchers pick on a GPU, not the interpreter's small blocks.
    fwd128 = next(r for r in rows if r["kernel"] == "_attn_fwd_kernel" and r["case"].startswith("attention D=128"))
    assert (fwd128["num_warps"], fwd128["num_stages"]) == (8, 3) and fwd128["shared_bytes"] >= 64 * 1024
    assert "kernels compiled, 0 failed" in proc.stdout


def test_a_kernel_that_does_not_compile_is_reported():
    """A config the interpreter would run (a 24-row block) fails in the GPU compiler, and so here."""
    code = """
import sys
from fastcore.bench import compile_check as c
from fastcore.kernels import attention as kernels
import torch

def bad():
    q = torch.randn(1, 1, 32, 16, dtype=torch.bfloat16)
    with kernels.block_configs(fwd=(24, 16, 4, 1)):
        kernels.attention_fwd(q, q, q, False, 0.25)

rows = c.check([("bad block", bad)], 90, log=print)
assert len(rows) == 1 and rows[0]["kernel"] == "_attn_fwd_kernel", rows
assert "arange" in rows[0]["error"] or "power of 2" in rows[0]["error"], rows
"""
    proc = _run("-c", code, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" in proc.stdout


def test_refuses_to_run_under_the_interpreter():
    proc = _run("-m", "fastcore.bench.compile_check", interpret=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
