"""Invariants over every method: frozen leaves get exactly zero gradient and stay bitwise
unchanged through training even when the whole model is differentiated; adapters over
quantised bases (and stacked adapters) are no-ops at initialisation; merging then
subtracting the update restores the base weight (bitwise where the update is exactly
zero, within the rounding of one addition otherwise; DoRA by PEFT's unmerge formula);
`materialise(..., safe_merge=True)` refuses a merged weight that is not finite.

Already covered elsewhere, not repeated here: training through `lora_jax.partition`
keeps `w` and the biases bitwise (tests/test_methods.py, tests/test_layers.py,
tests/test_loraify.py, tests/test_quant.py); no-op at init of every LoRA/DoRA/LoKr/LoHa
variant and of conv and embedding adapters with each init (tests/test_methods.py,
tests/test_layers.py); `unloraify` hands back the original weight object
(tests/test_transforms.py).

lora_jax has no `unmerge`: `materialise` returns a new model and the adapted one still
holds its base weight, so nothing is lost by merging. The round trip below is the
numerical check PEFT's `unmerge` stands for.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
import quax

import lora_jax as lora

from .helpers import randomise_factors, randomise_model
from .test_methods import VARIANTS, Variant


# ---------------------------------------------------------------------------------------
# Models: one row per method and base
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    make: Callable[[Any], Any]  # key -> plain model
    input: Callable[[Any], Any]  # key -> a batch of inputs
    options: dict
    quantise: str | None = None


def _mlp(key):
    return eqx.nn.MLP(8, 4, width_size=8, depth=1, key=key)


def _vectors(key):
    return jr.normal(key, (6, 8))


def _conv(key):
    return eqx.nn.Conv2d(2, 3, 3, padding=1, key=key)


def _embedding(key):
    return eqx.nn.Embedding(10, 4, key=key)


ROWS = [
    Row("lora", _mlp, _vectors, dict(method="lora")),
    Row("dora", _mlp, _vectors, dict(method="dora")),
    Row("lokr", _mlp, _vectors, dict(method="lokr", decompose_both=True)),
    Row("loha", _mlp, _vectors, dict(method="loha")),
    Row(
        "conv",
        _conv,
        lambda k: jr.normal(k, (3, 2, 5, 5)),
        dict(where=lambda n, l: True),
    ),
    Row(
        "embedding",
        _embedding,
        lambda k: jr.randint(k, (6,), 0, 10),
        dict(where=lambda n, l: True),
    ),
    Row("int8+lora", _mlp, _vectors, dict(method="lora"), "int8"),
    Row("nf4+dora", _mlp, _vectors, dict(method="dora"), "nf4"),
    Row("nf4+loha", _mlp, _vectors, dict(method="loha"), "nf4"),
    Row("int8+lokr", _mlp, _vectors, dict(method="lokr"), "int8"),
]


def _adapt(row: Row, key):
    k1, k2 = jr.split(key)
    model = row.make(k1)
    if row.quantise is not None:
        model = lora.quantise(model, method=row.quantise, block_size=8)
    return model, lora.loraify(model, rank=2, alpha=4.0, key=k2, **row.options)


def _forward(model, x):
    return quax.quaxify(lambda m, x: jax.vmap(m)(x))(model, x)


def _frozen_fields(model):
    """`(name, leaf)` for every array an adapter holds outside its trainable fields:
    base weights (quantised codes and constants included) and scalings."""
    out = []
    for path, v in jtu.tree_flatten_with_path(model, is_leaf=lora.is_adapter)[0]:
        if not lora.is_adapter(v):
            continue
        for p, leaf in jtu.tree_flatten_with_path(v)[0]:
            field = p[0].name
            if field not in type(v).trainable_fields and eqx.is_array(leaf):
                out.append((jtu.keystr(path + p), leaf))
    return out


@pytest.fixture(params=ROWS, ids=[r.id for r in ROWS])
def row(request):
    return request.param


# ---------------------------------------------------------------------------------------
# Frozen leaves
# ---------------------------------------------------------------------------------------


def test_frozen_leaves_unchanged_training_the_whole_model(row, getkey):
    """The whole model differentiated (no `partition`): every frozen leaf of every
    adapter gets exactly zero gradient, so Adam leaves it bitwise unchanged, while the
    factors train and the loss falls."""
    _, adapted = _adapt(row, getkey())
    x = row.input(getkey())
    target = eqx.filter_jit(_forward)(randomise_model(adapted, getkey()), x)

    def loss(model):
        return jnp.mean((_forward(model, x) - target) ** 2)

    opt = optax.adam(3e-2)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(eqx.filter(adapted, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        value, grads = eqx.filter_value_and_grad(loss)(model)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(model, updates), state, value, grads

    model, losses = adapted, []
    for i in range(12):
        model, state, value, grads = step(model, state)
        losses.append(float(value))
        if i == 0:
            for name, g in _frozen_fields(grads):
                if jnp.issubdtype(g.dtype, jnp.inexact):
                    assert not np.any(np.asarray(g)), f"nonzero gradient on frozen {name}"
    assert losses[-1] < losses[0]
    before, after = _frozen_fields(adapted), _frozen_fields(model)
    assert [n for n, _ in before] == [n for n, _ in after]
    for (name, a), (_, b) in zip(before, after):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), name
    trained = jtu.tree_leaves(lora.partition(model)[0])
    initial = jtu.tree_leaves(lora.partition(adapted)[0])
    assert not all(np.array_equal(a, b) for a, b in zip(trained, initial))


# ---------------------------------------------------------------------------------------
# No-op at initialisation, where not covered elsewhere: quantised bases, stacked adapters
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["int8", "nf4"])
@pytest.mark.parametrize("method", ["lora", "dora", "lokr", "loha"])
def test_noop_at_init_over_quantised_base(method, base, getkey):
    model = lora.quantise(_mlp(getkey()), method=base, block_size=8)
    adapted = lora.loraify(model, rank=2, key=getkey(), method=method)
    x = _vectors(getkey())
    plain = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(lora.materialise(model), x)
    got = eqx.filter_jit(_forward)(adapted, x)
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)


def test_noop_at_init_stacked(getkey):
    base = _mlp(getkey())
    model = lora.stack_adapters(
        {n: lora.loraify(base, rank=r, key=getkey()) for n, r in (("a", 2), ("b", 3))}
    )
    x = _vectors(getkey())
    forward = eqx.filter_jit(_forward)
    for which in ("a", "b", None, {"a": 0.5, "b": 0.5}):
        got = forward(lora.set_adapter(model, which), x)
        np.testing.assert_allclose(got, jax.vmap(base)(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Merge, then unmerge
# ---------------------------------------------------------------------------------------


def _unmerge(v, merged):
    """The base weight back from the merged one, in float32: `merged - Δ`; for DoRA,
    PEFT's `merged / (m / ‖w + s·a@b‖) - s·a@b` with the norm the adapter computes."""
    merged = merged.astype(jnp.float32)
    if isinstance(v, lora.DoraArray):
        g = (v.m / v.norm()).astype(jnp.float32)
        ab = (v.a @ v.b).astype(jnp.float32) * v.scaling
        return merged / g[..., :, None] - ab
    return merged - v.delta().astype(jnp.float32)


