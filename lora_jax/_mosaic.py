"""`LoraArray(..., kernel="mosaic")`: a linear layer's LoRA product on a Hopper GPU as
one Mosaic GPU kernel.

The kernel computes `x·wᵀ + h·at` (or `x·w + h·at`): the large product pipelined
through shared memory by TMA and contracted by wgmma in two compute warpgroups per
block, persistent over the SMs; the low-rank term `h·at` (with `h = s·x·bᵀ`, rows ×
rank, from XLA) is one more wgmma on the float32 accumulator before the store. XLA's
form writes the activation-sized expansion `h·aᵀ` and reads it back for the add; this
one does not. Forward and input gradient are each one call (a `custom_vjp`); the factor
gradients stay XLA's thin products.

Measured on an H100 in benchmarks/results/fused_mosaic_h100.md. Used only where it
applies (`product` returns `None` otherwise and the caller takes XLA's path): the
default backend a Hopper GPU, a 2-D bf16/f16 weight (or a quantised one, dequantised
in the step for each call) with factors and input of its dtype, rank at most 64, the
product a plain `x·wᵀ` over the input's last axis, and shapes that tile (rows a
multiple of 256, `out` of 128, `in` of 64; the input gradient's call, whose output
is `in` wide, also needs `in` a multiple of 128 and is XLA's product otherwise). The
kernel has its own `vmap` rule (`one_matrix_at_a_time`) and sharding rule
(`split_over_devices`).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from ._quant import is_quantised
from ._rules import Dims, result_order


PAD = 64  # the low-rank term's contraction: Mosaic's bf16 wgmma takes multiples of 64
_TILE_M, _TILE_N, _TILE_K, _STAGES = 128, 128, 64, 3  # the best of those measured
_H100_SMS = 132  # streaming multiprocessors, for lowering where no GPU is attached


def _on_hopper() -> bool:
    """Whether the default backend is a Hopper GPU (compute capability 9.x)."""
    try:
        device = jax.devices()[0]
    except RuntimeError:
        return False
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9")


def _sms() -> int:
    device = jax.devices()[0]
    count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return count or _H100_SMS


def _smem_layout(minor: int, dtype):
    """Tiling and swizzle of a shared-memory block whose minor dimension has `minor`
    elements, as wgmma and the TMA copies expect."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    per_row = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, per_row)), plgpu.SwizzleTransform(swizzle)


