"""One table of adapter variants (method × options), each run through the same checks
against the method's dense formula (tests/helpers.py)."""

import math
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import quax

import lora_jax as lora

from .helpers import (
    dense_dora,
    dense_loha,
    dense_lokr,
    dense_lora,
    jaxpr_eqns,
    randomise_factors,
    tree_allclose,
)


OUT, IN = 16, 24  # LoKr splits these as (4, 4) and (4, 6)


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    rank: int
    options: dict = field(default_factory=dict)
    alpha: float | None = 4.0
    noop: bool = True  # whether the adapter is a no-op at initialisation
    stacked: bool = True  # whether stacked (leading-dimension) weights are supported

    def build(self, w, key):
        cls = {
            "lora": lora.LoraArray,
            "dora": lora.DoraArray,
            "lokr": lora.LokrArray,
            "loha": lora.LohaArray,
        }[self.method]
        return cls(w, rank=self.rank, alpha=self.alpha, key=key, **self.options)


VARIANTS = [
    Variant("lora", "lora", 3),
    Variant("lora-rslora", "lora", 3, {"rslora": True}),
    Variant("lora-peft-init", "lora", 2, {"init": "peft"}),
    Variant("dora", "dora", 3),
    Variant("dora-rslora-peft", "dora", 2, {"rslora": True, "init": "peft"}),
    Variant("lokr", "lokr", 2),
    Variant("lokr-full-w2", "lokr", 4),
    Variant("lokr-decompose-both", "lokr", 1, {"decompose_both": True}),
    Variant("lokr-factor", "lokr", 2, {"decompose_factor": 2}),
    Variant("lokr-lycoris", "lokr", 2, {"init_weights": "lycoris"}),
    Variant("lokr-random", "lokr", 2, {"init_weights": False}, noop=False),
    Variant("loha", "loha", 2),
    Variant("loha-random", "loha", 3, {"init_weights": False}, noop=False),
]
IDS = [v.name for v in VARIANTS]


def dense(v):
    """The adapted matrix written plainly from the adapter's own fields."""
    if isinstance(v, lora.LoraArray):
        return dense_lora(v._w, v.a, v.b, v.scaling)
    if isinstance(v, lora.DoraArray):
        return dense_dora(v._w, v.a, v.b, v.m, v.scaling)
    if isinstance(v, lora.LokrArray):
        w1 = v.w1 if v.w1 is not None else v.w1_a @ v.w1_b
        w2 = v.w2 if v.w2 is not None else v.w2_a @ v.w2_b
        return dense_lokr(v._w, w1, w2, v.scaling)
    if isinstance(v, lora.LohaArray):
        return dense_loha(v._w, v.w1a, v.w1b, v.w2a, v.w2b, v.scaling)
    raise TypeError(type(v))


def trainable(v) -> dict:
    return {f: getattr(v, f) for f in type(v).trainable_fields if getattr(v, f) is not None}


def with_fields(v, fields: dict):
    names = list(fields)
    return eqx.tree_at(lambda x: [getattr(x, n) for n in names], v, [fields[n] for n in names])


def _factorization(dim, factor=-1):
    """PEFT's split, by brute force: (factor, dim // factor) if it divides, else the
    largest divisor at most sqrt(dim) (and at most `factor`), paired."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m = max(d for d in range(1, dim + 1) if dim % d == 0 and d * d <= dim and d <= limit)
    return m, dim // m


def peft_param_count(variant: Variant, out: int, inp: int) -> int:
    """Trainable parameters of one adapted `Linear(inp, out)`, PEFT's formulas."""
    r = variant.rank
    if variant.method == "lora":
        return r * (out + inp)
    if variant.method == "dora":
        return r * (out + inp) + out
    if variant.method == "loha":
        return 2 * r * (out + inp)
    factor = variant.options.get("decompose_factor", -1)
    l, k = _factorization(out, factor)
    p, q = _factorization(inp, factor)
    if variant.options.get("decompose_both", False) and r < max(l, p) / 2:
        n1 = r * (l + p)
    else:
        n1 = l * p
    n2 = r * (k + q) if r < max(k, q) / 2 else k * q
    return n1 + n2


def _loraify(model, variant, getkey):
    """`model` adapted by `loraify` with the variant's method and options."""
    opts = dict(rank=variant.rank, alpha=variant.alpha, method=variant.method)
    return lora.loraify(model, key=getkey(), **opts, **variant.options)


