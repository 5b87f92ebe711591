"""Where an adapter training step's time goes, kernel by kernel, against the floor.

Builds the same steps as `step.py` (its shapes, its floor, its method rows), warms each
up, times it, then records a few steps with `jax.profiler` and sums the device's
kernels by kind:

- GEMM: kernels XLA hands to cuBLAS on a GPU (the large products); on a CPU, every
  product;
- Triton GEMM fusion: products XLA compiles itself (on a GPU, the adapters' thin
  products land here, with whatever elementwise work XLA fused into them);
- elementwise / reduction: XLA's other fusions (activations, adds, scaling, optimiser);
- memset / memcpy;
- gaps: the step's wall time (steps run back to back) minus the sum of its kernels:
  the device idle between kernels.

On a GPU the kernels of one step run one after another on one stream, so the sums are
exclusive and add up to the wall time with the gaps. On a CPU XLA runs independent
thunks at once on its threads: the per-kind sums overlap and only the wall time is
exclusive; the table says so.

    python benchmarks/profile_step.py --preset tiny
    python benchmarks/profile_step.py --preset gpu --only lora,dora --out profile.md
"""

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import jax.random as jr
import optax


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import step  # noqa: E402  (this directory's step.py: the models and the steps)

import lora_jax as lora  # noqa: E402


KINDS = (
    "GEMM: cuBLAS, or any CPU product",
    "Triton GEMM fusion",
    "elementwise / reduction",
    "memset / memcpy",
)
ROWS = (
    "lora",
    "lora-mosaic",
    "dora",
    "dora-mosaic",
    "lokr",
    "lokr-mosaic",
    "loha",
    "loha-mosaic",
    "lokr-default",
)


def kind(name: str) -> str:
    low = name.lower()
    if low.startswith(("memset", "memcpy")):
        return "memset / memcpy"
    if low.startswith(("gemm_fusion", "triton_gemm")):
        return "Triton GEMM fusion"
    if low.startswith(("ynn_fusion", "dot", "convolution")):  # XLA:CPU's products
        return "GEMM: cuBLAS, or any CPU product"
    xla_prefixes = ("loop_", "input_", "wrapped_", "fusion", "copy", "transpose", "reduce")
    if low.startswith(xla_prefixes) or "_fusion" in low:
        return "elementwise / reduction"
    # cuBLAS and cuDNN kernels carry the library's own names.
    return "GEMM: cuBLAS, or any CPU product"


def build(preset: str, rows):
    cfg = step.PRESETS[preset]
    dtype = jnp.dtype(cfg["dtype"])
    keys = jr.split(jr.key(0), cfg["blocks"] + 2)
    model = step.Net([step.Block(cfg["d"], cfg["hidden"], dtype, k) for k in keys[:-2]])
    x = jr.normal(keys[-1], (cfg["tokens"], cfg["d"]), dtype)
    opt = optax.adamw(1e-4)
    out = {"floor": ("JAX floor (fwd + input grad)", step.jax_floor(model, x))}
    for row, (method, rank, options) in step.method_configs(cfg["rank"]).items():
        # `-mosaic`: the fused kernel (on a Hopper GPU; elsewhere XLA's path).
        for name, kernel in ((row, {}), (f"{row}-mosaic", {"kernel": "mosaic"})):
            if name not in rows:
                continue
            adapted = lora.loraify(
                model, rank=rank, alpha=2.0 * rank, method=method, key=keys[-2], **options, **kernel
            )
            label = f"{method} (rank {rank})" + (" default split" if row == "lokr-default" else "")
            label += ", kernel='mosaic'" if kernel else ""
            out[name] = (label, step.jax_adapter_step(adapted, x, opt, lora.partition))
    return out