def lora_matmul(
    x,
    w,
    h,
    at,
    *,
    w_transposed: bool,
    tile_m: int = _TILE_M,
    tile_n: int = _TILE_N,
    tile_k: int = _TILE_K,
    stages: int = _STAGES,
    sms: int | None = None,
    groups: int = 1,
):
    """`x·wᵀ + h·at` (`w_transposed`: w is `(n, k)`) or `x·w + h·at` (w is `(k, n)`),
    in x's dtype with float32 accumulation; x `(m, k)`, h `(m, PAD)`, at `(PAD, n)`.

    With `groups > 1` the low-rank term is block-diagonal: h is `(m, groups·PAD)`, at
    `(PAD, n / groups)`, and output column block `g` (of `n / groups` columns) adds
    `h[:, g·PAD:(g+1)·PAD]·at` (LoKr's `1 ⊗ w2_a`).

    Safe to `jax.vmap` (`one_matrix_at_a_time`), and split over devices by rows,
    output columns or the contraction where `jax.jit`'s shardings ask for it
    (`split_over_devices`)."""
    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    if (
        not _tiles(m, n, k, tile_m, tile_n, tile_k, groups)
        or h.shape != (m, groups * PAD)
        or at.shape != (PAD, n // groups)
    ):
        raise ValueError(
            f"shapes x{x.shape} w{w.shape} h{h.shape} at{at.shape} do not tile"
            + (f" in {groups} groups" if groups > 1 else "")
        )
    config = dict(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, stages=stages, sms=sms)
    run = functools.partial(_kernel, w_transposed=w_transposed, groups=groups, **config)
    fits = functools.partial(_tiles, tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, groups=groups)
    return one_matrix_at_a_time(split_over_devices(run, fits, w_transposed, groups))(x, w, h, at)


def _tiles(m, n, k, tile_m, tile_n, tile_k, groups=1) -> bool:
    return not (m % (2 * tile_m) or n % (groups * tile_n) or k % tile_k)


def _kernel(x, w, h, at, *, w_transposed, tile_m, tile_n, tile_k, stages, sms, groups=1):
    """The Mosaic GPU kernel for these operands' shapes, called on them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    dtype = x.dtype
    block_m, epi = 2 * tile_m, 64
    m_blocks, n_blocks, k_steps = m // block_m, n // tile_n, k // tile_k
    group_blocks = n_blocks // groups  # column blocks per group of the low-rank term
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
                if groups == 1:
                    h_block, at_block = h_gmem.at[rows], at_gmem.at[:, cols]
                else:
                    h_block = h_gmem.at[rows, pl.ds((ni // group_blocks) * PAD, PAD)]
                    at_block = at_gmem.at[:, pl.ds((ni % group_blocks) * tile_n, tile_n)]

                def context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tile_m, tile_n), jnp.float32))
                    def _(acc):
                        # The low-rank operands load while the large product runs.
                        plgpu.copy_gmem_to_smem(h_block, my_h, barriers.at[2 * wg])
                        plgpu.copy_gmem_to_smem(at_block, my_at, barriers.at[2 * wg + 1])
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
        grid=(sms or _sms(),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    # JAX's warp-specialised pipeline keeps a tracer of its own between traces, which
    # the tracer-leak checker reports as a leak: traced without it.
    with jax.check_tracer_leaks(False):
        return kernel(x, w, h, at)


def split_over_devices(matmul, fits, w_transposed: bool, groups: int = 1):
    """`matmul(x, w, h, at)` made splittable by XLA's sharding propagation (a custom
    call is otherwise run whole on every device, its sharded inputs gathered). Rows
    (x's and h's first axis), output columns (w's and at's) and the contraction may be
    sharded: each device runs `matmul` on its blocks, or the plain product where they
    do not tile (`fits(m, n, k)`); over a sharded contraction the low-rank term is
    added on its first shard only and the partial products summed. A block-diagonal
    low-rank term (`groups > 1`) keeps the output columns whole."""
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec as P

    @custom_partitioning
    def call(x, w, h, at):
        return matmul(x, w, h, at)

    def specs(rows, cols, inner):
        """(x, w, h, at), out."""
        w_spec = P(cols, inner) if w_transposed else P(inner, cols)
        return (P(rows, inner), w_spec, P(rows, None), P(None, cols)), P(rows, cols)

    def axes(entry):
        return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

    def partition(mesh, arg_shapes, result_shape):
        x, out = arg_shapes[0].sharding, result_shape.sharding
        if isinstance(x, NamedSharding) and isinstance(out, NamedSharding):
            rows, cols = (*out.spec, None, None)[:2]
            inner = (*x.spec, None, None)[1]
        else:  # shardings XLA gives without a mesh: run it whole
            rows = cols = inner = None
        if groups > 1:
            cols = None
        ins, out = specs(rows, cols, inner)
        summed = axes(inner)

        def local(x, w, h, at):
            if summed:
                first = functools.reduce(jnp.logical_and, [lax.axis_index(a) == 0 for a in summed])
                h = jnp.where(first, h, jnp.zeros_like(h))
            (m, k), n = x.shape, at.shape[1] * groups
            if fits(m, n, k):
                y = matmul(x, w, h, at)
            else:
                y = reference_matmul(x, w, h, at, w_transposed=w_transposed, groups=groups)
            return lax.psum(y, summed) if summed else y

        named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
        return mesh, local, named(out), tuple(named(spec) for spec in ins)

    def infer(mesh, arg_shapes, result_shape):  # the GSPMD partitioner's question
        x, w = (arg.sharding for arg in arg_shapes[:2])
        if not (isinstance(x, NamedSharding) and isinstance(w, NamedSharding)):
            return None
        rows = (*x.spec, None)[0]
        cols = (*w.spec, None, None)[0 if w_transposed else 1] if groups == 1 else None
        return NamedSharding(mesh, specs(rows, cols, None)[1])

    w_factors = "n k" if w_transposed else "k n"
    if groups == 1:
        rule, whole = f"m k, {w_factors}, m p, p n -> m n", ("p",)
    else:
        rule, whole = f"m k, {w_factors}, m g, p q -> m n", ("n", "g", "p", "q")
    call.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        reduction_factors=("k",),
        need_replication_factors=whole,
    )
    return call


def one_matrix_at_a_time(matmul):
    """`matmul(x, w, h, at)` on 2-D operands (the kernel under its sharding rule, which
    `jax.vmap` cannot batch) made safe to `jax.vmap`. A batch of inputs against one
    matrix becomes one call over all their rows, and a batch of matrices (an ensemble
    of models) a loop of calls. (JAX's own batching of the bare kernel, one call over
    the batch, was 3% faster for an ensemble of two on the H100, but leaves tracers
    that the tracer-leak checker reports.)"""

    @jax.custom_batching.custom_vmap
    def call(x, w, h, at):
        return matmul(x, w, h, at)

    @call.def_vmap
    def _(size, batched, x, w, h, at):
        def spread(v, b):
            return v if b else jnp.broadcast_to(v, (size, *v.shape))

        if not (batched[1] or batched[3]):
            x, h = spread(x, batched[0]), spread(h, batched[2])
            y = call(x.reshape(-1, x.shape[-1]), w, h.reshape(-1, h.shape[-1]), at)
            return y.reshape(*x.shape[:2], -1), True
        args = [spread(v, b) for v, b in zip((x, w, h, at), batched)]
        return lax.map(lambda vs: call(*vs), args), True

    return call


def dense(w):
    """The weight as the kernel reads it: a quantised base is dequantised here, in the
    step, once for the forward and once for the input gradient (only the quantised
    arrays are kept in between)."""
    return w.dequantise() if is_quantised(w) else w


def reference_matmul(x, w, h, at, *, w_transposed, groups=1, **_):
    """What `lora_matmul` computes, in plain JAX (the tests' and benchmarks' stand-in
    for the kernel where no Hopper GPU is attached)."""
    f32 = jnp.float32
    big = jnp.dot(x, w.T if w_transposed else w, preferred_element_type=f32)
    if groups == 1:
        low = jnp.dot(h, at, preferred_element_type=f32)
    else:
        h = h.reshape(h.shape[0], groups, -1)
        low = jnp.einsum("mgp,pn->mgn", h, at, preferred_element_type=f32)
        low = low.reshape(big.shape)
    return (big + low).astype(x.dtype)


def matmul_or_xla(x, w, h, at, *, w_transposed: bool, groups: int = 1):
    """`lora_matmul`, or its plain statement where the shapes do not tile: the input
    gradient's product (`n = in`, `k = out`) may not where the forward's did (an `in`
    that is a multiple of 64 but not of 128)."""
    m, k = x.shape
    n = w.shape[0] if w_transposed else w.shape[1]
    matmul = lora_matmul if tiles(m, n, k, groups) else reference_matmul
    return matmul(x, w, h, at, w_transposed=w_transposed, groups=groups)


def pad_rows(m):
    return jnp.pad(m, ((0, PAD - m.shape[0]), (0, 0)))


@jax.custom_vjp
def fused_linear(x, w, a, b, s):
    """`x·wᵀ + s·(x·bᵀ)·aᵀ` for x `(m, in)`, w `(out, in)` (an array or a quantised
    one), a `(out, r)`, b `(r, in)`, s a scalar; no gradient reaches w or s (the caller
    stops both)."""
    return _forward(x, w, a, b, s)[0]


def _forward(x, w, a, b, s):
    f32 = jnp.float32
    hs = (s * jnp.dot(x, pad_rows(b).T, preferred_element_type=f32)).astype(x.dtype)
    y = lora_matmul(x, dense(w), hs, pad_rows(a.T), w_transposed=True)
    return y, (x, w, a, b, s, hs)


def _backward(res, g):
    x, w, a, b, s, hs = res
    f32 = jnp.float32
    r = a.shape[1]
    a_cols = jnp.pad(a, ((0, 0), (0, PAD - r)))
    gs = (s * jnp.dot(g, a_cols, preferred_element_type=f32)).astype(g.dtype)
    gx = matmul_or_xla(g, dense(w), gs, pad_rows(b), w_transposed=False)
    ga = jnp.dot(g.T, hs[:, :r], preferred_element_type=f32).astype(a.dtype)
    gb = jnp.dot(gs[:, :r].T, x, preferred_element_type=f32).astype(b.dtype)
    return gx, None, ga, gb, None


fused_linear.defvjp(_forward, _backward)


def _explicitly_sharded(*values) -> bool:
    """Whether any array here is sharded over an explicit mesh axis (sharding in
    types, where each product must say how its result is sharded): XLA's path does,
    the kernel's does not."""
    for v in jax.tree.leaves(values):
        sharding = jax.typeof(v).sharding
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty or not mesh.explicit_axes:
            continue
        if any(entry is not None for entry in sharding.spec):
            return True
    return False


