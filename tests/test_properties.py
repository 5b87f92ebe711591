"""Property tests at scale: every adapter method against its dense reference, over random
shapes, dtypes (float32, bfloat16, float16), stacking dimensions, transposes and
`dot_general` / convolution dimension numbers; forward values and gradients.

**What counts as a case.** Hypothesis draws an *example*: a method and its structural
options, the weight's and factors' dtypes, the shapes, the stacking dimensions and the
operation (its dimension numbers, transposes, strides, paddings, lookups): everything
that fixes one compiled program. Each example compiles one jitted function and runs it,
vmapped, on `DRAWS` independent draws of random values (the base weight, every factor,
the scaling, the input and the output cotangent; integer ids for lookups). One *case*
is one such draw. In a case, the forward output and the vector-Jacobian product with the
random cotangent (the gradients with respect to every trainable factor and to the
floating input) are compared element by element with the same quantities computed from
the dense reference: the materialised weight written plainly from the method's formula
(`tests/helpers.py`, `tests/test_methods.py::dense`, `tests/test_layers.py::conv_delta`),
run through the same operation in float32 and differentiated by JAX. A case passes only
if every element of every one of those arrays is within tolerance; the first failing
case fails the test. `conftest.py` counts the cases that passed (over every xdist
worker) and prints `property cases run: N` at the end of the session. Each test must
check at least `MIN_SHARE` of the cases its examples could give (a DoRA draw may be
skipped, see below), and `test_enough_cases` checks that those minima add up to
`MIN_CASES`: a full run checks at least `MIN_CASES` cases, however the tests are split
over workers.

**Tolerance.** For every method but DoRA, each output element and each gradient element
is a polynomial with nonnegative coefficients in the entries of the weight, factors,
scaling, input and cotangent, so the same reference evaluated at their absolute values,
`mag`, bounds the sum of the absolute values of its terms. Rounding the intermediates
to a format of machine epsilon `eps` moves a result by a small multiple of `eps·mag`
(the classical forward error bound of a sum of products), so an element passes when

    |got - ref| <= (TOL_ULPS·eps + n·eps_f32)·mag

with `eps` that of the coarsest dtype in the case (weight or factors) and `n` the
weight's number of elements (float32 accumulation in both computations), plus
`SUBNORMAL_ULPS` of the dtype's smallest subnormal (float16 results that small have
lost their relative precision). DoRA divides by row norms `‖w + s·a@b‖`, which the
library accumulates in float32 as `‖w‖² + 2s⟨w, a@b⟩ + s²‖a@b‖²`; its `mag` treats
`m / ‖w + s·a@b‖` as one positive input (the norm is detached in DoRA, so the rest
stays polynomial), and `n` grows by `TOL_ULPS·κ`, κ the largest ratio
`‖|w| + s·|a|@|b|‖² / ‖w + s·a@b‖²` of a row (the sum of the absolute values of the
expanded norm's terms over its value: the norm's relative error is about `κ·eps_f32`).
A DoRA draw with `κ > KAPPA_MAX` (a row a hundred times shorter than its parts, which
random tiny shapes produce in a few draws per thousand, rows of one or two inputs) is
neither checked nor counted: there the factored norm has lost four of float32's seven
digits, and near `κ = 1/eps_f32` all of them, a limit of computing DoRA without forming
`w + s·a@b`.

**Cost.** JAX compiles dominate, so each example compiles once and checks `DRAWS`
cases, and each function is compiled with `xla_backend_optimization_level=0` (LLVM's
optimisations off: the same HLO, the XLA-level rewrites included, compiled about twice
as fast). Hypothesis does not shrink a failure (each candidate would recompile); the
message names the problem and the seed, which reproduce it through `check`.

**Randomness.** Hypothesis is derandomised: every run checks the same examples, so a
CI run cannot fail by chance. `LORA_JAX_EXPLORE=1 python -m pytest
tests/test_properties.py` draws fresh examples on each run (how the NF4/DoRA widening
bug fixed in `lora_jax/_quant.py` was found); run it after changing a rule.
"""