def _base(v):
    w = v._w
    return w.dequantise() if not isinstance(w, jax.Array) else w


MERGE_VARIANTS = [
    *VARIANTS,
    Variant("lora-bf16-f32-factors", "lora", 2, {"dtype": jnp.float32}),
    Variant("loha-bf16", "loha", 2),
]


def _merge_case(variant, key, dtype):
    k1, k2 = jr.split(key)
    w = jr.normal(k1, (16, 24)).astype(dtype)
    return variant.build(w, k2)


@pytest.mark.parametrize("variant", MERGE_VARIANTS, ids=[v.name for v in MERGE_VARIANTS])
def test_merge_then_unmerge(variant, getkey):
    dtype = jnp.bfloat16 if "bf16" in variant.name else jnp.float32
    v = _merge_case(variant, getkey(), dtype)
    w = np.asarray(v._w, np.float64)
    # At initialisation the update of an additive method is exactly zero: the round
    # trip is exact. DoRA rescales rows by m/‖w‖ ≈ 1, which is not exact.
    if variant.noop and variant.method != "dora":
        merged = v.merge()
        assert merged.dtype == v._w.dtype
        np.testing.assert_array_equal(np.asarray(merged, np.float64), w)
        np.testing.assert_array_equal(np.asarray(_unmerge(v, merged), np.float64), w)
    v = randomise_factors(v, getkey())
    merged = v.merge()
    assert merged.dtype == v._w.dtype
    recovered = np.asarray(_unmerge(v, merged), np.float64)
    # One rounding of `w + Δ` to the weight's dtype, one of the float32 subtraction.
    eps = float(jnp.finfo(dtype).eps)
    delta = np.asarray(merged, np.float64) - w
    bound = 2 * eps * (np.abs(w) + np.abs(delta))
    if isinstance(v, lora.DoraArray):
        # Dividing by the row factor g = m/‖w + s·a@b‖ scales the rounding of `w + Δ`
        # (of size |w|) by 1/|g|, and `s·a@b` is subtracted again.
        g = np.abs(np.asarray(v.m / v.norm(), np.float64))[:, None]
        sab = np.abs(np.asarray(v.a @ v.b, np.float64)) * float(v.scaling)
        bound = 4 * eps * (np.abs(w) * (1 + 1 / g) + np.abs(delta) + sab)
    assert np.all(np.abs(recovered - w) <= bound)
    # The adapter itself is untouched: merging is a pure function.
    np.testing.assert_array_equal(np.asarray(v._w, np.float64), w)


