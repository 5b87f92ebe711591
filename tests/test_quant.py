"""Quantised base weights: Int8Array and NF4Array against plain numpy quantisers, and
QLoRA by composition (LoraArray wrapping a quantised weight)."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
import quax
import scipy.stats

import lora_jax as lora
from lora_jax._quant import NF4_LEVELS

from .helpers import dense_lora, randomise_factors


# ---------------------------------------------------------------------------------------
# Plain numpy references
# ---------------------------------------------------------------------------------------


def ref_int8(w):
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(-1) / np.float32(127)
    safe = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.clip(np.rint(w / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale


def ref_nf4(w, block):
    """Codes (one per value, unpacked) and absmax per block, for each flattened matrix;
    and the dequantised weight: nearest level × absmax."""
    w = np.asarray(w, np.float32)
    *batch, out, inp = w.shape
    x = w.reshape(*batch, -1, block)
    absmax = np.abs(x).max(-1)
    safe = np.where(absmax > 0, absmax, 1).astype(np.float32)
    normed = x / safe[..., None]
    levels = np.asarray(NF4_LEVELS, np.float32)
    codes = np.abs(normed[..., None] - levels).argmin(-1)
    deq = (levels[codes] * absmax[..., None]).reshape(w.shape)
    return codes.reshape(*batch, -1), absmax, deq


def unpack(packed):
    packed = np.asarray(packed)
    return np.stack([packed >> 4, packed & 15], -1).reshape(*packed.shape[:-1], -1)


def make(method, w):
    if method == "int8":
        return lora.Int8Array.from_array(w)
    return lora.NF4Array.from_array(w, block_size=16, double_quant=method == "nf4-dq")


METHODS = ["int8", "nf4", "nf4-dq"]


# ---------------------------------------------------------------------------------------
# The value types
# ---------------------------------------------------------------------------------------


def test_nf4_levels_from_definition():
    # QLoRA: 2^(k-1) quantiles on the negative side, 2^(k-1)+1 on the positive side
    # (sharing 0), at probabilities from 1-δ to 1/2, δ = (1/32 + 1/30)/2; normalised.
    delta = (1 / 32 + 1 / 30) / 2
    pos = scipy.stats.norm.ppf(np.linspace(1 - delta, 0.5, 9)[:-1])
    neg = -scipy.stats.norm.ppf(np.linspace(1 - delta, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    levels = levels / np.abs(levels).max()
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[7] == 0.0
    np.testing.assert_allclose(NF4_LEVELS, levels, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 8)])
def test_int8_against_reference(shape, getkey):
    w = jr.normal(getkey(), shape).at[..., 0, :].set(0.0)  # a zero row
    q = lora.Int8Array.from_array(w)
    ref_q, ref_scale = ref_int8(w)
    assert q.shape == shape and q.dtype == jnp.float32
    assert q.values.dtype == jnp.int8 and q.scale.shape == shape[:-1]
    np.testing.assert_array_equal(np.asarray(q.values), ref_q)
    np.testing.assert_allclose(np.asarray(q.scale), ref_scale, rtol=1e-7)
    deq = jax.jit(lambda q: q.dequantise())(q)
    np.testing.assert_allclose(deq, ref_q * ref_scale[..., None], rtol=1e-6)
    err = np.abs(np.asarray(deq) - np.asarray(w)).max(-1)
    assert np.all(err <= np.asarray(q.scale) / 2 * (1 + 1e-5) + 1e-7)
    np.testing.assert_array_equal(deq[..., 0, :], 0.0)


def test_int8_keeps_dtype(getkey):
    w = jr.normal(getkey(), (4, 6), jnp.bfloat16)
    q = lora.Int8Array.from_array(w)
    assert q.dtype == jnp.bfloat16 and q.dequantise().dtype == jnp.bfloat16
    ref_q, ref_scale = ref_int8(np.asarray(w, np.float32))
    np.testing.assert_array_equal(
        np.asarray(q.dequantise(), np.float32),
        np.asarray(jnp.asarray(ref_q * ref_scale[..., None], jnp.bfloat16), np.float32),
    )


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.parametrize(
    "base,new",
    [
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.bfloat16),
        (jnp.float32, jnp.bfloat16),
        (jnp.bfloat16, jnp.bfloat16),
    ],
)
def test_astype_is_the_rounded_weight(method, base, new, getkey):
    """Casting a quantised weight gives its value (dequantised in its own dtype) cast:
    widening a bfloat16 weight must not bring back digits it does not have."""
    w = jr.normal(getkey(), (4, 8), jnp.float32).astype(base)
    q = (
        lora.Int8Array.from_array(w)
        if method == "int8"
        else lora.NF4Array.from_array(w, block_size=4)
    )
    got = quax.quaxify(lambda q: q.astype(new) * 1)(q)
    assert got.dtype == new
    want = q.dequantise().astype(new)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("shape,block", [((4, 32), 64), ((2, 8, 16), 32), ((6, 10), 4)])
def test_nf4_against_reference(shape, block, getkey):
    w = jr.normal(getkey(), shape)
    w = w.at[..., 0, :block].set(0.0) if shape[-1] >= block else w  # a zero block
    q = lora.NF4Array.from_array(w, block_size=block)
    codes, absmax, deq = ref_nf4(w, block)
    assert q.shape == shape and q.dtype == jnp.float32 and q.codes.dtype == jnp.uint8
    assert q.codes.shape == (*shape[:-2], shape[-2] * shape[-1] // 2)
    # Two codes a byte, the first in the high nibble.
    np.testing.assert_array_equal(unpack(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
    got = jax.jit(lambda q: q.dequantise())(q)
    np.testing.assert_array_equal(np.asarray(got), deq)  # exactly level × absmax


def test_nf4_double_quant(getkey):
    # 40*64/8 = 320 blocks: two blocks of 256 absmax constants, the second padded.
    w = jr.normal(getkey(), (40, 64)) * jnp.linspace(0.1, 3.0, 64)[None, :]
    plain = lora.NF4Array.from_array(w, block_size=8)
    q = lora.NF4Array.from_array(w, block_size=8, double_quant=True)
    assert q.double_quant and not plain.double_quant
    assert q.absmax.dtype == jnp.int8 and q.absmax.shape == (512,)
    assert q.absmax_scale.shape == (2,) and q.absmax_offset.shape == ()
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(plain.codes))
    # Reference: mean-centred absmax, int8 per block of 256.
    absmax = np.asarray(plain.absmax)
    mean = absmax.mean(dtype=np.float32)
    centred = np.pad(absmax - mean, (0, 192)).reshape(2, 256)
    scale2 = np.abs(centred).max(-1) / np.float32(127)
    ref_absmax = np.rint(centred / scale2[:, None]) * scale2[:, None]
    ref_absmax = ref_absmax.reshape(-1)[:320] + mean
    got_absmax = np.asarray(q.block_absmax())
    np.testing.assert_allclose(got_absmax, ref_absmax, rtol=1e-5)
    assert np.all(np.abs(got_absmax - absmax) <= scale2.max() / 2 + 1e-6)
    codes, _, _ = ref_nf4(w, 8)
    levels = np.asarray(NF4_LEVELS, np.float32)
    expect = levels[codes].reshape(-1, 8) * got_absmax[:, None]
    expect = expect.reshape(40, 64)
    np.testing.assert_allclose(np.asarray(q.dequantise()), expect, rtol=1e-6)
    assert q.nbytes < plain.nbytes


def test_bytes(getkey):
    w = jr.normal(getkey(), (64, 256), jnp.bfloat16)
    bf16 = w.size * 2
    assert lora.Int8Array.from_array(w).nbytes == w.size + 64 * 4
    assert lora.NF4Array.from_array(w).nbytes == w.size // 2 + w.size // 64 * 4
    assert lora.NF4Array.from_array(w, double_quant=True).nbytes <= 0.3 * bf16


@pytest.mark.parametrize("method", METHODS)
def test_no_dense_leaf(method, getkey):
    q = make(method, jr.normal(getkey(), (8, 16)))
    for leaf in jtu.tree_leaves(q):
        assert leaf.dtype != jnp.float32 or leaf.size < 8 * 16


@pytest.mark.parametrize("method", METHODS)
def test_rules_on_bare_value(method, getkey):
    w = jr.normal(getkey(), (8, 16))
    q = make(method, w)
    deq = q.dequantise()
    x = jr.normal(getkey(), (3, 16))
    products = lambda q, x: (x @ q.T, q @ x.T, jnp.einsum("oi,bi->bo", q, x))
    f = jax.jit(quax.quaxify(products))
    left, right, einsum = f(q, x)
    ref = x @ deq.T
    np.testing.assert_allclose(left, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(right, ref.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(einsum, ref, rtol=1e-5, atol=1e-5)
    # astype keeps it quantised, with the new dtype.
    half = quax.quaxify(lambda q: q.astype(jnp.bfloat16))(q)
    assert type(half) is type(q) and half.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(half.dequantise(), np.float32),
        np.asarray(deq.astype(jnp.bfloat16), np.float32),
    )
    # transpose and anything else dequantise.
    np.testing.assert_array_equal(quax.quaxify(lambda q: q.T)(q), deq.T)
    np.testing.assert_array_equal(quax.quaxify(lambda q: q * 2)(q), deq * 2)


# ---------------------------------------------------------------------------------------
# QLoRA: LoraArray wrapping a quantised weight
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_lora_over_quantised(method, getkey):
    w = jr.normal(getkey(), (8, 16))
    q = make(method, w)
    lw = randomise_factors(lora.LoraArray(q, rank=3, alpha=6.0, key=getkey()), getkey())
    assert lw.shape == (8, 16) and lw.dtype == jnp.float32 and not lora.is_adapter(q)
    x = jr.normal(getkey(), (5, 16))
    ref = dense_lora(q.dequantise(), lw.a, lw.b, lw.scaling)

    def loss(a, b, x):
        v = eqx.tree_at(lambda v: (v.a, v.b), lw, (a, b))
        y = quax.quaxify(lambda v, x: x @ v.T)(v, x)
        return jnp.sum(jnp.sin(y))

    def ref_loss(a, b, x):
        return jnp.sum(jnp.sin(x @ dense_lora(q.dequantise(), a, b, lw.scaling).T))

    np.testing.assert_allclose(
        jax.jit(quax.quaxify(lambda v, x: v @ x.T))(lw, x),
        ref @ x.T,
        rtol=1e-5,
        atol=1e-5,
    )
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(lw.a, lw.b, x)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(lw.a, lw.b, x)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_scan_over_stacked_nf4(getkey):
    w = jr.normal(getkey(), (3, 16, 16)) / 4
    q = lora.NF4Array.from_array(w, block_size=32)
    lw = randomise_factors(lora.LoraArray(q, rank=2, key=getkey()), getkey())
    x = jr.normal(getkey(), (16,))

    def run(lw, x):
        return lax.scan(lambda h, v: (jnp.tanh(v @ h), None), x, lw)[0]

    got = jax.jit(quax.quaxify(run))(lw, x)
    dense = dense_lora(q.dequantise(), lw.a, lw.b, lw.scaling)
    np.testing.assert_allclose(got, run(dense, x), rtol=1e-5, atol=1e-5)


def _mlp(key):
    return eqx.nn.MLP(16, 4, width_size=32, depth=2, key=key)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_training(method, getkey):
    mlp = _mlp(getkey())
    x = jr.normal(getkey(), (64, 16))
    y = jnp.sin(x[:, :4] * 2)
    dq = method == "nf4"
    qmodel = lora.quantise(mlp, method=method, block_size=32, double_quant=dq)
    model = lora.loraify(qmodel, rank=4, alpha=8.0, init="peft", key=getkey())
    kind = lora.Int8Array if method == "int8" else lora.NF4Array
    assert isinstance(model.layers[0].weight._w, kind)
    params, frozen = lora.partition(model)
    assert all(jnp.issubdtype(p.dtype, jnp.floating) for p in jtu.tree_leaves(params))
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(params, frozen, x, y):
        model = eqx.combine(params, frozen)
        pred = quax.quaxify(lambda m, x: jax.vmap(m)(x))(model, x)
        return jnp.mean((pred - y) ** 2)

    # The halves themselves cannot be quaxified: the trainable half has no codes.
    with pytest.raises(ValueError, match="trainable half"):
        quax.quaxify(lambda p: p)(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, x, y)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam, not lora_jax
            updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(40):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    trained = eqx.combine(params, frozen)
    before = jtu.tree_leaves(eqx.filter(qmodel, eqx.is_array))
    after = jtu.tree_leaves(eqx.filter(lora.unloraify(trained)[0], eqx.is_array))
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # codes bitwise

    # Differentiating the whole model (integer leaves included) works too, and no
    # gradient reaches the quantised weight.
    whole = quax.quaxify(lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2))
    grads = eqx.filter_grad(whole)(trained)
    qgrads = grads.layers[0].weight._w
    for g in jtu.tree_leaves(qgrads):
        np.testing.assert_array_equal(g, 0.0)
    assert jnp.any(grads.layers[0].weight.b != 0)


@pytest.mark.parametrize("method", METHODS)
def test_materialise(method, getkey):
    mlp = _mlp(getkey())
    qmodel = lora.quantise(
        mlp,
        method="int8" if method == "int8" else "nf4",
        block_size=32,
        double_quant=method == "nf4-dq",
    )
    model = lora.loraify(qmodel, rank=3, key=getkey(), where=["layers.0", "layers.1"])
    model = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[1].weight),
        model,
        tuple(randomise_factors(model.layers[i].weight, getkey()) for i in (0, 1)),
    )
    merged = lora.materialise(model)
    for i in (0, 1):
        lw = model.layers[i].weight
        got = merged.layers[i].weight
        assert type(got) is type(mlp.layers[i].weight) and got.dtype == jnp.float32
        np.testing.assert_allclose(
            got,
            dense_lora(lw._w.dequantise(), lw.a, lw.b, lw.scaling),
            rtol=1e-6,
            atol=1e-6,
        )
    # The head was quantised but not adapted: it comes back dequantised.
    head = merged.layers[2].weight
    assert type(head) is type(mlp.layers[2].weight)
    np.testing.assert_array_equal(head, qmodel.layers[2].weight.dequantise())
    x = jr.normal(getkey(), (16,))
    np.testing.assert_allclose(merged(x), quax.quaxify(model)(x), rtol=1e-5, atol=1e-5)


def test_materialise_bf16(getkey):
    linear = eqx.nn.Linear(32, 8, key=getkey(), dtype=jnp.bfloat16)
    model = lora.loraify(lora.quantise(linear), rank=2, key=getkey(), dtype=jnp.float32)
    lw = randomise_factors(model.weight, getkey())
    merged = lora.materialise(eqx.tree_at(lambda m: m.weight, model, lw))
    assert merged.weight.dtype == jnp.bfloat16
    # `w + Δ` in the base dtype: Δ is cast to bfloat16 and added to the dequantised w.
    ref = lw._w.dequantise() + (lw.scaling * lw.a @ lw.b).astype(jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(merged.weight, np.float32), np.asarray(ref, np.float32)
    )


def test_summary_counts(getkey):
    mlp = _mlp(getkey())
    plain = lora.summary(lora.loraify(mlp, rank=4, key=jr.key(1), where="all-linear"))
    q = lora.quantise(mlp, block_size=32, double_quant=True)
    s = lora.summary(lora.loraify(q, rank=4, key=jr.key(1), where="all-linear"))
    weights = sum(l.weight.size for l in mlp.layers)
    biases = sum(l.bias.size for l in mlp.layers)
    factors = sum(4 * (l.in_features + l.out_features) for l in mlp.layers[:2])
    assert (s.total, s.trainable) == (plain.total, plain.trainable)
    assert s.total == weights + biases + factors and s.trainable == factors
    assert lora.summary(q).total == weights + biases and lora.summary(q).trainable == 0
    # `trainable` naming a quantised layer does not train its codes or constants.
    mask = lora.trainable_mask(q, trainable=["layers.0"])
    assert not any(jtu.tree_leaves(mask.layers[0].weight)) and mask.layers[0].bias


# ---------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------


def test_bad_arguments(getkey):
    w = jr.normal(getkey(), (6, 10))
    with pytest.raises(ValueError, match="`block_size`=64 does not divide"):
        lora.NF4Array.from_array(w)
    with pytest.raises(ValueError, match="`block_size` must be a positive even"):
        lora.NF4Array.from_array(w, block_size=3)
    with pytest.raises(TypeError, match="`block_size`"):
        lora.NF4Array.from_array(w, block_size=4.0)
    with pytest.raises(TypeError, match="`double_quant`"):
        lora.NF4Array.from_array(w, block_size=4, double_quant=1)
    with pytest.raises(TypeError, match="floating dtype"):
        lora.NF4Array.from_array(jnp.ones((4, 16), jnp.int32), block_size=16)
    with pytest.raises(TypeError, match="floating dtype"):
        lora.Int8Array.from_array(jnp.ones((4, 16), jnp.int8))
    with pytest.raises(ValueError, match="two dimensions"):
        lora.Int8Array.from_array(jnp.ones(4))
    mlp = _mlp(getkey())
    with pytest.raises(ValueError, match="`method` must be one of 'nf4', 'int8'"):
        lora.quantise(mlp, method="nf3")
    match = "`block_size`=256 does not divide .* 'layers.2'"
    with pytest.raises(ValueError, match=match):
        lora.quantise(mlp, block_size=256)
    with pytest.raises(ValueError, match="`double_quant=True`"):
        lora.quantise(mlp, method="int8", double_quant=True)
    with pytest.raises(ValueError, match="`where` entry 'nope'"):
        lora.quantise(mlp, where=["nope"])
    with pytest.raises(ValueError, match="already adapted"):
        lora.quantise(lora.loraify(mlp, rank=2, key=getkey()))
    ints = eqx.tree_at(lambda m: m.layers[0].weight, mlp, jnp.ones((32, 16), jnp.int32))
    with pytest.raises(TypeError, match="`layers.0.weight` must have a floating dtype"):
        lora.quantise(ints)
    # Quantising twice leaves quantised weights alone.
    q = lora.quantise(mlp, block_size=32)
    assert lora.quantise(q, method="int8") is not q
    assert isinstance(lora.quantise(q, method="int8").layers[0].weight, lora.NF4Array)