import math
import os
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
import quax
from hypothesis import Phase, assume, given, settings, strategies as st

import lora_jax as lora

from .helpers import dense_lora
from .test_dot_general import dot_problems
from .test_layers import conv_delta
from .test_methods import dense, trainable, with_fields


DRAWS = 12  # value draws (cases) per compiled example
MIN_CASES = 1000
MIN_SHARE = 0.9  # of `examples × DRAWS`, per test
TOL_ULPS = 8
SUBNORMAL_ULPS = 64
KAPPA_MAX = 1e4  # DoRA draws more ill-conditioned than this are not checked
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
_EPS_F32 = float(jnp.finfo(jnp.float32).eps)


# ---------------------------------------------------------------------------------------
# A problem: everything static about one example (hashable: it keys the compile cache).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    kind: str  # "matrix", "conv" or "embedding"
    method: str  # "lora", "dora", "lokr", "loha"
    dtype: str  # the base weight's (and the input's)
    factor_dtype: str
    shape: tuple[int, ...]  # the stored weight
    rank: int
    op: tuple  # the operation, see `_operation`
    x_shape: tuple[int, ...] | None = None  # the floating input, if any
    ids: tuple | None = None  # (shape, low, high) of integer inputs, if any
    options: tuple = ()  # structural constructor options, as sorted items
    base: str = "plain"  # "plain", "int8", "nf4" or "nf4-dq"
    block: int = 2  # NF4's block size


_CLASSES = {
    "lora": lora.LoraArray,
    "dora": lora.DoraArray,
    "lokr": lora.LokrArray,
    "loha": lora.LohaArray,
}


def _build(p: Problem, w):
    kw = dict(rank=p.rank, key=jr.key(0), dtype=DTYPES[p.factor_dtype], **dict(p.options))
    if p.kind == "conv":
        return lora.LoraConvArray(w, **kw)
    if p.kind == "embedding":
        return lora.LoraEmbeddingArray(w, **kw)
    return _CLASSES[p.method](w, **kw)


def _quantise(p: Problem, w):
    if p.base == "int8":
        return lora.Int8Array.from_array(w)
    return lora.NF4Array.from_array(w, block_size=p.block, double_quant=p.base == "nf4-dq")


def _operation(p: Problem):
    """`(got, ref)`: the operation on the adapter (through quax) and on the dense
    weight, both `(weight, x, ids) -> y`."""
    kind, *args = p.op
    if kind == "dot":
        perm, dn, lhs = args

        def ref(w, x, ids):
            del ids
            if perm is not None:
                w = lax.transpose(w, perm)
            return lax.dot_general(w, x, dn) if lhs else lax.dot_general(x, w, dn)

    elif kind == "conv":
        strides, padding, lhs_dil, rhs_dil, dn, groups = args

        def ref(w, x, ids):
            del ids
            return lax.conv_general_dilated(
                x, w, strides, padding, lhs_dil, rhs_dil, dn, feature_group_count=groups
            )

    elif kind == "take":

        def ref(w, x, ids):
            return jnp.take(w, ids, axis=0)

    elif kind == "index":

        def ref(w, x, ids):
            return w[ids]

    elif kind == "static":
        (index,) = args
        if isinstance(index, tuple):  # (start, stop, step) per axis
            index = tuple(slice(*s) for s in index)

        def ref(w, x, ids):
            return w[index]

    elif kind == "dynamic_slice":
        (sizes,) = args

        def ref(w, x, ids):
            return lax.dynamic_slice(w, (ids[0], ids[1]), sizes)

    elif kind in ("vmap_inside", "vmap_outside"):

        def row(w, i):
            return w[i]

        def ref(w, x, ids):
            return jax.vmap(row, (None, 0))(w, ids)

        if kind == "vmap_outside":
            return (lambda w, x, ids: jax.vmap(quax.quaxify(row), (None, 0))(w, ids)), ref
    else:
        raise AssertionError(kind)
    return quax.quaxify(ref), ref


