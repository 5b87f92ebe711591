"""`LoraArray(..., kernel="mosaic")`: the fused Mosaic GPU product.

CI has no GPU: here the kernel is lowered for CUDA (no GPU needed), and its
`custom_vjp` is checked against the dense reference with the kernel replaced by its
plain-JAX statement. `test_kernel_on_a_hopper_gpu` runs the real kernel where a Hopper
GPU is the default backend (the device machine) and is skipped elsewhere."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import lora_jax as lora
from lora_jax import _mosaic, _rules


TOKENS, IN, OUT, RANK = 256, 128, 256, 8


@pytest.fixture
def fresh_rules(request):
    # The rules run under a cached jit: trace them afresh, and leave no trace of a
    # forced path behind for later tests.
    _rules._cached_dot.clear_cache()
    request.addfinalizer(_rules._cached_dot.clear_cache)


@pytest.fixture
def plain_kernel(monkeypatch, fresh_rules):
    """The kernel's path taken as on a Hopper GPU, the kernel stated plainly."""
    monkeypatch.setattr(_mosaic, "_on_hopper", lambda: True)
    monkeypatch.setattr(_mosaic, "lora_matmul", _mosaic.reference_matmul)


def adapted(
    key, dtype=jnp.bfloat16, kernel="mosaic", out=OUT, inp=IN, rank=RANK, quant=None, **options
):
    k1, k2, k3, k4 = jr.split(key, 4)
    lin = eqx.nn.Linear(inp, out, use_bias=False, key=k1, dtype=dtype)
    if quant is not None:
        lin = lora.quantise(lin, method=quant)
    lin = lora.loraify(lin, rank=rank, key=k2, kernel=kernel, **options)
    if options.get("method") in ("lokr", "loha"):
        return lin  # made with `init_weights=False` (LOKR, LOHA): every factor nonzero
    # Both factors nonzero (the default initialisation leaves b zero), so the low-rank
    # term and every factor gradient count.
    a = jr.normal(k3, lin.weight.a.shape, jnp.float32) * 0.5
    b = jr.normal(k4, lin.weight.b.shape, jnp.float32) / inp**0.5
    v = lin.weight
    return eqx.tree_at(
        lambda m: (m.weight.a, m.weight.b), lin, (a.astype(v.a.dtype), b.astype(v.b.dtype))
    )


# LoKr with w1 4×4 and w2 held at rank RANK: `out/4` and `in/4` multiples of 128, as
# the kernel's column groups need.
LOKR = dict(method="lokr", init_weights=False, decompose_factor=4, out=1024, inp=512)
# LoHa at rank 8: a rank-64 LoRA, the kernel's largest.
LOHA = dict(method="loha", init_weights=False, rank=8)


def dense(model):
    v = model.weight
    f32 = jnp.float32
    return v.w.astype(f32) + v.scaling * (v.a.astype(f32) @ v.b.astype(f32))


def wave(y):
    """A scalar whose gradient varies over `y`'s entries: `Σ sin(y/8)`. The 1/8 keeps
    it smooth on bf16's rounding of outputs of tens (an ulp of 0.125 moved `cos(y)` by
    up to 0.125, enough for two summation orders to differ by 5% in a few entries of
    a factor's gradient)."""
    return jnp.sum(jnp.sin(y.astype(jnp.float32) / 8))


def loss(model, x):
    return wave(jax.vmap(jax.vmap(model))(x) if x.ndim == 3 else jax.vmap(model)(x))


def dense_loss(w, x):
    return wave(x.astype(jnp.float32) @ w.T)


def as_float32(model):
    """`model` computing in float32: floating leaves cast, a quantised base dequantised
    to float32."""

    def cast(leaf):
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(jnp.float32)
        return leaf

    def base(q):
        return jax.tree.map(cast, dataclasses.replace(q, base_dtype=jnp.dtype(jnp.float32)))

    is_quant = lambda t: isinstance(t, lora.Int8Array | lora.NF4Array)  # noqa: E731
    return jax.tree.map(lambda t: base(t) if is_quant(t) else cast(t), model, is_leaf=is_quant)