def kernel_layout(w, factors, other, dims: Dims, params):
    """Whether `dot_general(w, other)` (w adapted with `factors`) can be the kernel's:
    `(swap, perm)` for a plain product over `other`'s last axis, `x·wᵀ` (`swap`
    False) or `x·w` (the stored matrix transposed), `perm` the result's permutation
    as for `result_order`; `None` otherwise (the backend, the dtypes, the layout)."""
    if not _on_hopper():
        return None
    if not all(isinstance(v, jax.Array) for v in (*factors, other)):
        return None
    if not (isinstance(w, jax.Array) or is_quantised(w)):
        return None
    if _explicitly_sharded(w, *factors, other):
        return None
    dtype = w.dtype
    if dtype not in (jnp.bfloat16, jnp.float16) or {f.dtype for f in (*factors, other)} != {dtype}:
        return None
    if params.get("precision") is not None or params.get("out_sharding") is not None:
        return None
    if params.get("preferred_element_type") not in (None, dtype):
        return None
    if w.ndim != 2 or other.ndim < 2:
        return None
    inner, perm = result_order(dims, w.ndim, other.ndim, params)
    if (
        inner.adapter_lhs
        or inner.other_contract != (other.ndim - 1,)
        or inner.adapter_batch
        or inner.other_batch
        or inner.adapter_contract not in ((0,), (1,))
    ):
        return None
    return inner.adapter_contract == (0,), perm