def _check_gradients(v, x):
    """The gradients of a loss through `x @ v.T`, wrt the trainable fields and `x`,
    against the dense reference's."""

    def loss(fields, x):
        out = quax.quaxify(lambda w, x: x @ w.T)(with_fields(v, fields), x)
        return jnp.sum(jnp.sin(out))

    def dense_loss(fields, x):
        return jnp.sum(jnp.sin(x @ dense(with_fields(v, fields)).T))

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable(v), x)
    expected = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(trainable(v), x)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        # float32 sums of O(50) terms, summed in another order by each side (and each
        # backend: a GPU's differ by up to 1.6e-5 of the largest entry): tolerance
        # relative to the largest entry.
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=3e-5 * (1 + np.abs(e).max()))


def _adapter(variant, getkey, shape=(OUT, IN)):
    w = jr.normal(getkey(), shape)
    return randomise_factors(variant.build(w, getkey()), getkey())


FORMS = {
    "x@W.T": lambda w, x: x @ w.T,
    "W@x.T": lambda w, x: w @ x.T,
    "vmap W@x": lambda w, x: jax.vmap(lambda v: w @ v)(x),
    "vmap out-axis": lambda w, x: jax.vmap(lambda v: w @ v, out_axes=1)(x),
    "einsum": lambda w, x: jnp.einsum("oi,bi->ob", w, x),
    # Contracts the output units: DoRA's fallback, LoKr's transposed product.
    "y@W": lambda w, x: (x @ w.T) @ w,
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_forward_matches_dense(variant, form, getkey):
    v = _adapter(variant, getkey)
    x = jr.normal(getkey(), (5, IN))
    fn = FORMS[form]
    got = jax.jit(quax.quaxify(fn))(v, x)
    np.testing.assert_allclose(got, fn(dense(v), x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_gradients_match_dense(variant, getkey):
    _check_gradients(_adapter(variant, getkey), jr.normal(getkey(), (5, IN)))


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_init_is_noop(variant, getkey):
    w = jr.normal(getkey(), (OUT, IN))
    v = variant.build(w, getkey())
    x = jr.normal(getkey(), (3, IN))
    got = jax.jit(quax.quaxify(lambda w, x: x @ w.T))(v, x)
    np.testing.assert_allclose(got, x @ dense(v).T, rtol=1e-5, atol=1e-5)
    if variant.noop:
        np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)
    else:
        assert not np.allclose(got, x @ w.T, atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_materialise_equals_forward(variant, getkey):
    model = eqx.nn.Linear(IN, OUT, key=getkey())
    model = _loraify(model, variant, getkey)
    model = eqx.tree_at(lambda m: m.weight, model, randomise_factors(model.weight, getkey()))
    x = jr.normal(getkey(), (IN,))
    merged = lora.materialise(model)
    assert not lora.is_adapter(merged.weight)
    np.testing.assert_allclose(
        eqx.filter_jit(quax.quaxify(model))(x), merged(x), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(merged.weight, dense(model.weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_training_lowers_loss_with_frozen_base(variant, getkey):
    model = eqx.nn.Linear(IN, OUT, key=getkey())
    model = _loraify(model, variant, getkey)
    # A reachable target: the same adapter with its trainable fields moved at random.
    fields = trainable(model.weight)
    keys = dict(zip(fields, jr.split(getkey(), len(fields))))
    teacher = with_fields(
        model.weight, {f: x + 0.3 * jr.normal(keys[f], x.shape) for f, x in fields.items()}
    )
    x = jr.normal(getkey(), (32, IN))
    y = x @ dense(teacher).T + model.bias[None]
    params, frozen = lora.partition(model)
    opt = optax.adam(1e-2)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)

    def loss(params):
        m = eqx.combine(params, frozen)
        return jnp.mean((jax.vmap(quax.quaxify(m))(x) - y) ** 2)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, value

    first = loss(params)
    for _ in range(40):
        params, state, _ = step(params, state)
    assert loss(params) < 0.5 * first
    trained = eqx.combine(params, frozen)
    np.testing.assert_array_equal(trained.weight._w, model.weight._w)
    np.testing.assert_array_equal(trained.bias, model.bias)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_parameter_count_matches_peft(variant, getkey):
    mlp = eqx.nn.MLP(IN, OUT, width_size=OUT, depth=1, key=getkey())
    model = _loraify(mlp, variant, getkey)
    expected = peft_param_count(variant, OUT, IN) + peft_param_count(variant, OUT, OUT)
    assert lora.summary(model).trainable == expected


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_stacked_weights(variant, getkey):
    w = jr.normal(getkey(), (3, OUT, IN))
    if not variant.stacked:
        with pytest.raises(ValueError, match="`weight`"):
            variant.build(w, getkey())
        return
    v = randomise_factors(variant.build(w, getkey()), getkey())
    d = _stack_dense(v)
    x = jr.normal(getkey(), (3, IN))
    fn = lambda w, x: jax.vmap(lambda wi, xi: wi @ xi)(w, x)
    np.testing.assert_allclose(jax.jit(quax.quaxify(fn))(v, x), fn(d, x), rtol=1e-4, atol=1e-4)
    fn2 = lambda w, x: jnp.einsum("loi,bi->lbo", w, x)
    np.testing.assert_allclose(jax.jit(quax.quaxify(fn2))(v, x), fn2(d, x), rtol=1e-4, atol=1e-4)


def _stack_dense(v):
    n = v.shape[0]
    out = []
    for i in range(n):
        vi = jax.tree.map(lambda x: x if x.ndim == 0 else x[i], v)
        out.append(dense(vi))
    return jnp.stack(out)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_multihead_attention(variant, getkey):
    mha = eqx.nn.MultiheadAttention(num_heads=2, query_size=OUT, key=getkey())
    model = _loraify(mha, variant, getkey)
    leaves, treedef = jax.tree.flatten(model, is_leaf=lora.is_adapter)
    assert sum(map(lora.is_adapter, leaves)) == 4
    model = jax.tree.unflatten(
        treedef,
        [
            randomise_factors(x, jr.fold_in(getkey(), i)) if lora.is_adapter(x) else x
            for i, x in enumerate(leaves)
        ],
    )
    q = jr.normal(getkey(), (5, OUT))
    kv = jr.normal(getkey(), (7, OUT))
    got = eqx.filter_jit(quax.quaxify(model))(q, kv, kv)
    expected = lora.materialise(model)(q, kv, kv)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, mha(q, kv, kv), atol=1e-3)


def test_lokr_factorization_matches_peft_examples():
    from lora_jax._lokr import factorization

    # The examples in PEFT's docstring, and the unsorted divisible case.
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(12, 4) == (4, 3)
    for dim in range(1, 200):
        for factor in (-1, 1, 2, 3, 5, 8):
            assert factorization(dim, factor) == _factorization(dim, factor), (dim, factor)


LOKR_VARIANTS = [v for v in VARIANTS if v.method == "lokr"]


@pytest.mark.parametrize("variant", LOKR_VARIANTS, ids=[v.name for v in LOKR_VARIANTS])
def test_lokr_gpu_contraction_matches_dense(variant, getkey, monkeypatch, request):
    """On a GPU a small `w1` is contracted elementwise instead of by a product batched
    over the rows (`lax.platform_dependent`, so CI's CPU never compiles it): forced
    here, its forward and gradients equal the dense reference's."""
    from lora_jax import _lokr, _rules

    taken = []

    def gpu_branch(y, *, default, gpu):
        taken.append(y.shape)
        return gpu(y)

    monkeypatch.setattr(_lokr, "_per_platform", gpu_branch)
    # The rules run under a cached jit: trace them afresh here, and leave no trace of
    # the forced branch behind for later tests.
    _rules._cached_dot.clear_cache()
    request.addfinalizer(_rules._cached_dot.clear_cache)
    v = _adapter(variant, getkey)
    x = jr.normal(getkey(), (5, IN))
    np.testing.assert_allclose(
        quax.quaxify(jax.vmap(lambda w, x: w @ x, in_axes=(None, 0)))(v, x),
        x @ dense(v).T,
        rtol=1e-4,
        atol=1e-4,
    )
    _check_gradients(v, x)
    assert taken  # every variant here has a 4×4 `w1`


def test_lokr_gpu_contraction_in_bfloat16(getkey):
    """The GPU's elementwise contraction of a small `w1` takes bf16 operands (it used
    to fail under strict dtype promotion, which the tests run with) and accumulates in
    float32."""
    from lora_jax._lokr import _middle_elementwise

    m = jr.normal(getkey(), (4, 4)).astype(jnp.bfloat16)
    y = jr.normal(getkey(), (8, 4, 16)).astype(jnp.bfloat16)
    got = _middle_elementwise(m, y)
    assert got.dtype == jnp.bfloat16
    want = jnp.einsum("qp,rpn->rqn", m.astype(jnp.float32), y.astype(jnp.float32))
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=1e-2, atol=1e-2)


def test_lokr_lowering_picks_the_gpu_contraction_for_cuda(getkey):
    """The branch is chosen per platform at lowering: lowered for CUDA (no GPU needed),
    the small `w1` is a reduction over the broadcast product and no batched product is
    left; lowered for the CPU, the batched product stays and no reduction appears."""
    v = lora.LokrArray(jr.normal(getkey(), (OUT, IN)), rank=2, decompose_factor=4, key=getkey())
    assert v.w1 is not None and v.w1.size <= 16
    x = jnp.ones((5, IN))
    traced = jax.jit(quax.quaxify(lambda v, x: x @ v.T)).trace(v, x)

    def lowered(platform):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        return [line for line in text.splitlines() if "dot_general" in line or "reduce" in line]

    cuda, cpu = lowered("cuda"), lowered("cpu")
    assert not any("batching_dims" in line for line in cuda)
    assert any("stablehlo.reduce" in line for line in cuda)
    assert any("batching_dims" in line for line in cpu)
    assert not any("stablehlo.reduce" in line for line in cpu)


def test_lokr_small_w1_mixes_a_rank_sized_tensor(getkey):
    """With `w2` held as two thin factors, `w1` goes between them: the product batched
    over the rows (`w1`'s) has the rank as its last dimension, not `w2`'s output size,
    so no output-sized intermediate besides the result is made. Its values and
    gradients equal the dense reference's."""
    out, inp, rank = 64, 48, 3  # (4, 16) and (4, 12), w2 held at rank 3
    v = lora.LokrArray(
        jr.normal(getkey(), (out, inp)),
        rank=rank,
        decompose_factor=4,
        init_weights=False,
        key=getkey(),
    )
    assert v.w2 is None and v.w1.shape == (4, 4)
    x = jr.normal(getkey(), (5, inp))
    f = quax.quaxify(jax.vmap(lambda w, x: w @ x, in_axes=(None, 0)))
    batched = [
        e.outvars[0].aval.shape
        for e in jaxpr_eqns(jax.make_jaxpr(f)(v, x).jaxpr)
        if e.primitive.name == "dot_general" and e.params["dimension_numbers"][1][0]
    ]
    assert batched == [(5, 4, rank)]
    np.testing.assert_allclose(f(v, x), x @ dense(v).T, rtol=1e-4, atol=1e-4)
    _check_gradients(v, x)


def test_lokr_init_weights_zero_the_right_factor(getkey):
    w = jr.normal(getkey(), (OUT, IN))
    v = lora.LokrArray(w, rank=1, decompose_both=True, key=getkey())
    assert v.w1 is None and not np.any(v.w1_a) and np.all(v.w1_b != 0)
    assert v.w2 is None and np.all(v.w2_a != 0) and np.all(v.w2_b != 0)
    v = lora.LokrArray(w, rank=1, decompose_both=True, init_weights="lycoris", key=getkey())
    assert np.all(v.w1_a != 0) and not np.any(v.w2_b) and np.all(v.w2_a != 0)
    # Kaiming-uniform(a=sqrt(5)) bounds: 1/sqrt(fan_in).
    assert np.abs(v.w1_b).max() <= 1 / math.sqrt(v.w1_b.shape[1])


def test_dora_magnitude_starts_at_row_norms(getkey):
    w = jr.normal(getkey(), (2, OUT, IN))
    v = lora.DoraArray(w, rank=2, init="peft", key=getkey())
    np.testing.assert_allclose(v.m, jnp.linalg.norm(w, axis=-1), rtol=1e-5)
    v = randomise_factors(v, getkey())
    np.testing.assert_allclose(
        v.norm(), jnp.linalg.norm(dense_lora(w, v.a, v.b, v.scaling), axis=-1), rtol=1e-4
    )


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("lokr", {"init": "peft"}, "`init`"),
        ("lokr", {"rslora": True}, "`rslora=True`"),
        ("lokr", {"decompose_factor": 0}, "`decompose_factor`"),
        ("lokr", {"init_weights": "gaussian"}, "`init_weights`"),
        ("lokr", {"rank_dropout": 1.5}, "`rank_dropout`"),
        ("loha", {"module_dropout": 1.0}, "`module_dropout`"),
        ("lora", {"dropout": -0.5}, "`dropout`"),
        ("loha", {"init": "gaussian"}, "`init`"),
    ],
)
def test_bad_options_raise(method, options, match, getkey):
    with pytest.raises((ValueError, TypeError), match=match):
        lora.loraify(
            eqx.nn.Linear(IN, OUT, key=getkey()), rank=2, key=getkey(), method=method, **options
        )


# ---------------------------------------------------------------------------------------
# Dropout: the identity without a key; with one, the dense formula with the same masks.
# ---------------------------------------------------------------------------------------


def _keep(key, rate, shape):
    return jr.bernoulli(key, 1 - rate, shape).astype(jnp.float32)


def _dense_dropout_forward(v, x):
    """`x @ w'.T` under dropout, written plainly from PEFT's definitions, drawing the
    masks from the adapter's key as the documented rule does."""
    key = v.dropout_key
    if isinstance(v, lora.LoraArray):
        xd = x * _keep(key, v.dropout, x.shape) / (1 - v.dropout)
        return x @ v._w.T + v.scaling * (xd @ (v.a @ v.b).T)
    if isinstance(v, lora.DoraArray):
        xd = x * _keep(key, v.dropout, x.shape) / (1 - v.dropout)
        g = v.m / jnp.linalg.norm(dense_lora(v._w, v.a, v.b, v.scaling), axis=-1)
        return (
            x @ v._w.T + (g - 1)[None] * (xd @ v._w.T) + g[None] * v.scaling * (xd @ (v.a @ v.b).T)
        )
    k_rank, k_module = jr.split(key)
    if isinstance(v, lora.LokrArray):
        delta = dense_lokr(jnp.zeros_like(v._w), *v.factors(), v.scaling)
        rescale = v.rank_dropout_scale
    else:
        delta = dense_loha(jnp.zeros_like(v._w), v.w1a, v.w1b, v.w2a, v.w2b, v.scaling)
        rescale = True
    rows = _keep(k_rank, v.rank_dropout, (OUT,)) if v.rank_dropout else jnp.ones(OUT)
    if rescale and v.rank_dropout:
        rows = rows / jnp.mean(rows)
    keep = _keep(k_module, v.module_dropout, ()) if v.module_dropout else jnp.ones(())
    return x @ v._w.T + keep * (x @ (rows[:, None] * delta).T)


DROPOUT_VARIANTS = [
    Variant("lora-dropout", "lora", 3, {"dropout": 0.5}),
    Variant("dora-dropout", "dora", 3, {"dropout": 0.5}),
    Variant("lokr-rank-dropout", "lokr", 2, {"rank_dropout": 0.5}),
    Variant(
        "lokr-rank-dropout-scale", "lokr", 2, {"rank_dropout": 0.5, "rank_dropout_scale": True}
    ),
    Variant("lokr-module-dropout", "lokr", 2, {"module_dropout": 0.5, "rank_dropout": 0.3}),
    Variant("loha-rank-dropout", "loha", 2, {"rank_dropout": 0.5}),
    Variant("loha-module-dropout", "loha", 2, {"module_dropout": 0.5}),
]


@pytest.mark.parametrize("variant", DROPOUT_VARIANTS, ids=[v.name for v in DROPOUT_VARIANTS])
def test_dropout(variant, getkey):
    v = _adapter(variant, getkey)
    x = jr.normal(getkey(), (6, IN))
    fn = jax.jit(quax.quaxify(lambda w, x: x @ w.T))
    # No key: the identity (inference).
    np.testing.assert_allclose(fn(v, x), x @ dense(v).T, rtol=1e-4, atol=1e-4)
    outs = []
    for seed in range(4):
        vk = lora.with_dropout_keys(v, jr.key(seed))
        got = fn(vk, x)
        np.testing.assert_allclose(got, _dense_dropout_forward(vk, x), rtol=1e-4, atol=1e-4)
        outs.append(got)
    # The masks differ from key to key.
    assert any(not np.allclose(outs[0], o) for o in outs[1:])
    # Taking the keys away again restores inference.
    np.testing.assert_allclose(fn(lora.with_dropout_keys(vk, None), x), fn(v, x))


def test_dropout_in_a_training_step(getkey):
    mlp = eqx.nn.MLP(IN, OUT, width_size=OUT, depth=2, key=getkey())
    model = lora.loraify(mlp, rank=2, key=getkey(), dropout=0.3)
    params, frozen = lora.partition(model)
    x = jr.normal(getkey(), (8, IN))

    @eqx.debug.assert_max_traces(max_traces=1)
    def loss(params, key):
        m = lora.with_dropout_keys(eqx.combine(params, frozen), key)
        keys = [l.weight.dropout_key for l in m.layers]
        assert all(k is not None for k in keys)
        return jnp.sum(quax.quaxify(lambda m, x: jax.vmap(lambda xi: m(xi))(x))(m, x) ** 2)

    grad = jax.jit(jax.grad(loss))
    g1, g2 = grad(params, jr.key(1)), grad(params, jr.key(2))
    assert not tree_allclose(g1, g2)
    assert tree_allclose(g1, grad(params, jr.key(1)))


def test_dropout_arguments_are_checked(getkey):
    w = jr.normal(getkey(), (OUT, IN))
    with pytest.raises(ValueError, match="`dropout`"):
        lora.LoraArray(w, rank=2, dropout=1.0, key=getkey())
    with pytest.raises(ValueError, match="`rank_dropout`"):
        lora.LokrArray(w, rank=2, rank_dropout=-0.1, key=getkey())
    with pytest.raises(TypeError, match="`key`"):
        lora.with_dropout_keys(lora.LoraArray(w, rank=2, key=getkey()), 3)


# --- LoKr on a stack of matrices --------------------------------------------------------

STACK_PRODUCTS = {
    # the stack a batch dimension of the product, paired with the input's
    "batch": ("loi,lbi->lbo", (3, 5, IN)),
    # ...with the input's batch dimension elsewhere
    "batch-moved": ("loi,bli->blo", (5, 3, IN)),
    # the stack free, the input shared by every matrix
    "free": ("loi,bi->lbo", (5, IN)),
    # contracting the output dimension (the transpose's product)
    "transposed": ("loi,lbo->lbi", (3, 5, OUT)),
    # summing over the stack: the update formed alone
    "over-stack": ("loi,l->oi", (3,)),
}


@pytest.mark.parametrize("product", list(STACK_PRODUCTS))
@pytest.mark.parametrize("options", [{}, {"decompose_both": True}], ids=["w1", "w1-decomposed"])
def test_stacked_lokr_products_and_gradients(product, options, getkey):
    """A stack of LoKr matrices in every layout of product: forward and factor
    gradients equal each matrix's dense `w + s·(w1 ⊗ w2)`."""
    spec, x_shape = STACK_PRODUCTS[product]
    w = jr.normal(getkey(), (3, OUT, IN))
    v = randomise_factors(lora.LokrArray(w, rank=1, key=getkey(), **options), getkey())
    v = eqx.tree_at(lambda v: v.scaling, v, jnp.asarray([0.5, 1.0, 2.0]))
    x = jr.normal(getkey(), x_shape)
    f = lambda w, x: jnp.einsum(spec, w, x)  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(quax.quaxify(f))(v, x), f(_stack_dense(v), x), rtol=1e-4, atol=1e-4
    )
    fields = trainable(v)
    target = jr.normal(getkey(), jax.eval_shape(f, w, x).shape)

    def loss(fields, dense: bool):
        u = with_fields(v, fields)
        y = f(_stack_dense(u), x) if dense else quax.quaxify(f)(u, x)
        return jnp.sum((y - target) ** 2)

    got = jax.jit(jax.grad(lambda p: loss(p, False)))(fields)
    want = jax.grad(lambda p: loss(p, True))(fields)
    for name in fields:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_stacked_lokr_scan_over_layers(getkey):
    """`loraify(method="lokr")` on a model whose blocks are stacked and run with
    `lax.scan`: every leaf of the adapter has the stacking axis, each matrix its own
    factors, and the forward pass and gradients equal the materialised model's."""

    class Model(eqx.Module):
        layers: eqx.nn.Linear

        def __init__(self, key):
            self.layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(IN, IN, key=k))(jr.split(key, 4))

        def __call__(self, x):
            params, static = eqx.partition(self.layers, eqx.is_array)
            body = lambda x, p: (jnp.tanh(eqx.combine(p, static)(x)), None)  # noqa: E731
            return jax.lax.scan(body, x, params)[0]

    model = lora.loraify(Model(getkey()), rank=2, method="lokr", key=getkey())
    v = model.layers.weight
    assert isinstance(v, lora.LokrArray) and v.scaling.shape == (4,)
    assert all(x.shape[0] == 4 for x in jax.tree.leaves(v))
    assert not np.allclose(v.w2_a[0], v.w2_a[1])  # its own draw per matrix
    model = eqx.tree_at(lambda m: m.layers.weight, model, randomise_factors(v, getkey()))
    x = jr.normal(getkey(), (IN,))
    params, frozen = lora.partition(model)

    def loss(params, run):
        return jnp.sum(run(eqx.combine(params, frozen))(x) ** 2)

    got = jax.jit(lambda p: loss(p, quax.quaxify))(params)
    want = loss(params, lora.materialise)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    g = jax.jit(jax.grad(lambda p: loss(p, quax.quaxify)))(params)
    g_ref = jax.grad(lambda p: loss(p, lora.materialise))(params)
    assert tree_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_stacked_lokr_dropout_per_matrix(getkey):
    """With a dropout key, each matrix of a stack draws its own module dropout."""
    w = jr.normal(getkey(), (16, OUT, IN))
    v = randomise_factors(lora.LokrArray(w, rank=2, key=getkey(), module_dropout=0.5), getkey())
    x = jr.normal(getkey(), (16, IN))
    f = quax.quaxify(lambda w, x: jnp.einsum("loi,li->lo", w, x))
    with jax.default_matmul_precision("highest"):  # a GPU's TF32 aside
        base = jnp.einsum("loi,li->lo", w, x)
        on = f(v, x) - base
        off = f(lora.with_dropout_keys(v, getkey()), x) - base
    skipped = np.all(np.abs(off) < 1e-4 * float(jnp.abs(on).max()), axis=-1)
    assert 0 < skipped.sum() < 16  # some matrices skipped their update, not all
    np.testing.assert_allclose(off[~skipped], on[~skipped], rtol=1e-4, atol=1e-4)