def assert_matches_xlas_path(fused, xla, f, x):
    """`f(model, x)` and its gradients (trained leaves and `x`) through the kernel's
    path (`fused`, which must take it) equal those of XLA's path computed in float32
    (`xla` cast), the dense reference: bf16's roundings aside. (Against XLA's own bf16
    path, the two sets of roundings differ by more: jax 0.11's CPU products keep bf16
    intermediates, 5% of the largest entry of a factor's gradient.)"""

    def run(model, x):
        params, frozen = lora.partition(model)
        g = lambda p, x: quax.quaxify(f)(eqx.combine(p, frozen), x)
        return g(params, x), jax.grad(g, argnums=(0, 1))(params, x), jax.make_jaxpr(g)(params, x)

    (y1, g1, jaxpr), (y2, g2, _) = run(fused, x), run(as_float32(xla), x.astype(jnp.float32))
    assert "custom_vjp_call" in str(jaxpr)
    # A sum of many bf16-rounded terms that partly cancel: its rounding error grows
    # with the square root of their count, not with the sum (the gradients below are
    # checked element by element).
    np.testing.assert_allclose(y1, y2, rtol=2e-2, atol=2e-3 * x.size**0.5)
    f32 = jnp.float32
    for got, want in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        got, want = got.astype(f32), want.astype(f32)
        np.testing.assert_allclose(got, want, atol=3e-2 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("cls", [lora.LoraArray, lora.DoraArray, lora.LokrArray, lora.LohaArray])
def test_kernel_option_is_checked(cls, getkey):
    with pytest.raises(ValueError, match="`kernel` must be one of 'xla', 'mosaic'"):
        cls(jnp.ones((4, 4)), rank=2, key=getkey(), kernel="triton")


@pytest.mark.parametrize("lead", [(TOKENS,), (2, TOKENS // 2)], ids=["tokens", "batch-tokens"])
def test_custom_vjp_matches_dense(lead, getkey, plain_kernel):
    """The kernel's `custom_vjp`, the kernel stated plainly: forward, input gradient
    and factor gradients equal the dense reference's (float32 inputs through the
    bf16-style path would not take it, so bf16 with a bf16 tolerance)."""
    model = adapted(getkey())
    x = jr.normal(getkey(), (*lead, IN), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(quax.quaxify(loss))(model, x))
    assert "custom_vjp_call" in jaxpr  # the kernel's path was taken
    y = quax.quaxify(lambda m, x: jax.vmap(jax.vmap(m))(x) if x.ndim == 3 else jax.vmap(m)(x))(
        model, x
    )
    ref = x.astype(jnp.float32) @ dense(model).T
    np.testing.assert_allclose(
        y.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2 * float(jnp.abs(ref).max())
    )

    params, frozen = lora.partition(model)
    grads = jax.grad(lambda p, x: quax.quaxify(loss)(eqx.combine(p, frozen), x), argnums=(0, 1))(
        params, x
    )
    v = model.weight
    f32 = jnp.float32

    def ref_loss(a, b, x):
        w = v.w.astype(f32) + v.scaling * (a @ b)
        return dense_loss(w, x.astype(f32))

    ga, gb, gx = jax.grad(ref_loss, argnums=(0, 1, 2))(v.a.astype(f32), v.b.astype(f32), x)
    for got, want in ((grads[0].weight.a, ga), (grads[0].weight.b, gb), (grads[1], gx)):
        got = got.astype(f32)
        np.testing.assert_allclose(got, want, atol=3e-2 * float(jnp.abs(want).max()))
    assert grads[0].weight._w is None  # the base weight stays frozen


def test_transposed_adapter_matches_xlas_path(getkey, plain_kernel):
    """`x @ w.T` on an adapted weight (a transposed adapter) takes the kernel too, and
    gives XLA's path's output and gradients."""
    key = getkey()
    fused, xla = (adapted(key, kernel=k) for k in ("mosaic", "xla"))
    x = jr.normal(getkey(), (2, TOKENS // 2, IN), jnp.bfloat16)

    def f(m, x):
        return wave(x @ m.weight.T)

    assert_matches_xlas_path(fused, xla, f, x)


def test_custom_vjp_under_remat_policy(getkey, plain_kernel):
    """A block checkpointed with `remat_policy` gives the same gradients through the
    kernel's path."""
    model = adapted(getkey())
    x = jr.normal(getkey(), (TOKENS, IN), jnp.bfloat16)
    params, frozen = lora.partition(model)
    remat_loss = eqx.filter_checkpoint(loss, policy=lora.remat_policy)

    def grads(f):
        return jax.grad(lambda p: quax.quaxify(f)(eqx.combine(p, frozen), x))(params)

    assert "custom_vjp_call" in str(jax.make_jaxpr(quax.quaxify(remat_loss))(model, x))
    for got, want in zip(jax.tree.leaves(grads(remat_loss)), jax.tree.leaves(grads(loss))):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lead", [(TOKENS,), (2, TOKENS // 2)], ids=["tokens", "batch-tokens"])
def test_dora_matches_xlas_path(lead, getkey, plain_kernel):
    """DoRA with `kernel="mosaic"`: the kernel computes `w·x + s·a·(b·x)` and the
    magnitudes scale it; output and gradients (the magnitudes' included) equal XLA's
    path's, as a product with the matrix on either side."""
    key = getkey()
    fused, xla = (adapted(key, method="dora", kernel=k) for k in ("mosaic", "xla"))
    # Magnitudes away from the norms, so that they count.
    m = fused.weight.m.astype(jnp.float32) * (1 + 0.5 * jr.uniform(getkey(), fused.weight.m.shape))
    fused, xla = (
        eqx.tree_at(lambda t: t.weight.m, v, m.astype(v.weight.m.dtype)) for v in (fused, xla)
    )
    x = jr.normal(getkey(), (*lead, IN), jnp.bfloat16)

    def right(m, x):  # the matrix on the right: `dot_general(x, w)`
        y = jnp.einsum("...i,oi->...o", x, m.weight)
        return wave(y)

    for f in (loss, right):
        assert_matches_xlas_path(fused, xla, f, x)


@pytest.mark.parametrize(
    "lead, quant",
    [((TOKENS,), None), ((2, TOKENS // 2), None), ((TOKENS,), "int8"), ((TOKENS,), "nf4")],
    ids=["tokens", "batch-tokens", "int8-base", "nf4-base"],
)
def test_lokr_matches_xlas_path(lead, quant, getkey, plain_kernel):
    """LoKr with `kernel="mosaic"`: `w2_b` and `w1` are applied by XLA to a rank-sized
    tensor and the kernel adds `1 ⊗ w2_a` as a block-diagonal low-rank term; output and
    gradients (every factor's) equal XLA's path's, on a quantised base too."""
    key = getkey()
    fused, xla = (adapted(key, kernel=k, quant=quant, **LOKR) for k in ("mosaic", "xla"))
    assert fused.weight.w2 is None and fused.weight.w1.shape == (4, 4)
    x = jr.normal(getkey(), (*lead, LOKR["inp"]), jnp.bfloat16)
    assert_matches_xlas_path(fused, xla, loss, x)


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "rank-dropout"])
def test_loha_matches_xlas_path(dropout, getkey, plain_kernel):
    """LoHa with `kernel="mosaic"`: its rank-`r²` LoRA factors (rank dropout applied to
    them) go to the kernel; output and gradients equal XLA's path's."""
    key = getkey()
    options = dict(LOHA, rank_dropout=0.5) if dropout else LOHA
    fused, xla = (adapted(key, kernel=k, **options) for k in ("mosaic", "xla"))
    if dropout:
        key = getkey()
        fused, xla = (lora.with_dropout_keys(m, key) for m in (fused, xla))
    x = jr.normal(getkey(), (TOKENS, IN), jnp.bfloat16)
    assert_matches_xlas_path(fused, xla, loss, x)


def test_grouped_low_rank_term_is_block_diagonal(getkey):
    """`reference_matmul(..., groups=g)`, the kernel's statement: output column group
    `i` adds the `i`-th `PAD`-wide block of `h` times `at`, i.e. `h` times the
    block-diagonal `1 ⊗ at`."""
    m, k, n, groups, pad = 256, 64, 512, 4, _mosaic.PAD
    x, w = jr.normal(getkey(), (m, k)), jr.normal(getkey(), (n, k))
    h, at = jr.normal(getkey(), (m, groups * pad)), jr.normal(getkey(), (pad, n // groups))
    got = _mosaic.reference_matmul(x, w, h, at, w_transposed=True, groups=groups)
    want = x @ w.T + h @ jnp.kron(jnp.eye(groups), at)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantised_base_matches_xlas_path(quant, getkey, plain_kernel, capsys):
    """On a quantised base the kernel's path (the weight dequantised in the step for
    each call) gives XLA's path's output and gradients, and keeps only the quantised
    arrays between the forward and the backward."""
    key = getkey()
    fused, xla = (adapted(key, quant=quant, kernel=k) for k in ("mosaic", "xla"))
    x = jr.normal(getkey(), (2 * TOKENS, IN), jnp.bfloat16)  # not of the weight's shape

    assert_matches_xlas_path(fused, xla, loss, x)
    # What the backward keeps of the weight: the quantised arrays, not a dense copy.
    params, frozen = lora.partition(fused)
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(
        lambda p: quax.quaxify(loss)(eqx.combine(p, frozen), x), params
    )
    saved = capsys.readouterr().out
    assert "from the argument" in saved  # the listing is what this parses
    dense = [line for line in saved.splitlines() if f"[{OUT},{IN}]" in line]
    assert all(line.startswith(("i8", "u8")) for line in dense), saved


def ensemble(kernel, key, size=2, **options):
    """`size` adapted layers stacked on a leading axis, as `jax.vmap` takes them."""
    return eqx.filter_vmap(lambda k: adapted(k, kernel=kernel, **options))(jr.split(key, size))


def ensemble_loss(params, frozen, x):
    """The summed loss of an ensemble, each model on its own inputs: `jax.vmap` outside
    `quax.quaxify`, so the kernel's operands are batched."""

    def one(p, frozen, x):
        return quax.quaxify(loss)(eqx.combine(p, frozen), x)

    return jnp.sum(jax.vmap(one)(params, frozen, x))


def test_kernel_under_vmap_lowers_to_2d_calls(getkey, monkeypatch, fresh_rules):
    """Lowered for CUDA, an ensemble's step calls the kernel with 2-D operands."""
    monkeypatch.setattr(_mosaic, "_on_hopper", lambda: True)
    params, frozen = lora.partition(ensemble("mosaic", getkey()))
    x = jnp.ones((2, TOKENS, IN), jnp.bfloat16)
    step = jax.jit(jax.grad(ensemble_loss, argnums=(0, 2)))
    text = step.trace(params, frozen, x).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert len(calls) == 2, calls
    operands = [line.rsplit(": (", 1)[-1].split(")")[0] for line in calls]
    assert all(t.count("x") == 2 * t.count("tensor") for t in operands), operands


@pytest.fixture
def recorded_kernel(monkeypatch, fresh_rules):
    """The kernel's path taken as on a Hopper GPU, with everything around the kernel
    (its `vmap` and sharding rules) but the kernel itself stated plainly; the shapes
    it was called with are recorded."""
    shapes = []

    def kernel(x, w, h, at, *, w_transposed, groups=1, **_):
        shapes.append((x.shape, w.shape))
        return _mosaic.reference_matmul(x, w, h, at, w_transposed=w_transposed, groups=groups)

    monkeypatch.setattr(_mosaic, "_on_hopper", lambda: True)
    monkeypatch.setattr(_mosaic, "_kernel", kernel)
    return shapes


@pytest.mark.parametrize("method", ["lora", "lokr"])
@pytest.mark.parametrize("batched", ["models", "inputs"])
def test_kernel_under_vmap_takes_one_matrix_at_a_time(batched, method, getkey, recorded_kernel):
    """Under `jax.vmap` the kernel is called on 2-D operands only (its sharding rule
    cannot be batched): an ensemble of models loops over its matrices, a batch of
    inputs against one model is one call over all their rows. Output and gradients
    equal XLA's path's (LoKr's grouped low-rank term too)."""
    shapes = recorded_kernel
    options = LOKR if method == "lokr" else {}
    inp = options.get("inp", IN)
    key, x = getkey(), jr.normal(getkey(), (2, TOKENS, inp), jnp.bfloat16)
    results = []
    for kernel in ("mosaic", "xla"):
        if batched == "models":
            params, frozen = lora.partition(ensemble(kernel, key, **options))
            f = ensemble_loss
        else:
            params, frozen = lora.partition(adapted(key, kernel=kernel, **options))
            f = lambda p, fz, x: jnp.sum(  # noqa: E731
                jax.vmap(lambda x: quax.quaxify(loss)(eqx.combine(p, fz), x))(x)
            )
        results.append(jax.jit(jax.value_and_grad(f, argnums=(0, 2)))(params, frozen, x))
    assert shapes and all(len(xs) == len(ws) == 2 for xs, ws in shapes), shapes
    # (the rule also traces the function once on an unbatched slice)
    assert max(xs[0] for xs, _ in shapes) == (2 * TOKENS if batched == "inputs" else TOKENS)
    for got, want in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * float(jnp.abs(want).max()))


EIGHT_DEVICES = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (conftest simulates 8 CPUs)"
)


@EIGHT_DEVICES
@pytest.mark.parametrize("split", ["rows", "columns"])
def test_kernel_splits_over_devices(split, getkey, recorded_kernel):
    """Under `jax.jit` with sharded inputs the kernel is split, not gathered: data
    parallel (rows over 2 devices), and a column-parallel weight (over 4), whose input
    gradient contracts over the sharded axis and sums the devices' partial products.
    Each device calls the kernel on its own blocks where they tile; the step has no
    all-gather, and equals XLA's path's."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    put = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, P(*spec)))  # noqa: E731
    key, x = getkey(), jr.normal(getkey(), (2 * TOKENS, IN), jnp.bfloat16)
    x = put(x, "data", None)
    results = []
    for kernel in ("mosaic", "xla"):
        params, frozen = lora.partition(adapted(key, kernel=kernel))
        if split == "columns":
            weight = put(frozen.weight._w, "tensor", None)
            frozen = eqx.tree_at(lambda m: m.weight._w, frozen, weight)
            params = eqx.tree_at(lambda m: m.weight.a, params, put(params.weight.a, "tensor"))
        step = jax.jit(
            jax.value_and_grad(
                lambda p, x: quax.quaxify(loss)(eqx.combine(p, frozen), x), argnums=(0, 1)
            )
        )
        assert "all-gather" not in step.lower(params, x).compile().as_text()
        results.append(step(params, x))
    local = {(TOKENS, IN)} if split == "rows" else {(TOKENS, OUT // 4)}  # x's blocks
    assert local <= {xs for xs, _ in recorded_kernel}, recorded_kernel
    for got, want in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * float(jnp.abs(want).max()))


@EIGHT_DEVICES
@pytest.mark.parametrize("split", ["rows", "columns"])
def test_lokr_kernel_splits_over_devices(split, getkey, recorded_kernel):
    """LoKr's block-diagonal low-rank term under sharding: rows are split as for LoRA;
    a column-parallel weight is gathered for the kernel, whose column groups stay
    whole. Each device calls the kernel on its rows against the whole weight, and the
    step equals XLA's path's."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    put = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, P(*spec)))  # noqa: E731
    out, inp = LOKR["out"], LOKR["inp"]
    key, x = getkey(), put(jr.normal(getkey(), (2 * TOKENS, inp), jnp.bfloat16), "data", None)
    results = []
    for kernel in ("mosaic", "xla"):
        params, frozen = lora.partition(adapted(key, kernel=kernel, **LOKR))
        if split == "columns":
            weight = put(frozen.weight._w, "tensor", None)
            frozen = eqx.tree_at(lambda m: m.weight._w, frozen, weight)
        step = jax.jit(
            jax.value_and_grad(
                lambda p, x: quax.quaxify(loss)(eqx.combine(p, frozen), x), argnums=(0, 1)
            )
        )
        results.append(step(params, x))
    assert ((TOKENS, inp), (out, inp)) in recorded_kernel, recorded_kernel
    for got, want in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * float(jnp.abs(want).max()))


@EIGHT_DEVICES
def test_explicitly_sharded_products_take_xlas_path(getkey, recorded_kernel):
    """On a mesh with explicit axes (sharding in types) every product must say how its
    result is sharded, which XLA's path does: a sharded input takes it."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    model = adapted(getkey())
    x = jnp.ones((2 * TOKENS, IN), jnp.bfloat16)
    f = quax.quaxify(loss)
    assert "custom_vjp_call" in str(jax.make_jaxpr(f)(model, x))  # unsharded: the kernel
    x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(f)(model, x))


@pytest.mark.parametrize(
    "case",
    ["xla", "float32", "rows", "rank", "dropout", "cpu", "trained-base"],
)
def test_other_products_take_xlas_path(case, getkey, monkeypatch, fresh_rules):
    """Where the kernel does not apply the product is XLA's, whatever `kernel` says."""
    monkeypatch.setattr(_mosaic, "_on_hopper", lambda: case != "cpu")
    monkeypatch.setattr(_mosaic, "lora_matmul", _mosaic.reference_matmul)
    model = adapted(
        getkey(),
        dtype=jnp.float32 if case == "float32" else jnp.bfloat16,
        kernel="xla" if case == "xla" else "mosaic",
        rank=80 if case == "rank" else RANK,
        dropout=0.1 if case == "dropout" else 0.0,
        stop_gradient=case != "trained-base",  # the kernel gives `w` no gradient
    )
    tokens = TOKENS - 1 if case == "rows" else TOKENS
    x = jnp.ones((tokens, IN), model.weight.w.dtype)
    if case == "dropout":
        model = lora.with_dropout_keys(model, getkey())
    jaxpr = str(jax.make_jaxpr(quax.quaxify(loss))(model, x))
    assert "custom_vjp_call" not in jaxpr


@pytest.mark.parametrize("variant", ["lora", "dora", "lokr", "loha", "int8", "nf4"])
def test_kernel_lowers_for_cuda(variant, getkey, monkeypatch, fresh_rules):
    """Lowered for CUDA (no GPU needed), a training step's forward and input gradient
    are each one Mosaic GPU kernel, and no activation-sized product is left besides."""
    monkeypatch.setattr(_mosaic, "_on_hopper", lambda: True)
    options = {"lora": {}, "dora": {"method": "dora"}, "lokr": LOKR, "loha": LOHA}.get(
        variant, {"quant": variant}
    )
    model = adapted(getkey(), **options)
    params, frozen = lora.partition(model)
    out, inp = options.get("out", OUT), options.get("inp", IN)
    x = jnp.ones((TOKENS, inp), jnp.bfloat16)

    def step(p, x):
        return jax.grad(lambda p, x: quax.quaxify(loss)(eqx.combine(p, frozen), x), argnums=(0, 1))(
            p, x
        )

    text = jax.jit(step).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
    kernels = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert len(kernels) == 2, kernels
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    # Only the thin products remain (XLA's path has four activation-sized products
    # here: the forward's two and the input gradient's two).
    activation = (f"tensor<{TOKENS}x{out}x", f"tensor<{TOKENS}x{inp}x")
    big = [line for line in dots if line.split("->")[-1].strip().startswith(activation)]
    assert not big, big


def test_input_gradient_that_does_not_tile_takes_xlas_product(getkey, monkeypatch, fresh_rules):
    """An `in` that is a multiple of 64 but not of 128 tiles the forward (`k = in`) but
    not the input gradient (`n = in`): lowered for CUDA, the forward is the kernel and
    the input gradient XLA's product (it used to raise "do not tile" in the backward
    pass). Values and gradients equal XLA's path's."""
    monkeypatch.setattr(_mosaic, "_on_hopper", lambda: True)
    inp = 192
    key = getkey()
    fused, xla = (adapted(key, kernel=k, inp=inp) for k in ("mosaic", "xla"))
    params, frozen = lora.partition(fused)
    x = jr.normal(getkey(), (TOKENS, inp), jnp.bfloat16)
    step = jax.grad(lambda p, x: quax.quaxify(loss)(eqx.combine(p, frozen), x), argnums=(0, 1))
    text = jax.jit(step).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1
    monkeypatch.setattr(_mosaic, "lora_matmul", _mosaic.reference_matmul)
    _rules._cached_dot.clear_cache()  # traced above with the real kernel
    assert_matches_xlas_path(fused, xla, loss, x)


GPU_VARIANTS = {
    "lora": {},
    "ensemble": {},  # `jax.vmap` over two models
    "dora": {"method": "dora"},
    "lokr": {k: v for k, v in LOKR.items() if k not in ("out", "inp")},
    "loha": LOHA,
    "int8": {"quant": "int8"},
    "transposed": {},  # `x @ w.T` in the model
}


@pytest.mark.skipif(not _mosaic._on_hopper(), reason="needs a Hopper GPU")
@pytest.mark.parametrize("variant", GPU_VARIANTS)
def test_kernel_on_a_hopper_gpu(variant, getkey, fresh_rules):
    """The real kernel: forward and gradients equal XLA's path within bf16 rounding."""
    key, options = getkey(), GPU_VARIANTS[variant]
    size = 2 if variant == "ensemble" else None  # models stacked, `jax.vmap` over them

    def make(kernel):
        build = lambda k: adapted(
            k, kernel=kernel, **{"out": 1024, "inp": 512, "rank": 16, **options}
        )  # noqa: E731
        return build(key) if size is None else eqx.filter_vmap(build)(jr.split(key, size))

    model, xla = make("mosaic"), make("xla")
    x = jr.normal(getkey(), (2048, 512) if size is None else (size, 2048, 512), jnp.bfloat16)
    f32 = jnp.float32

    def one(m, x):
        return x @ m.weight.T if variant == "transposed" else jax.vmap(m)(x)

    def product(m, x):
        if size is None:
            return quax.quaxify(one)(m, x)
        return jax.vmap(quax.quaxify(one))(m, x)  # outside quaxify: the kernel is batched

    def objective(m, x):
        return wave(product(m, x))

    def run(model):
        params, frozen = lora.partition(model)
        f = jax.jit(lambda p, x: objective(eqx.combine(p, frozen), x))
        g = jax.jit(jax.grad(lambda p, x: objective(eqx.combine(p, frozen), x), (0, 1)))
        y = jax.jit(lambda p, x: product(eqx.combine(p, frozen), x))
        assert "mosaic_gpu" in f.lower(params, x).as_text() or model is xla
        return y(params, x), g(params, x)

    (y1, g1), (y2, g2) = run(model), run(xla)
    np.testing.assert_allclose(
        y1.astype(f32), y2.astype(f32), atol=2e-2 * float(jnp.abs(y2.astype(f32)).max())
    )
    for got, want in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        got, want = got.astype(f32), want.astype(f32)
        np.testing.assert_allclose(got, want, atol=2e-2 * float(jnp.abs(want).max()))


@pytest.mark.skipif(
    not (_mosaic._on_hopper() and jax.device_count() >= 2), reason="needs two Hopper GPUs"
)
@pytest.mark.parametrize("split", ["rows", "columns"])
def test_kernel_split_over_hopper_gpus(split, getkey, fresh_rules):
    """The real kernel split over two GPUs (data parallel, or a column-parallel weight):
    each GPU runs it on its blocks, nothing is gathered, and the step equals XLA's."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Auto,))
    put = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, P(*spec)))  # noqa: E731
    key, x = getkey(), jr.normal(getkey(), (4096, 512), jnp.bfloat16)
    x = put(x, "d", None) if split == "rows" else put(x)
    results = []
    for kernel in ("mosaic", "xla"):
        params, frozen = lora.partition(adapted(key, out=1024, inp=512, rank=16, kernel=kernel))
        if split == "columns":
            frozen = eqx.tree_at(lambda m: m.weight._w, frozen, put(frozen.weight._w, "d", None))
            params = eqx.tree_at(lambda m: m.weight.a, params, put(params.weight.a, "d"))
        step = jax.jit(
            jax.value_and_grad(
                lambda p, x: quax.quaxify(loss)(eqx.combine(p, frozen), x), argnums=(0, 1)
            )
        )
        text = step.lower(params, x).compile().as_text()
        assert "all-gather" not in text
        assert ("mosaic_gpu" in text) == (kernel == "mosaic")
        results.append(step(params, x))
    for got, want in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        got, want = got.astype(jnp.float32), want.astype(jnp.float32)
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * float(jnp.abs(want).max()))
