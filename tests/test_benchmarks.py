"""The benchmark scripts still run (their tiny presets): a broken benchmark is found here,
not on the GPU machine. Timings are not checked (CI has no GPU and shared cores)."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = ["lora", "dora", "lokr-default", "qlora-nf4", "lora-remat", "lora-mosaic", "quax", "full"]


def run_script(name, *args):
    """`python benchmarks/<name> args` on the CPU, one device as a user's run; the
    completed process (its exit status checked)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_step_tiny(tmp_path):
    out = tmp_path / "step.md"
    args = ["--preset", "tiny", "--rounds", "2", "--only", ",".join(ROWS), "--out", str(out)]
    run_script("step.py", *args)
    table = out.read_text()
    assert "failed to build" not in table, table
    ratios = re.findall(r"^\| (.+?) \| [\d,]+ \| [\d.]+ \| ([\d.]+) \|", table, re.M)
    assert len(ratios) == len(ROWS) + 1, table  # and the floor
    assert all(float(r) > 0 for _, r in ratios), table


@pytest.mark.parametrize(
    "method,path",
    [("lora", "factored"), ("dora", "factored"), ("loha", "factored"), ("lokr", "factored")]
    + [("lora", "merged"), ("lokr", "merged"), ("loha-tucker", "factored")]
    + [("lokr-tucker", "merged")],
)
def test_conv_step_tiny(method, path):
    method, _, tucker = method.partition("-")
    args = ["--method", method, "--conv-path", path, "--batch", "2", "--width", "8"]
    args += ["--size", "8", "--runs", "2", "--inner", "2"]
    if tucker:  # LoKr's `w2` (4 × 4 × 3 × 3 at 8 channels) is decomposed at rank 1
        args += ["--tucker", "--rank", "1"]
    run = run_script("conv_step.py", *args)
    assert re.search(rf"^{method} step  median +[\d.]+ ms$", run.stdout, re.M), run.stdout
    assert float(re.search(r"^ratio ([\d.]+)$", run.stdout, re.M).group(1)) > 0


def test_profile_tiny(tmp_path):
    out = tmp_path / "profile.md"
    args = ["--preset", "tiny", "--only", "lora,dora", "--steps", "2", "--out", str(out)]
    run_script("profile_step.py", *args)
    table = out.read_text()
    assert "| **wall** |" in table and "lora (rank 4)" in table and "dora (rank 4)" in table
    # Every contender's products were seen by the profiler.
    gemm = re.search(r"^\| GEMM[^|]*\|(.*)$", table, re.M).group(1)
    assert all(float(c.split()[0]) > 0 for c in gemm.split("|")[:3]), table


def test_fused_kernel_check():
    """The fused-kernel experiment's kernels, in Pallas's interpret mode, still equal
    XLA's products (the script exits non-zero otherwise)."""
    run = run_script("fused_kernel.py", "--check")
    assert "factor gradients, fused against XLA" in run.stdout


def test_fused_mosaic_check():
    """The Mosaic GPU kernel still lowers for CUDA (no GPU needed), and its custom_vjp
    layer equals the dense LoRA layer (the script exits non-zero otherwise)."""
    run = run_script("fused_mosaic.py", "--check")  # under the tracer-leak checker
    assert run.stdout.count("lowered for CUDA") == 2, run.stdout
    assert "gradients (x, a, b), custom_vjp against dense" in run.stdout


def test_matrix_tiny(tmp_path):
    """matrix.py over two structures: every contender builds, and each row has a ratio
    to the floor. The nnx and qwix rows run where flax and qwix import."""
    out = tmp_path / "matrix.md"
    only = ["lora", "quax", "handwritten"]
    if all(importlib.util.find_spec(m) for m in ("flax", "qwix")):
        only += ["nnx", "qwix"]
    structures = ["mlp-nobias", "embedding"]
    args = ["--preset", "tiny", "--rounds", "2", "--only", ",".join(only), "--out", str(out)]
    run_script("matrix.py", *args, "--structures", ",".join(structures))
    table = out.read_text()
    assert "failed to build" not in table, table
    # | label | trained | args | ms / step | × floor | ms / call | × floor | compile s |
    row = r"^\| (.+?) \| [\d,]+ \| \d+ \| [\d.]+ \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \| [\d.]+ \|"
    ratios = re.findall(row, table, re.M)
    assert len(ratios) == len(structures) * (len(only) + 1), table  # and the floors
    assert all(float(step) > 0 and float(call) > 0 for _, step, call in ratios), table
