"""lora_jax's fused LoRA product for Hopper GPUs (`LoraArray(..., kernel="mosaic")`,
in lora_jax/_mosaic.py), measured: one Mosaic GPU kernel (Pallas, wgmma) computes
`x·w′ + h·at`, the large product pipelined through shared memory and the
low-rank term `h·at` (h = s·x·bᵀ, computed by XLA, rows × rank) added to the
accumulator by one more wgmma before the store. The activation-sized expansion
`h·aᵀ` is never written, nor read back for the add.

The same kernel serves the forward (w′ = wᵀ, w stored out × in, transposed in shared
memory) and the input gradient (`g·w + (s·g·a)·b`, w as stored). Around it, a
`custom_vjp` linear layer: the factor gradients `gᵀ·h` and `(s·g·a)ᵀ·x` stay XLA's thin
products. Mosaic's bf16 wgmma contracts in multiples of 64, so the rank is zero-padded
to 64 inside the kernel's low-rank term (a few per cent of the large product's work at
these shapes).

Timed alone and in the GPU preset's step (8 blocks 2048→8192→2048, 8192 tokens, bf16,
rank 16, AdamW on the factors; the blocks as in `step.py`, written in plain JAX) against
the floor and the same step in plain XLA.

Results in benchmarks/results/fused_mosaic_h100.md; `step.py`'s lora-mosaic row
measures the same kernel through lora_jax's rules.

    python benchmarks/fused_mosaic.py --check   # any machine: lowers the kernel for
                                                # CUDA, checks the custom_vjp's algebra
    python benchmarks/fused_mosaic.py           # on a Hopper GPU: kernels and the step
"""

import argparse
import functools
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax import lax


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout
import step as step_bench  # noqa: E402  (this directory's step.py: its timer)

from lora_jax import _mosaic  # noqa: E402
from lora_jax._mosaic import PAD, lora_matmul, reference_matmul  # noqa: E402


S = 2.0  # the adapter's scaling
CONFIGS = [  # rows per warpgroup (two per block), columns, contraction, pipeline stages
    dict(tile_m=128, tile_n=128, tile_k=64, stages=3),
    dict(tile_m=64, tile_n=128, tile_k=64, stages=4),
    dict(tile_m=64, tile_n=128, tile_k=64, stages=5),
]


def fused_linear(x, w, a, b):
    """y = x·wᵀ + S·(x·bᵀ)·aᵀ, w frozen: lora_jax's `custom_vjp` layer, whose forward
    and input gradient are each one `lora_matmul`."""
    return _mosaic.fused_linear(x, lax.stop_gradient(w), a, b, jnp.float32(S))


def xla_linear(x, w, a, b):
    w = lax.stop_gradient(w)
    return x @ w.T + (S * (x @ b.T)) @ a.T


def rel_err(got, ref):
    got, ref = got.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


def check():
    """No GPU needed: the kernel lowers for CUDA in both orientations, and the
    custom_vjp (with the kernel replaced by its plain-JAX statement) equals the dense
    LoRA layer's forward and gradients."""
    sds = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    for transposed, w in ((True, sds((384, 192), bf)), (False, sds((192, 384), bf))):
        kernel = functools.partial(lora_matmul, w_transposed=transposed, sms=132)
        args = (sds((512, 192), bf), w, sds((512, PAD), bf), sds((PAD, 384), bf))
        text = jax.jit(kernel).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        calls = sorted(set(re.findall(r"custom_call @(\w+)", text)))
        print(f"lowered for CUDA, w {'transposed' if transposed else 'as stored'}: {calls}")
        assert any(c.startswith("mosaic_gpu") for c in calls), calls
    keys = jr.split(jr.key(0), 5)
    x = jr.normal(keys[0], (64, 48))
    w = jr.normal(keys[1], (80, 48))
    a = jr.normal(keys[2], (80, 4))
    b = jr.normal(keys[3], (4, 48))
    _mosaic.lora_matmul = reference_matmul  # the kernel, stated plainly
    fused = fused_linear

    def loss(linear):
        return lambda x, a, b: jnp.sum(jnp.sin(linear(x, w, a, b)))

    forward_err = rel_err(fused(x, w, a, b), xla_linear(x, w, a, b))
    print(f"forward, custom_vjp against dense: {forward_err:.1e}")
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(x, a, b)
    ref = jax.grad(loss(xla_linear), argnums=(0, 1, 2))(x, a, b)
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    print("gradients (x, a, b), custom_vjp against dense: " + ", ".join(f"{e:.1e}" for e in errs))
    # The gradients go through sin' of outputs up to ~160 in size: a float32 rounding
    # of the forward (another summation order) moves them by ~1e-5 of their largest.
    assert max(errs) < 1e-4 and forward_err < 1e-5


def bench(f, args, n=20, reps=7):
    f = jax.jit(f)
    out = jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times), out


