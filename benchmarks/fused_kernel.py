"""A fused LoRA kernel, measured: Pallas (Triton) kernels that compute a linear layer's
forward `x·wᵀ + s·(x·bᵀ)·aᵀ` and its input gradient `g·w + s·(g·a)·b` in one pass each,
the thin products accumulated alongside the large one so that no activation-sized
expansion is written and `x` (or `g`) is read once, against XLA's unfused form.

Timed alone and in the GPU preset's step (8 blocks 2048→8192→2048, 8192 tokens, bf16,
rank 16, AdamW on the factors; the blocks as in `step.py`, written in plain JAX).

An experiment, not part of lora_jax: on an H100 these kernels ran slower than XLA's
unfused products (benchmarks/results/fused_kernel_h100.md), so the rules keep XLA's.

    python benchmarks/fused_kernel.py --check   # interpret mode on the CPU: numerics only
    python benchmarks/fused_kernel.py           # on a GPU: kernels and the step, timed
"""

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import step  # this directory's step.py: its timer
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


S = 2.0  # the adapter's scaling
CONFIGS = [  # tile sizes (rows, columns, contraction), warps and pipeline stages
    dict(bm=128, bn=128, bk=64, warps=8, stages=3),
    dict(bm=128, bn=256, bk=64, warps=8, stages=3),
    dict(bm=128, bn=256, bk=64, warps=8, stages=4),
    dict(bm=256, bn=128, bk=64, warps=8, stages=4),
]


def _dot(a, b, trans_b=False, *, interpret):
    if interpret:
        return jnp.dot(a, b.T if trans_b else b, preferred_element_type=jnp.float32)
    return plt.dot(a, b, trans_b=trans_b)


def _forward_kernel(x_ref, w_ref, b_ref, a_ref, y_ref, u_ref, *, bk, interpret):
    """y = x·wᵀ + s·(x·bᵀ)·aᵀ for one (bm, bn) tile; u = x·bᵀ for the backward."""
    dot = functools.partial(_dot, interpret=interpret)
    bm, bn = y_ref.shape

    def step(k, carry):
        acc, u = carry
        x = x_ref[:, pl.ds(k * bk, bk)]
        acc = acc + dot(x, w_ref[:, pl.ds(k * bk, bk)], trans_b=True)
        return acc, u + dot(x, b_ref[:, pl.ds(k * bk, bk)], trans_b=True)

    zeros = (jnp.zeros((bm, bn), jnp.float32), jnp.zeros((bm, b_ref.shape[0]), jnp.float32))
    acc, u = lax.fori_loop(0, x_ref.shape[1] // bk, step, zeros)
    u = u.astype(y_ref.dtype)
    su = (u.astype(jnp.float32) * S).astype(y_ref.dtype)
    y_ref[...] = (acc + dot(su, a_ref[...], trans_b=True)).astype(y_ref.dtype)

    @pl.when(pl.program_id(1) == 0)
    def _():
        u_ref[...] = u


def _input_grad_kernel(g_ref, w_ref, a_ref, b_ref, gx_ref, ga_ref, *, bk, interpret):
    """gx = g·w + s·(g·a)·b for one tile; ga = g·a for `b`'s gradient."""
    dot = functools.partial(_dot, interpret=interpret)
    bm, bn = gx_ref.shape

    def step(k, carry):
        acc, ga = carry
        g = g_ref[:, pl.ds(k * bk, bk)]
        acc = acc + dot(g, w_ref[pl.ds(k * bk, bk), :])
        return acc, ga + dot(g, a_ref[pl.ds(k * bk, bk), :])

    zeros = (jnp.zeros((bm, bn), jnp.float32), jnp.zeros((bm, a_ref.shape[1]), jnp.float32))
    acc, ga = lax.fori_loop(0, g_ref.shape[1] // bk, step, zeros)
    ga = ga.astype(gx_ref.dtype)
    sga = (ga.astype(jnp.float32) * S).astype(gx_ref.dtype)
    gx_ref[...] = (acc + dot(sga, b_ref[...])).astype(gx_ref.dtype)

    @pl.when(pl.program_id(1) == 0)
    def _():
        ga_ref[...] = ga


def _call(kernel, operands, in_blocks, out_n, r, c, interpret):
    """Both kernels: a grid of (bm, bn) output tiles; outputs (M, out_n) and (M, r)."""
    lead = operands[0].shape[0]
    bm, bn = c["bm"], c["bn"]
    specs = [pl.BlockSpec(shape, index) for shape, index in in_blocks]
    return pl.pallas_call(
        functools.partial(kernel, bk=c["bk"], interpret=interpret),
        out_shape=(
            jax.ShapeDtypeStruct((lead, out_n), operands[0].dtype),
            jax.ShapeDtypeStruct((lead, r), operands[0].dtype),
        ),
        grid=(lead // bm, out_n // bn),
        in_specs=specs,
        out_specs=(
            pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            pl.BlockSpec((bm, r), lambda i, j: (i, 0)),
        ),
        interpret=interpret,
        compiler_params=None
        if interpret
        else plt.CompilerParams(num_warps=c["warps"], num_stages=c["stages"]),
    )(*operands)


def fused_forward(x, w, b, a, c, interpret=False):
    """(x·wᵀ + s·(x·bᵀ)·aᵀ, x·bᵀ) for x (M, K), w (N, K), b (r, K), a (N, r)."""
    k, n, r = x.shape[1], w.shape[0], b.shape[0]
    blocks = [
        ((c["bm"], k), lambda i, j: (i, 0)),
        ((c["bn"], k), lambda i, j: (j, 0)),
        ((r, k), lambda i, j: (0, 0)),
        ((c["bn"], r), lambda i, j: (j, 0)),
    ]
    return _call(_forward_kernel, (x, w, b, a), blocks, n, r, c, interpret)


def fused_input_grad(g, w, a, b, c, interpret=False):
    """(g·w + s·(g·a)·b, g·a) for g (M, N), w (N, K), a (N, r), b (r, K)."""
    n, k, r = g.shape[1], w.shape[1], a.shape[1]
    blocks = [
        ((c["bm"], n), lambda i, j: (i, 0)),
        ((n, c["bn"]), lambda i, j: (0, j)),
        ((n, r), lambda i, j: (0, 0)),
        ((r, c["bn"]), lambda i, j: (0, j)),
    ]
    return _call(_input_grad_kernel, (g, w, a, b), blocks, k, r, c, interpret)


def mm(x, w):
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())))