def kernel_times(contender, steps: int):
    """{kernel name: (seconds per step, launches per step)} and whether they came from
    a GPU (exclusive) or from the CPU's thunks (overlapping)."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            contender.sync(contender())
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = [e for e in events if e.get("ph") == "X" and "/device:" in names.get(e["pid"], "")]
    gpu = any(("GPU" in names[e["pid"]]) for e in device)
    if not gpu:  # XLA:CPU: the thunks, as the host threads ran them
        skip = ("ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "ParseArguments", "$")
        device = [
            e
            for e in events
            if e.get("ph") == "X"
            and e["name"].endswith(tuple("0123456789") + ("fusion",))
            and not e["name"].startswith(skip)
        ]
    total, count = collections.Counter(), collections.Counter()
    for e in device:
        total[e["name"]] += e["dur"] * 1e-6 / steps
        count[e["name"]] += 1
    return {n: (t, count[n] / steps) for n, t in total.items()}, gpu


def wall(contender, steps: int) -> float:
    """Seconds per step, `steps` steps run back to back as a training loop runs them
    (`step.step_times`), the median of 5 such runs."""
    return step.step_times({"c": contender}, 5, steps)[0]["c"]


def main(preset, rows, steps, top):
    contenders = build(preset, rows)
    results = {}
    for name, (label, c) in contenders.items():
        for _ in range(3):
            c.sync(c())
        kernels, gpu = kernel_times(c, steps)
        results[name] = (label, wall(c, 2 * steps), kernels)
        print(f"profiled {name}", flush=True)
    ms = lambda s: f"{s * 1e3:.2f}"
    floor_wall, floor_kernels = results["floor"][1], results["floor"][2]

    def by_kind(kernels):
        sums = collections.Counter()
        for n, (t, _) in kernels.items():
            sums[kind(n)] += t
        return sums

    sums = {name: by_kind(k) for name, (_, _, k) in results.items()}
    lines = [
        f"# Where a training step's time goes ({preset} preset)",
        "",
        f"- date: {datetime.date.today()}; device: {jax.devices()[0].device_kind}; "
        f"jax {jax.__version__}; lora_jax at {step.git_commit()}",
        f"- shapes and rows as `benchmarks/step.py --preset {preset}`; kernels summed over "
        f"{steps} profiled steps (`jax.profiler`); wall time per step with {2 * steps} "
        "steps run back to back (the median of 5 such runs); ms per step",
        "- "
        + (
            "GPU: one stream, so the kinds are exclusive; gaps = wall − kernels."
            if gpu
            else "CPU: XLA runs independent thunks at once, so the kinds overlap and "
            "their sum can exceed the wall time; only the wall column is exclusive."
        ),
        "",
        "| kind | " + " | ".join(results[n][0] for n in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for k in KINDS:
        cells = []
        for n in results:
            s = sums[n][k]
            d = s - sums["floor"][k]
            cells.append(ms(s) + ("" if n == "floor" else f" ({d * 1e3:+.2f})"))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    cells = []
    for n, (_, w, k) in results.items():
        g = w - sum(t for t, _ in k.values())
        g0 = floor_wall - sum(t for t, _ in floor_kernels.values())
        cells.append(ms(g) + ("" if n == "floor" else f" ({(g - g0) * 1e3:+.2f})"))
    lines.append("| gaps (wall − kernels) | " + " | ".join(cells) + " |")
    cells = [
        ms(w) + ("" if n == "floor" else f" ({w / floor_wall:.3f}×)")
        for n, (_, w, _) in results.items()
    ]
    lines.append("| **wall** | " + " | ".join(cells) + " |")
    lines.append(
        "| kernels per step | "
        + " | ".join(f"{sum(c for _, c in k.values()):.0f}" for _, _, k in results.values())
        + " |"
    )
    for n, (label, _, kernels) in results.items():
        lines += ["", f"## {label}: the {top} longest kernels", ""]
        lines += ["| kernel | kind | launches / step | ms / step |", "|---|---|---:|---:|"]
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
        for name, (t, c) in ranked:
            lines.append(f"| `{name[:60]}` | {kind(name)} | {c:.0f} | {ms(t)} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=step.PRESETS, default="cpu")
    p.add_argument("--only", default="lora,dora", help=f"comma-separated rows of {ROWS}")
    p.add_argument("--steps", type=int, default=10, help="profiled steps per contender")
    p.add_argument("--top", type=int, default=12, help="kernels listed per contender")
    p.add_argument("--out", default=None, help="write the tables to this markdown file")
    args = p.parse_args()
    rows = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in rows if s not in ROWS]
    if bad:
        p.error(f"--only: unknown rows {bad}; choose from {', '.join(ROWS)}")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    table = main(args.preset, rows, args.steps, args.top)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
