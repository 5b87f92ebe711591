"""Each example runs in its quick mode, exits 0 and writes its figure."""

import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).parent.parent
OUT = ROOT / "examples" / "out"

# (script, figure it writes). Each takes about a minute on a loaded 2-core CPU.
EXAMPLES = [
    ("image_transfer.py", "image_transfer.png"),
    ("char_transformer.py", "char_transformer.png"),
    ("convnext_lora.py", "convnext_lora.png"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script, figure", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_quick(script, figure):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    png = OUT / figure
    if png.exists():
        png.unlink()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.pop("JAX_CHECK_TRACER_LEAKS", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert png.exists() and png.stat().st_size > 0