DROPOUTS = {
    "lora": {"dropout": 0.5},
    "dora": {"dropout": 0.5},
    "loha": {"rank_dropout": 0.5, "module_dropout": 0.3},
    "lokr": {"rank_dropout": 0.5, "module_dropout": 0.3},
}


@pytest.mark.parametrize("method", list(DROPOUTS))
def test_stacked_dropout_scan_and_whole_stack_agree(method, getkey):
    """`with_dropout_keys` gives a stacked adapter one key per matrix: `lax.scan` over
    the stack (each step's adapter holds its matrix's key) and a product with the
    whole stack at once draw the same masks, and the dropout acts."""
    cls = {"lora": lora.LoraArray, "dora": lora.DoraArray}.get(method)
    cls = cls or {"loha": lora.LohaArray, "lokr": lora.LokrArray}[method]
    w = jr.normal(getkey(), (6, OUT, IN))
    v = randomise_factors(cls(w, rank=2, key=getkey(), **DROPOUTS[method]), getkey())
    keyed = lora.with_dropout_keys(v, getkey())
    assert keyed.dropout_key.shape == (6,)
    x = jr.normal(getkey(), (6, IN))
    with jax.default_matmul_precision("highest"):
        whole = jax.jit(quax.quaxify(lambda w, x: jnp.einsum("loi,li->lo", w, x)))(keyed, x)
        step = lambda c, wx: (c, wx[0] @ wx[1])  # noqa: E731
        scan = jax.jit(quax.quaxify(lambda w, x: jax.lax.scan(step, 0, (w, x))[1]))(keyed, x)
        plain = quax.quaxify(lambda w, x: jnp.einsum("loi,li->lo", w, x))(v, x)
    np.testing.assert_allclose(whole, scan, rtol=1e-5, atol=1e-5)
    assert not np.allclose(whole, plain, atol=1e-4)  # the dropout acted