# ---------------------------------------------------------------------------------------
# Dense references and magnitudes
# ---------------------------------------------------------------------------------------


def _dense(v):
    """The adapted weight written plainly (stacked matrices one by one)."""
    if isinstance(v, lora.LoraConvArray):
        return v._w + v.scaling * conv_delta(v.a, v.b)
    if isinstance(v, lora.LoraEmbeddingArray):
        return dense_lora(v._w, v.a, v.b, v.scaling)
    if v._w.ndim > 2:
        return jax.vmap(_dense)(v)
    return dense(v)


def _dora_rows(v):
    """`(1/‖V‖, κ)` per output row of a DoRA adapter (float32 values), `V = w + s·a@b`:
    κ is `‖|w| + s·|a|@|b|‖² / ‖V‖²`, the sum of the absolute values of the terms of
    the expanded norm `‖w‖² + 2s⟨w, a@b⟩ + s²‖a@b‖²` over its value."""
    s = v.scaling[..., None, None]

    def rows(w, a, b):
        m = w + s * jnp.einsum("...or,...ri->...oi", a, b)
        return jnp.sum(m * m, axis=-1)

    den = rows(v._w, v.a, v.b)
    num = rows(jnp.abs(v._w), jnp.abs(v.a), jnp.abs(v.b))
    return 1 / jnp.sqrt(den), num / den


def _dora_magnitude(inv_norm):
    """DoRA as a polynomial in `m / ‖V‖` (a positive input) and the LoRA weight."""

    def magnitude(v):
        g = v.m * inv_norm
        return g[..., :, None] * dense_lora(v._w, v.a, v.b, v.scaling)

    return magnitude


def _vjp(fn, weight_of, v, x, ids, ct):
    """Output and cotangents (factors, input) of `fn(weight_of(v'), x, ids)` where `v'`
    is `v` with its trainable fields as the differentiated inputs."""
    fields = trainable(v)
    y, pullback = jax.vjp(lambda f, x: fn(weight_of(with_fields(v, f)), x, ids), fields, x)
    return y, pullback(ct)


def _float32(tree):
    return jtu.tree_map(
        lambda z: z.astype(jnp.float32) if jnp.issubdtype(z.dtype, jnp.floating) else z,
        tree,
    )


def _abs(tree):
    return jtu.tree_map(lambda z: jnp.abs(z) if jnp.issubdtype(z.dtype, jnp.floating) else z, tree)


# ---------------------------------------------------------------------------------------
# Compiling and running an example
# ---------------------------------------------------------------------------------------


class _Compiled:
    def __init__(self, p: Problem):
        dtype = DTYPES[p.dtype]
        template = eqx.filter_eval_shape(_build, p, jax.ShapeDtypeStruct(p.shape, dtype))
        self.leaves, self.treedef = jtu.tree_flatten_with_path(template)
        self.x = None if p.x_shape is None else jax.ShapeDtypeStruct(p.x_shape, dtype)
        self.ids = None if p.ids is None else jax.ShapeDtypeStruct(p.ids[0], jnp.int32)
        got, ref = _operation(p)
        self.y = jax.eval_shape(got, template, self.x, self.ids)

        def one(leaves, x, ids, ct):
            v = jtu.tree_unflatten(self.treedef, leaves)
            if p.base != "plain":
                v = eqx.tree_at(lambda v: v._w, v, _quantise(p, v._w))
            out = _vjp(got, lambda v: v, v, x, ids, ct)
            if p.base != "plain":
                v = eqx.tree_at(lambda v: v._w, v, v._w.dequantise())
            v, x, ct = _float32((v, x, ct))
            expected = _vjp(ref, _dense, v, x, ids, ct)
            kappa = jnp.zeros((), jnp.float32)
            magnitude = _dense
            if p.method == "dora" and p.kind == "matrix":
                inv_norm, rows = _dora_rows(v)
                kappa = jnp.max(rows)
                magnitude = _dora_magnitude(inv_norm)
            bound = _vjp(ref, magnitude, *_abs((v, x)), ids, _abs(ct))
            return out, expected, bound, kappa

        self.fn = jax.jit(jax.vmap(one), compiler_options=_FAST_COMPILE)
        self.problem = p

    def draw(self, seed: int):
        """`DRAWS` random values for every input, as arrays with a leading draw axis."""
        rng = np.random.default_rng(seed)

        def normal(struct):
            z = rng.standard_normal((DRAWS, *struct.shape))
            return jnp.asarray(z.astype(struct.dtype))

        leaves = []
        for path, struct in self.leaves:
            if path[0].name == "scaling":
                u = rng.uniform(0.5, 2.0, (DRAWS, *struct.shape))
                leaves.append(jnp.asarray(u.astype(struct.dtype)))
            else:
                leaves.append(normal(struct))
        x = None if self.x is None else normal(self.x)
        ids = None
        if self.ids is not None:
            shape, low, high = self.problem.ids
            ids = jnp.asarray(rng.integers(low, high, (DRAWS, *shape)), jnp.int32)
        return leaves, x, ids, normal(self.y)


