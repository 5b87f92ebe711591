"""A fused LoRA product for Hopper GPUs, measured: one Mosaic GPU kernel (Pallas, wgmma)
computes `x·w′ + h·at`, the large product pipelined through shared memory and the
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

An experiment, not part of lora_jax's rules yet: results in
benchmarks/results/fused_mosaic_h100.md.

    python benchmarks/fused_mosaic.py --check   # any machine: lowers the kernel for
                                                # CUDA, checks the custom_vjp's algebra
    python benchmarks/fused_mosaic.py           # on a Hopper GPU: kernels and the step
"""

import argparse
import functools
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


S = 2.0  # the adapter's scaling
PAD = 64  # the low-rank term's contraction, the rank zero-padded to it
H100_SMS = 132  # streaming multiprocessors, for lowering on a machine without the GPU
CONFIGS = [  # rows per warpgroup (two per block), columns, contraction, pipeline stages
    dict(tile_m=128, tile_n=128, tile_k=64, stages=3),
    dict(tile_m=64, tile_n=128, tile_k=64, stages=4),
    dict(tile_m=64, tile_n=128, tile_k=64, stages=5),
]


def _smem_layout(minor, dtype):
    """Tiling and swizzle for a shared-memory block whose minor dimension has `minor`
    elements (what wgmma and the TMA copies expect)."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    per_row = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, per_row)), plgpu.SwizzleTransform(swizzle)


def lora_matmul(
    x, w, h, at, *, w_transposed, tile_m=128, tile_n=128, tile_k=64, stages=3, sms=None
):
    """`x·wᵀ + h·at` (w_transposed: w is (n, k)) or `x·w + h·at` (w is (k, n)), in
    x's dtype with float32 accumulation. x (m, k), h (m, PAD), at (PAD, n)."""
    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    dtype = x.dtype
    block_m, epi = 2 * tile_m, 64
    if m % block_m or n % tile_n or k % tile_k or h.shape != (m, PAD) or at.shape != (PAD, n):
        raise ValueError(f"shapes x{x.shape} w{w.shape} h{h.shape} at{at.shape} do not tile")
    m_blocks, n_blocks, k_steps = m // block_m, n // tile_n, k // tile_k
    w_block = (tile_n, tile_k) if w_transposed else (tile_k, tile_n)
    w_index = (lambda kk: (0, kk)) if w_transposed else (lambda kk: (kk, 0))

    def body(x_gmem, w_gmem, h_gmem, at_gmem, out_gmem):
        def pipeline(mma, context):
            specs = [
                plgpu.BlockSpec(
                    (block_m, tile_k),
                    lambda kk: (0, kk),
                    transforms=_smem_layout(tile_k, dtype),
                    memory_space=plgpu.SMEM,
                ),
                plgpu.BlockSpec(
                    w_block,
                    w_index,
                    transforms=_smem_layout(w_block[1], dtype),
                    memory_space=plgpu.SMEM,
                ),
            ]
            return plgpu.emit_pipeline_warp_specialized(
                mma,
                grid=(k_steps,),
                memory_registers=40,
                in_specs=specs,
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=stages,
                compute_context=context,
            )

        def unused(*args, **kwargs):
            return None

        @functools.partial(
            pl.run_scoped,
            allocations=pipeline(unused, unused).get_allocations(x_gmem, w_gmem),
            out_smem=plgpu.SMEM((2, epi, epi), dtype, transforms=_smem_layout(epi, dtype)),
            h_smem=plgpu.SMEM((block_m, PAD), dtype, transforms=_smem_layout(PAD, dtype)),
            at_smem=plgpu.SMEM((2 * PAD, tile_n), dtype, transforms=_smem_layout(tile_n, dtype)),
            barriers=plgpu.Barrier(num_barriers=4),
            collective_axes="wg",
        )
        def _(allocations, out_smem, h_smem, at_smem, barriers):
            wg = lax.axis_index("wg")
            my_h = h_smem.at[pl.ds(wg * tile_m, tile_m)]
            my_at = at_smem.at[pl.ds(wg * PAD, PAD)]

            @plgpu.nd_loop((m_blocks * n_blocks,), collective_axes="sm")
            def _(loop):
                (tile,) = loop.index if hasattr(loop, "index") else loop
                mi, ni = plgpu.planar_snake(tile, (m_blocks, n_blocks), 0, 8)
                rows = pl.ds(mi * block_m + wg * tile_m, tile_m)
                cols = pl.ds(ni * tile_n, tile_n)

                def context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tile_m, tile_n), jnp.float32))
                    def _(acc):
                        # The low-rank operands load while the large product runs.
                        plgpu.copy_gmem_to_smem(h_gmem.at[rows], my_h, barriers.at[2 * wg])
                        plgpu.copy_gmem_to_smem(at_gmem.at[:, cols], my_at, barriers.at[2 * wg + 1])
                        run_pipeline(acc)
                        plgpu.barrier_wait(barriers.at[2 * wg])
                        plgpu.barrier_wait(barriers.at[2 * wg + 1])
                        plgpu.wgmma(acc, my_h, my_at)
                        plgpu.wgmma_wait(0)
                        y = acc[...].astype(dtype)
                        for i in range(tile_m // epi):
                            for j in range(tile_n // epi):
                                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                                out_smem[wg] = y[i * epi : (i + 1) * epi, j * epi : (j + 1) * epi]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg],
                                    out_gmem.at[rows, cols].at[
                                        pl.ds(i * epi, epi), pl.ds(j * epi, epi)
                                    ],
                                )

                def mma(_, x_smem, w_smem, acc):
                    w_op = w_smem.transpose((1, 0)) if w_transposed else w_smem
                    plgpu.wgmma(acc, x_smem.at[pl.ds(wg * tile_m, tile_m)], w_op)
                    plgpu.wgmma_wait(0)
                    return acc

                w_cols = w_gmem.at[cols, :] if w_transposed else w_gmem.at[:, cols]
                pipeline(mma, context)(
                    x_gmem.at[pl.ds(mi * block_m, block_m), :], w_cols, allocations=allocations
                )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), dtype),
        grid=(sms or jax.devices()[0].core_count,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(x, w, h, at)


def _pad_rows(m):
    return jnp.pad(m, ((0, PAD - m.shape[0]), (0, 0)))


def make_fused_linear(product):
    """y = x·wᵀ + S·(x·bᵀ)·aᵀ with w frozen, its forward and input gradient each one
    `product(x, w, h, at, w_transposed=...)`."""
    f32 = jnp.float32

    def forward(x, w, a, b):
        hs = (S * jnp.dot(x, _pad_rows(b).T, preferred_element_type=f32)).astype(x.dtype)
        return product(x, w, hs, _pad_rows(a.T), w_transposed=True), (x, w, a, b, hs)

    def backward(res, g):
        x, w, a, b, hs = res
        r = a.shape[1]
        gs = (S * jnp.dot(g, _pad_rows(a.T).T, preferred_element_type=f32)).astype(g.dtype)
        gx = product(g, w, gs, _pad_rows(b), w_transposed=False)
        ga = jnp.dot(g.T, hs[:, :r], preferred_element_type=f32).astype(a.dtype)
        gb = jnp.dot(gs[:, :r].T, x, preferred_element_type=f32).astype(b.dtype)
        return gx, jnp.zeros_like(w), ga, gb

    linear = jax.custom_vjp(lambda x, w, a, b: forward(x, w, a, b)[0])
    linear.defvjp(forward, backward)
    return linear


def reference_product(x, w, h, at, *, w_transposed):
    """What the kernel computes, in plain JAX."""
    f32 = jnp.float32
    big = jnp.dot(x, w.T if w_transposed else w, preferred_element_type=f32)
    return (big + jnp.dot(h, at, preferred_element_type=f32)).astype(x.dtype)


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
        kernel = functools.partial(lora_matmul, w_transposed=transposed, sms=H100_SMS)
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
    fused = make_fused_linear(reference_product)

    def loss(linear):
        return lambda x, a, b: jnp.sum(jnp.sin(linear(x, w, a, b)))

    forward_err = rel_err(fused(x, w, a, b), xla_linear(x, w, a, b))
    print(f"forward, custom_vjp against dense: {forward_err:.1e}")
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(x, a, b)
    ref = jax.grad(loss(xla_linear), argnums=(0, 1, 2))(x, a, b)
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    print("gradients (x, a, b), custom_vjp against dense: " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < 1e-5 and forward_err < 1e-5


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
        at = _pad_rows((jr.normal(keys[3], (r, n)) * 0.1).astype(jnp.bfloat16))
        name = f"{k}→{n}"
        t0, _ = bench(lambda x, w: x @ w.T, (x, w))
        ref = reference_product(
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

    fused = make_fused_linear(lora_matmul)
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
    times = {name: [] for name in contenders}
    for call in contenders.values():
        for _ in range(3):
            jax.block_until_ready(call())
    for _ in range(rounds):
        for name, call in contenders.items():
            t = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["floor (forward + input gradient)"])
    print("\n| step (gpu preset) | ms | × floor |")
    print("|---|---:|---:|")
    for name in contenders:
        t = statistics.median(times[name])
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