@pytest.mark.parametrize("base", ["int8", "nf4"])
def test_merge_then_unmerge_quantised_base(base, getkey):
    q = lora.quantise(_mlp(getkey()), method=base, block_size=8)
    adapted = randomise_model(lora.loraify(q, rank=2, key=getkey()), getkey())
    v = adapted.layers[0].weight
    w = np.asarray(_base(v), np.float64)
    recovered = np.asarray(_unmerge(v, v.merge()), np.float64)
    delta = np.asarray(v.delta(), np.float64)
    eps = float(jnp.finfo(jnp.float32).eps)
    assert np.all(np.abs(recovered - w) <= 2 * eps * (np.abs(w) + np.abs(delta)))


# ---------------------------------------------------------------------------------------
# safe_merge
# ---------------------------------------------------------------------------------------


def _break(model, index, field, value):
    return eqx.tree_at(
        lambda m: getattr(m.layers[index].weight, field),
        model,
        getattr(model.layers[index].weight, field).at[0, 0].set(value),
    )


def test_safe_merge_passes_finite_models_unchanged(getkey):
    adapted = randomise_model(lora.loraify(_mlp(getkey()), rank=2, key=getkey()), getkey())
    safe = lora.materialise(adapted, safe_merge=True)
    plain = lora.materialise(adapted)
    assert jtu.tree_structure(safe) == jtu.tree_structure(plain)
    for a, b in zip(jtu.tree_leaves(safe), jtu.tree_leaves(plain)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("method", ["lora", "dora", "lokr", "loha"])
def test_safe_merge_refuses_non_finite(method, value, getkey):
    adapted = lora.loraify(_mlp(getkey()), rank=2, key=getkey(), method=method)
    adapted = randomise_model(adapted, getkey())
    field = next(
        f
        for f in type(adapted.layers[1].weight).trainable_fields
        if getattr(adapted.layers[1].weight, f) is not None
    )
    broken = _break(adapted, 1, field, value)
    lora.materialise(broken)  # merging without the check goes through
    with pytest.raises(ValueError, match="'layers.1.weight'"):
        lora.materialise(broken, safe_merge=True)


def test_safe_merge_catches_overflow_of_finite_factors(getkey):
    """Finite factors whose update overflows float16: the merged weight is infinite,
    which only a check of the merged weight (not of the factors) sees."""
    mlp = jtu.tree_map(
        lambda x: x.astype(jnp.float16) if eqx.is_inexact_array(x) else x,
        _mlp(getkey()),
    )
    adapted = randomise_model(lora.loraify(mlp, rank=2, key=getkey()), getkey())
    big = adapted.layers[0].weight
    big = eqx.tree_at(lambda v: (v.a, v.b), big, (big.a * 300, big.b * 300))
    adapted = eqx.tree_at(lambda m: m.layers[0].weight, adapted, big)
    leaves = jtu.tree_leaves(eqx.filter(adapted, eqx.is_array))
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in leaves)
    assert not np.all(np.isfinite(np.asarray(lora.materialise(adapted).layers[0].weight)))
    with pytest.raises(ValueError, match="'layers.0.weight'"):
        lora.materialise(adapted, safe_merge=True)


def test_safe_merge_sees_a_broken_base_weight(getkey):
    adapted = lora.loraify(_mlp(getkey()), rank=2, key=getkey())
    broken = eqx.tree_at(
        lambda m: m.layers[0].weight._w,
        adapted,
        adapted.layers[0].weight._w.at[1, 1].set(jnp.nan),
    )
    with pytest.raises(ValueError, match="'layers.0.weight'"):
        lora.materialise(broken, safe_merge=True)