_CACHE: dict[Problem, _Compiled] = {}


def check(p: Problem, seed: int, counter, name: str) -> None:
    """Runs `DRAWS` cases of `p`, fails on the first element out of tolerance and counts
    the cases checked."""
    if p not in _CACHE:
        _CACHE[p] = _Compiled(p)
    compiled = _CACHE[p]
    out, expected, bound, kappa = compiled.fn(*compiled.draw(seed))
    info = [jnp.finfo(DTYPES[d]) for d in (p.dtype, p.factor_dtype)]
    eps = max(float(i.eps) for i in info)
    # Results in float16's subnormal range lose relative precision: an absolute floor.
    floor = SUBNORMAL_ULPS * max(float(i.smallest_subnormal) for i in info)
    n = math.prod(p.shape)
    kappa = np.asarray(kappa, np.float64)
    keep = kappa <= KAPPA_MAX
    scale = (TOL_ULPS * eps + (n + TOL_ULPS * kappa) * _EPS_F32)[keep]
    names = ["forward", "factor gradients", "input gradient"]
    for what, g, e, m in zip(names, _parts(out), _parts(expected), _parts(bound)):
        for got, ref, mag in zip(jtu.tree_leaves(g), jtu.tree_leaves(e), jtu.tree_leaves(m)):
            got, ref, mag = (np.asarray(z, np.float64)[keep] for z in (got, ref, mag))
            _close(got, ref, mag, scale, floor, f"{what} of {p}, seed {seed}")
    counter.add(name, int(keep.sum()))


def _parts(out):
    y, (fields, x) = out
    return y, fields, x


def _close(got, ref, mag, scale, floor, what):
    """Elementwise `|got - ref| <= scale·mag + floor` (`scale` per draw), NaN where
    `ref` is NaN."""
    assert got.shape == ref.shape, what
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=what)
    limit = scale.reshape((-1,) + (1,) * (got.ndim - 1)) * mag + floor
    err = np.abs(got - ref)
    bad = (err > limit) & ~nan
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(nan, 0, err - limit)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements out of tolerance; worst at "
            f"{worst}: got {got[worst]}, expected {ref[worst]}, allowed error "
            f"{limit[worst]} (magnitude {mag[worst]})"
        )


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

_dtypes = st.sampled_from(list(DTYPES))


@st.composite
def _factor_dtype(draw, dtype):
    return draw(st.sampled_from([dtype, "float32"]))


