"""Quantised base weights: bytes, output error, and one QLoRA training step.

    python benchmarks/quant.py [--rounds 20] [--out FILE]

1. A 2048x8192 bfloat16 weight: bytes of NF4 (with and without double quantisation)
   and int8 against bfloat16, and the relative error of `x @ w.T` (float32) for a
   random input batch against the unquantised weight.
2. One LoRA training step (value_and_grad wrt the factors + SGD) on 4 residual blocks
   512->2048->512, batch 512, rank 8, float32, with NF4 / int8 / float32 bases, against
   the floor: forward + input gradient of the plain model (`jax.vjp` wrt the input).
   Variants are timed interleaved; median of `--rounds`.
Writes the table to `--out` (default benchmarks/results/quant_cpu.md).
"""

import argparse
import datetime
import pathlib
import platform
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import quax


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout
import step  # noqa: E402  (this directory's step.py: its timer)

import lora_jax as lora  # noqa: E402


def weight_table(key):
    kw, kx = jr.split(key)
    w = (jr.normal(kw, (2048, 8192), jnp.float32) * 0.02).astype(jnp.bfloat16)
    x = jr.normal(kx, (64, 8192), jnp.float32)
    ref = x @ w.astype(jnp.float32).T
    bf16_bytes = w.size * w.dtype.itemsize
    rows = [("bf16", bf16_bytes, 1.0, 0.0)]
    variants = [
        ("int8", lora.Int8Array.from_array(w)),
        ("nf4", lora.NF4Array.from_array(w)),
        ("nf4 + double quant", lora.NF4Array.from_array(w, double_quant=True)),
    ]
    for name, q in variants:
        y = jax.jit(quax.quaxify(lambda q, x: x @ q.astype(jnp.float32).T))(q, x)
        err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
        rows.append((name, q.nbytes, q.nbytes / bf16_bytes, err))
    return rows


class Block(eqx.Module):
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.up = eqx.nn.Linear(512, 2048, key=k1)
        self.down = eqx.nn.Linear(2048, 512, key=k2)

    def __call__(self, h):
        return h + self.down(jax.nn.relu(self.up(h)))


class Stack(eqx.Module):
    blocks: list

    def __call__(self, h):
        for b in self.blocks:
            h = b(h)
        return h


def step_table(key, rounds):
    kb, kx, ky, kl = jr.split(key, 4)
    model = Stack([Block(k) for k in jr.split(kb, 4)])
    x = jr.normal(kx, (512, 512))
    y = jr.normal(ky, (512, 512))

    @jax.jit
    def floor(model, x):
        out, vjp = jax.vjp(lambda x: jax.vmap(model)(x), x)
        return out, vjp(out - y)[0]

    def make_step(adapted):
        params, frozen = lora.partition(adapted)

        def loss(params, frozen, x):
            m = eqx.combine(params, frozen)
            pred = quax.quaxify(lambda m, x: jax.vmap(m)(x))(m, x)
            return jnp.mean((pred - y) ** 2)

        @jax.jit
        def step(params, frozen, x):
            value, grads = jax.value_and_grad(loss)(params, frozen, x)
            params = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
            return params, value

        return lambda: step(params, frozen, x)

    variants = {"plain floor (fwd + vjp wrt x)": lambda: floor(model, x)}
    variants["LoRA, float32 base"] = make_step(lora.loraify(model, rank=8, key=kl))
    for method in ("int8", "nf4"):
        q = lora.quantise(model, method=method)
        variants[f"LoRA, {method} base"] = make_step(lora.loraify(q, rank=8, key=kl))
    times = step.median_times(variants, rounds, warmup=1)  # the warm-up compiles
    floor_t = times["plain floor (fwd + vjp wrt x)"]
    return [(n, t, t / floor_t) for n, t in times.items()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    default_out = pathlib.Path(__file__).parent / "results" / "quant_cpu.md"
    parser.add_argument("--out", default=str(default_out), help="markdown file")
    args = parser.parse_args()
    device = jax.devices()[0]
    key = jr.key(0)
    lines = [
        f"# Quantised base weights on {device.platform.upper()} "
        f"({datetime.date.today().isoformat()})",
        "",
        f"processor: `{platform.processor() or platform.machine()}`, jax {jax.__version__}, "
        f"devices: {device.device_kind} x{len(jax.devices())}",
        "",
        "## A 2048x8192 bfloat16 weight",
        "",
        "| format | bytes | vs bf16 | rel. error of x @ w.T |",
        "|---|---:|---:|---:|",
    ]
    for name, nbytes, ratio, err in weight_table(key):
        lines.append(f"| {name} | {nbytes:,} | {ratio:.3f} | {err:.2e} |")
    lines += [
        "",
        "## One LoRA step: 4 residual blocks 512->2048->512, batch 512, rank 8, float32",
        "",
        f"Median of {args.rounds}, interleaved.",
        "",
        "| variant | ms | vs floor |",
        "|---|---:|---:|",
    ]
    for name, t, ratio in step_table(key, args.rounds):
        lines.append(f"| {name} | {t * 1e3:.1f} | {ratio:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