def xla_linear(x, w, a, b):
    return mm(x, w) + S * mm(mm(x, b), a)


def make_fused_linear(pick, interpret):
    """The fused kernels as a linear layer with its gradient (`pick`: tile config per
    (kernel, weight shape))."""

    @jax.custom_vjp
    def linear(x, w, a, b):
        return fused_forward(x, w, b, a, pick[("forward", w.shape)], interpret)[0]

    def forward(x, w, a, b):
        y, u = fused_forward(x, w, b, a, pick[("forward", w.shape)], interpret)
        return y, (x, w, a, b, u)

    def backward(res, g):
        x, w, a, b, u = res
        gx, ga = fused_input_grad(g, w, a, b, pick[("input grad", w.shape)], interpret)
        da = S * lax.dot_general(g, u, (((0,), (0,)), ((), ())))
        db = S * lax.dot_general(ga, x, (((0,), (0,)), ((), ())))
        return gx, jnp.zeros_like(w), da.astype(a.dtype), db.astype(b.dtype)

    linear.defvjp(forward, backward)
    return linear


def bench(f, args, n=20):
    for _ in range(3):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rel_err(got, ref):
    got, ref = got.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


def main(check):
    blocks, d, hidden, tokens, r = (2, 128, 256, 256, 16) if check else (8, 2048, 8192, 8192, 16)
    dt = jnp.bfloat16
    configs = CONFIGS[:1] if check else CONFIGS
    pick, failures = {}, []
    for name, (m, k, n) in {"up": (tokens, d, hidden), "down": (tokens, hidden, d)}.items():
        ks = jr.split(jr.key(1), 5)
        x = jr.normal(ks[0], (m, k), dt)
        w = (jr.normal(ks[1], (n, k)) * k**-0.5).astype(dt)
        a = (jr.normal(ks[2], (n, r)) * 0.1).astype(dt)
        b = (jr.normal(ks[3], (r, k)) * k**-0.5).astype(dt)
        g = jr.normal(ks[4], (m, n), dt)
        xla_input_grad = lambda g, w, a, b: g @ w + S * (g @ a) @ b
        cases = {
            "forward": (fused_forward, (x, w, b, a), xla_linear(x, w, a, b)),
            "input grad": (fused_input_grad, (g, w, a, b), xla_input_grad(g, w, a, b)),
        }
        for kind, (fn, args, ref) in cases.items():
            timed = []
            for c in configs:
                f = jax.jit(functools.partial(fn, c=c, interpret=check))
                err = rel_err(f(*args)[0], ref)
                if err > 2e-2:
                    failures.append(f"{name} {kind} {c}: relative error {err:.3g}")
                t = 0.0 if check else bench(f, args)
                timed.append((t, c))
                print(f"{name} {kind} {c}: {t * 1e6:8.1f} us, relative error {err:.2g}")
            pick[(kind, w.shape)] = min(timed, key=lambda tc: tc[0])[1]
        if not check:
            xf = bench(jax.jit(xla_linear), (x, w, a, b))
            xb = bench(jax.jit(xla_input_grad), (g, w, a, b))
            alone = bench(jax.jit(mm), (x, w))
            print(
                f"{name} XLA forward {xf * 1e6:8.1f} us, XLA input grad {xb * 1e6:8.1f} us, "
                f"x·wᵀ alone {alone * 1e6:8.1f} us"
            )

    fused_linear = make_fused_linear(pick, check)

    def loss(linear, ws, fs, x):
        for (wu, wd), (au, bu, ad, bd) in zip(ws, fs):
            h = jax.nn.gelu(linear(x, lax.stop_gradient(wu), au, bu))
            x = x + linear(h, lax.stop_gradient(wd), ad, bd)
        return jnp.mean(x.astype(jnp.float32) ** 2)

    key = jr.key(0)
    ws, fs = [], []
    for _ in range(blocks):
        k1, k2, k3, k4, k5, k6, key = jr.split(key, 7)
        normal = lambda k, shape, scale: (jr.normal(k, shape) * scale).astype(dt)
        ws.append((normal(k1, (hidden, d), d**-0.5), normal(k2, (d, hidden), hidden**-0.5)))
        fs.append(
            (
                normal(k3, (hidden, r), 0.01),
                normal(k4, (r, d), d**-0.5),
                normal(k5, (d, r), 0.01),
                normal(k6, (r, hidden), hidden**-0.5),
            )
        )
    x = jr.normal(key, (tokens, d), dt)
    ref = jax.grad(lambda f: loss(xla_linear, ws, f, x))(fs)
    got = jax.grad(lambda f: loss(fused_linear, ws, f, x))(fs)
    err = max(rel_err(p, q) for p, q in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    print(f"factor gradients, fused against XLA: relative error {err:.3g}")
    if err > 5e-2:
        failures.append(f"factor gradients: relative error {err:.3g}")
    if check:
        return failures

    opt = optax.adamw(1e-4)
    plain = lambda x, w, a, b: mm(x, w)
    floor = jax.jit(lambda ws, x: jax.grad(lambda x: loss(plain, ws, fs, x))(x))

    def make_step(linear):
        def step(fs, state, ws, x):
            g = jax.grad(lambda f: loss(linear, ws, f, x))(fs)
            updates, state = opt.update(g, state, fs)
            return optax.apply_updates(fs, updates), state

        return jax.jit(step, donate_argnums=(0, 1))

    runs = {"floor": (floor, [ws, x], False)}
    for name, linear in (("XLA", xla_linear), ("fused kernels", fused_linear)):
        f2 = jax.tree.map(jnp.copy, fs)
        runs[name] = (make_step(linear), [f2, opt.init(f2), ws, x], True)

    def call(name):
        fn, args, threaded = runs[name]
        out = fn(*args)
        if threaded:
            args[0], args[1] = out
        return out

    calls = {name: functools.partial(call, name) for name in runs}
    times = step.median_times(calls, 20, warmup=3)
    floor_t = times["floor"]
    for name, t in times.items():
        print(f"step {name:14s} {t * 1e3:8.3f} ms  {t / floor_t:6.3f}x the floor")
    return failures


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="interpret mode, numerics only")
    args = p.parse_args()
    failures = main(args.check)
    if failures:
        sys.exit("\n".join(failures))