@st.composite
def matrix_problems(draw, method: str, base: str = "plain"):
    """A (possibly stacked, possibly transposed) matrix adapter in a `dot_general`."""
    sizes, other_shape, dims, rank, lhs, _ = draw(dot_problems(0 if method == "lokr" else 2))
    n = len(sizes)
    lead = tuple(draw(st.permutations(range(n - 2))))
    swap = draw(st.booleans())
    perm = (*lead, n - 1, n - 2) if swap else (*lead, n - 2, n - 1)
    stored = [0] * n
    for i, d in enumerate(perm):
        stored[d] = sizes[i]
    ac, oc, ab, ob = dims
    dn = ((ac, oc), (ab, ob)) if lhs else ((oc, ac), (ob, ab))
    options = ()
    if method == "lokr":
        options = (
            ("decompose_both", draw(st.booleans())),
            ("decompose_factor", draw(st.sampled_from([-1, 1, 2, 3]))),
        )
    block = 2
    if base.startswith("nf4"):
        size = stored[-1] * stored[-2]
        assume(size % 2 == 0)
        block = max(b for b in (2, 4, 8) if size % b == 0)
    dtype = draw(_dtypes)
    return Problem(
        "matrix",
        method,
        dtype,
        draw(_factor_dtype(dtype)),
        tuple(stored),
        rank,
        ("dot", None if perm == tuple(range(n)) else perm, dn, lhs),
        x_shape=tuple(other_shape),
        options=options,
        base=base,
        block=block,
    )


@st.composite
def conv_problems(draw):
    """A conv kernel adapter in a `conv_general_dilated` with random layouts, strides,
    paddings, dilations and feature groups."""
    n = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 3)) for _ in range(n)]
    strides = tuple(draw(st.integers(1, 2)) for _ in range(n))
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(n))
    lhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(n))
    rhs_dil = tuple(draw(st.integers(1, 2)) for _ in range(n))
    spatial = [draw(st.integers(1, 5)) for _ in range(n)]
    for j in range(n):
        span = (spatial[j] - 1) * lhs_dil[j] + 1 + sum(padding[j])
        assume(span >= (kernel[j] - 1) * rhs_dil[j] + 1)
    batch = draw(st.integers(1, 2))
    lhs_spec = tuple(draw(st.permutations(range(n + 2))))
    out_spec = tuple(draw(st.permutations(range(n + 2))))
    x_shape = [0] * (n + 2)
    for size, d in zip([batch, c_in, *spatial], lhs_spec):
        x_shape[d] = size
    dn = lax.ConvDimensionNumbers(lhs_spec, tuple(range(n + 2)), out_spec)
    dtype = draw(_dtypes)
    return Problem(
        "conv",
        "lora",
        dtype,
        draw(_factor_dtype(dtype)),
        (c_out, c_in // groups, *kernel),
        draw(st.integers(1, 3)),
        ("conv", strides, padding, lhs_dil, rhs_dil, dn, groups),
        x_shape=tuple(x_shape),
        options=(("conv_form", draw(st.sampled_from(["peft", "balanced"]))),),
    )


@st.composite
def embedding_problems(draw):
    """An embedding table adapter: looked up every way, or in a product (a tied head)."""
    kind = draw(
        st.sampled_from(
            [
                "take",
                "index",
                "static",
                "dynamic_slice",
                "vmap_inside",
                "vmap_outside",
                "dot",
            ]
        )
    )
    dtype = draw(_dtypes)
    factor_dtype = draw(_factor_dtype(dtype))
    rank = draw(st.integers(1, 3))
    if kind == "dot":
        sizes, other_shape, dims, _, lhs, _ = draw(dot_problems(0))
        ac, oc, ab, ob = dims
        dn = ((ac, oc), (ab, ob)) if lhs else ((oc, ac), (ob, ab))
        swap = draw(st.booleans())
        shape = tuple(sizes[::-1]) if swap else tuple(sizes)
        op = ("dot", (1, 0) if swap else None, dn, lhs)
        return Problem(
            "embedding",
            "lora",
            dtype,
            factor_dtype,
            shape,
            rank,
            op,
            tuple(other_shape),
        )
    num, dim = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    ids_shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    ids = (ids_shape, -num, num)
    if kind == "take":
        ids = (ids_shape, -num, num + 2)  # beyond the table: filled with NaN
        op = ("take",)
    elif kind == "static":
        ids = None
        index = draw(
            st.one_of(
                st.integers(-num, num - 1),
                st.tuples(_slices(num), _slices(dim)),
            )
        )
        if isinstance(index, tuple):
            assume(all(len(range(*s)) > 0 for s in index))
            # The whole table is no operation: the adapter itself comes back.
            assume(index != ((0, num, 1), (0, dim, 1)))
        op = ("static", index)
    elif kind == "dynamic_slice":
        ids = ((2,), -2, max(num, dim) + 2)  # clamped into the table
        op = ("dynamic_slice", (draw(st.integers(1, num)), draw(st.integers(1, dim))))
    elif kind in ("vmap_inside", "vmap_outside"):
        ids = ((draw(st.integers(1, 4)),), -num, num)
        op = (kind,)
    else:
        op = ("index",)
    return Problem("embedding", "lora", dtype, factor_dtype, (num, dim), rank, op, ids=ids)


def _slices(size):
    """`(start, stop, step)` of a static slice of an axis of `size`."""
    return st.tuples(st.integers(0, size - 1), st.integers(1, size), st.integers(1, 2))


# ---------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------

_seeds = st.integers(0, 2**32 - 1)


# The same examples on every run (CI must not fail by chance); set
# LORA_JAX_EXPLORE=1 for fresh random examples on each run.
_EXPLORE = os.environ.get("LORA_JAX_EXPLORE", "") not in ("", "0")


def _settings(n):
    # No shrinking: a failure already names its problem and its seed, and shrinking
    # recompiles for every candidate (minutes).
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=n, deadline=None, phases=phases, derandomize=not _EXPLORE)