def tiles(m: int, n: int, k: int, groups: int = 1) -> bool:
    """Whether `lora_matmul` at its default tiles takes an `(m, k)` input and an output
    `n` wide (in `groups` column groups): for a forward, `m` the rows (all leading
    axes together), `n = out`, `k = in` (the input gradient may still not tile)."""
    return _tiles(m, n, k, _TILE_M, _TILE_N, _TILE_K, groups)


def product(w, a, b, scaling, other, dims: Dims, params, rate: float):
    """The adapted product `dot_general(w + s·a@b, other)` by the kernel, in
    `dot_general`'s layout, or `None` where the kernel does not apply."""
    if rate or a.shape[-1] > PAD or jnp.ndim(scaling):
        return None
    layout = kernel_layout(w, (a, b), other, dims, params)
    if layout is None:
        return None
    swap, perm = layout
    if swap:
        if is_quantised(w):
            return None
        # A transposed adapter (`x @ w.T` in the model) holds the stored matrix and
        # factors transposed: transposing them back costs nothing (XLA cancels the
        # two transposes) and gives the kernel its `x·wᵀ`.
        w, a, b = w.T, b.T, a.T
    (out, inp), lead = w.shape, other.shape[:-1]
    rows = math.prod(lead)
    if not tiles(rows, out, inp):
        return None
    y = fused_linear(other.reshape(rows, inp), w, a, b, jnp.asarray(scaling, jnp.float32))
    y = y.reshape(*lead, out)
    return y if perm is None else lax.transpose(y, perm)