def kernels(r=16):
    print("| product (m=8192) | form | µs | vs x·wᵀ alone | rel. error |")
    print("|---|---|---:|---:|---:|")
    keys = jr.split(jr.key(0), 4)
    for k, n in ((2048, 8192), (8192, 2048)):
        x = jr.normal(keys[0], (8192, k), jnp.bfloat16)
        w = (jr.normal(keys[1], (n, k)) * k**-0.5).astype(jnp.bfloat16)
        h = jnp.pad(jr.normal(keys[2], (8192, r), jnp.bfloat16), ((0, 0), (0, PAD - r)))
        at = _mosaic.pad_rows((jr.normal(keys[3], (r, n)) * 0.1).astype(jnp.bfloat16))
        name = f"{k}→{n}"
        t0, _ = bench(lambda x, w: x @ w.T, (x, w))
        ref = reference_matmul(
            x.astype(jnp.float32), w.astype(jnp.float32), h, at, w_transposed=True
        )
        t1, y = bench(lambda x, w, h, at: x @ w.T + h @ at, (x, w, h[:, :r], at[:r]))
        print(f"| {name} | XLA x·wᵀ | {t0:.1f} | 1.000 | |")
        print(f"| {name} | XLA x·wᵀ + h·at | {t1:.1f} | {t1 / t0:.3f} | {rel_err(y, ref):.1e} |")
        for cfg in CONFIGS:
            for transposed in (True, False):
                wa = w if transposed else jnp.asarray(w.T)
                label = "fused, w transposed" if transposed else "fused, w as stored"
                tag = f"{label} {cfg['tile_m']}x2·{cfg['tile_n']}, {cfg['stages']} stages"
                try:
                    f = functools.partial(lora_matmul, w_transposed=transposed, **cfg)
                    t, y = bench(f, (x, wa, h, at))
                    print(f"| {name} | {tag} | {t:.1f} | {t / t0:.3f} | {rel_err(y, ref):.1e} |")
                except Exception as e:  # a config that does not fit shared memory
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    print(f"| {name} | {tag} | {why} | | |")
        sys.stdout.flush()


def step(blocks=8, d=2048, hidden=8192, tokens=8192, r=16, rounds=30):
    bf = jnp.bfloat16
    keys = iter(jr.split(jr.key(1), 6 * blocks))

    def normal(shape, scale):
        return (jr.normal(next(keys), shape) * scale).astype(bf)

    ws = [(normal((hidden, d), d**-0.5), normal((d, hidden), hidden**-0.5)) for _ in range(blocks)]
    # a is nonzero (PEFT starts it at zero) so that the low-rank term counts.
    fs = [
        (normal((hidden, r), 0.02), normal((r, d), d**-0.5))
        + (normal((d, r), 0.02), normal((r, hidden), hidden**-0.5))
        for _ in range(blocks)
    ]
    x = jr.normal(jr.key(2), (tokens, d), bf)

    def loss(linear, ws, fs, x):
        for (wu, wd), (au, bu, ad, bd) in zip(ws, fs):
            x = x + linear(jax.nn.gelu(linear(x, wu, au, bu)), wd, ad, bd)
        return jnp.mean(x.astype(jnp.float32) ** 2)

    fused = fused_linear
    got = jax.jit(jax.grad(functools.partial(loss, fused), argnums=(1, 2)))(ws, fs, x)
    ref = jax.jit(jax.grad(functools.partial(loss, xla_linear), argnums=(1, 2)))(ws, fs, x)
    gf = rel_err(
        jnp.concatenate([g.ravel() for g in jax.tree.leaves(got[0])]),
        jnp.concatenate([g.ravel() for g in jax.tree.leaves(ref[0])]),
    )
    print(f"\nfactor gradients, fused against XLA (bf16 both): max rel. error {gf:.1e}")
    del got, ref

    opt = optax.adamw(1e-4)

    def make_step(linear):
        def train(fs, state, ws, x):
            g = jax.grad(lambda fs: loss(linear, ws, fs, x))(fs)
            updates, state = opt.update(g, state, fs)
            return optax.apply_updates(fs, updates), state

        f = jax.jit(train, donate_argnums=(0, 1))
        carry = [jax.tree.map(jnp.copy, fs)]
        carry.append(opt.init(carry[0]))

        def call():
            carry[0], carry[1] = f(carry[0], carry[1], ws, x)
            return carry[0]

        return call

    def plain(x, w, a, b):
        return x @ w.T

    floor = jax.jit(jax.grad(lambda x: loss(plain, ws, fs, x)))
    contenders = {
        "floor (forward + input gradient)": lambda: floor(x),
        "LoRA step, XLA": make_step(xla_linear),
        "LoRA step, fused Mosaic kernel": make_step(fused),
    }
    times = step_bench.median_times(contenders, rounds, warmup=3)
    base = times["floor (forward + input gradient)"]
    print("\n| step (gpu preset) | ms | × floor |")
    print("|---|---:|---:|")
    for name in contenders:
        t = times[name]
        print(f"| {name} | {t * 1e3:.2f} | {t / base:.3f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="lower for CUDA, check the algebra")
    p.add_argument("--only", choices=("kernels", "step"), help="one part of the GPU run")
    args = p.parse_args()
    if args.check:
        check()
    else:
        print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
        if args.only in (None, "kernels"):
            kernels()
        if args.only in (None, "step"):
            step()