# Examples per test (and per parameter), and the parameters of each test.
EXAMPLES = {
    "test_matrix_methods": (24, ["lora", "dora", "lokr", "loha"]),
    "test_quantised_bases": (10, ["int8", "nf4", "nf4-dq"]),
    "test_conv": (25, [None]),
    "test_embedding": (25, [None]),
}


@pytest.fixture(autouse=True)
def _checks_its_share(request, property_cases):
    """After each property test: it checked at least `MIN_SHARE` of its cases."""
    before = property_cases.total
    yield
    name = request.node.originalname
    if name in EXAMPLES and not getattr(request.node, "_failed", False):
        checked = property_cases.total - before
        minimum = math.ceil(MIN_SHARE * EXAMPLES[name][0] * DRAWS)
        assert checked >= minimum, f"{request.node.name} checked {checked} cases"


@pytest.mark.parametrize("method", EXAMPLES["test_matrix_methods"][1])
@_settings(EXAMPLES["test_matrix_methods"][0])
@given(data=st.data(), seed=_seeds)
def test_matrix_methods(method, data, seed, property_cases):
    p = data.draw(matrix_problems(method))
    check(p, seed, property_cases, method)


@pytest.mark.parametrize("base", EXAMPLES["test_quantised_bases"][1])
@_settings(EXAMPLES["test_quantised_bases"][0])
@given(data=st.data(), seed=_seeds)
def test_quantised_bases(base, data, seed, property_cases):
    method = data.draw(st.sampled_from(["lora", "dora", "lokr", "loha"]))
    p = data.draw(matrix_problems(method, base))
    check(p, seed, property_cases, f"{base}+{method}")


@_settings(EXAMPLES["test_conv"][0])
@given(p=conv_problems(), seed=_seeds)
def test_conv(p, seed, property_cases):
    check(p, seed, property_cases, "conv")


@_settings(EXAMPLES["test_embedding"][0])
@given(p=embedding_problems(), seed=_seeds)
def test_embedding(p, seed, property_cases):
    check(p, seed, property_cases, "embedding")


def test_enough_cases():
    """The per-test minima add up to `MIN_CASES`, and every test has its entry."""
    tests = {name for name in globals() if name.startswith("test_")}
    assert tests - {"test_enough_cases"} == set(EXAMPLES)
    minimum = sum(math.ceil(MIN_SHARE * n * DRAWS) * len(params) for n, params in EXAMPLES.values())
    assert minimum >= MIN_CASES, minimum
