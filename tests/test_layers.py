"""LoRA on every supported layer kind (and DoRA, LoKr and LoHa on convolutions), through one
table of rows and the same checks:
forward and factor gradients against the layer run with a dense merged weight written
plainly here, no-op at init, materialise, training with a frozen base, parameter counts,
no materialised weight in the jaxpr, no recompiles."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax
import jax.extend.core as jexc
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import quax

import lora_jax as lora

from .helpers import randomise_factors


# ---------------------------------------------------------------------------------------
# Dense references, written plainly from each method's formula
# ---------------------------------------------------------------------------------------


def matrix_delta(a, b):
    """LoRA on a matrix (Linear, Embedding): `a @ b`."""
    return a @ b


def conv_delta(a, b):
    """Conv LoRA: `Δ[o, i, *p] = Σ_r a[o, r, *p] b[r, i, *p]`, where each spatial axis
    has size 1 in one of the two factors (broadcast, then sum over the rank)."""
    return jnp.sum(a[:, :, None] * b[None], axis=1)


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    make: Callable[[Any], Any]  # key -> layer
    input: Callable[[Any], Any]  # key -> input
    apply: Callable[[Any, Any], Any]  # (layer, input) -> output, traced under quaxify
    delta: Callable[[Any, Any], Any]
    n_params: Callable[[Any, int], int]  # (layer, rank) -> PEFT's count
    options: dict = field(default_factory=dict)


def _conv_count(layer, rank, form="peft"):
    out, inp, *k = layer.weight.shape  # inp is already in/groups
    m = 0 if form == "peft" else len(k) // 2
    return rank * inp * math.prod(k[m:]) + out * math.prod(k[:m]) * rank


def _batched(layer, x):
    return jax.vmap(layer)(x)


def _images(channels, *spatial, batch=2):
    return lambda key: jr.normal(key, (batch, channels, *spatial))


def _loha_count(layer, rank, tucker=False):
    """PEFT's LoHa conv: two pairs `(out, r)`, `(r, in/groups·window)`; in the Tucker
    form two triples `(r, out)`, `(r, in/groups)`, `(r, r, *kernel)`."""
    out, inp, *kernel = layer.weight.shape
    if tucker:
        return 2 * rank * (out + inp + rank * math.prod(kernel))
    return 2 * rank * (out + inp * math.prod(kernel))


def _lokr_count(layer, rank, decompose_both=False, tucker=False):
    """PEFT's LoKr conv: `out = l·k`, `in/groups = p·q` split near the square root;
    `w1` (`l × p`) held as `w1_a`, `w1_b` when `decompose_both` and `r < max(l, p)/2`,
    `w2` (`k × q × kernel`) as `w2_a` (`k × r`), `w2_b` (`r × q·kernel`) when
    `r < max(k, q)/2`; in the Tucker form as `w2_a` (`r × k`), `w2_b` (`r × q`) and
    the core `t2` (`r × r × kernel`)."""
    out, inp, *kernel = layer.weight.shape
    l, k = _factorization(out)
    p, q = _factorization(inp)
    window = math.prod(kernel)
    w1 = rank * (l + p) if decompose_both and rank < max(l, p) / 2 else l * p
    if rank >= max(k, q) / 2:
        w2 = k * q * window
    elif tucker:
        w2 = rank * (k + q + rank * window)
    else:
        w2 = rank * (k + q * window)
    return w1 + w2


def _factorization(n):
    """The divisor pair of `n` closest to its square root, the smaller first."""
    d = max(i for i in range(1, math.isqrt(n) + 1) if n % i == 0)
    return d, n // d


def _lokr_rows(id, make, inputs):
    # LoKr: `w2` whole (rank 2 against small factors), as `w2_a @ w2_b` (rank 1),
    # `w1` decomposed too, and with both dropouts.
    return [
        Row(
            f"{id}-lokr{suffix}",
            make,
            inputs,
            _batched,
            conv_delta,
            lambda layer, r, o=options: _lokr_count(
                layer,
                o.get("rank", r),
                o.get("decompose_both", False),
                o.get("use_effective_conv2d", False),
            ),
            options,
        )
        for suffix, options in (
            ("", {"method": "lokr"}),
            ("-w2-decomposed", {"method": "lokr", "rank": 1}),
            ("-decompose-both", {"method": "lokr", "rank": 1, "decompose_both": True}),
            ("-tucker", {"method": "lokr", "rank": 1, "use_effective_conv2d": True}),
            (
                "-dropout",
                {
                    "method": "lokr",
                    "rank_dropout": 0.3,
                    "module_dropout": 0.1,
                    "rank_dropout_scale": True,
                },
            ),
        )
    ]


def _conv_rows(id, make, inputs, forms=("peft", "balanced"), dora=True, lokr=True):
    # Conv1d has one form only: "balanced" puts its single kernel axis on `in`'s side,
    # which is "peft" (see `lora_jax/_conv.py`). DoRA takes the "peft" form; its
    # magnitudes add one parameter per output channel. LoHa: PEFT's two factor pairs
    # on the kernel seen as (out, in·window), without dropout and with rank dropout.
    rows = [
        Row(
            f"{id}-{form}",
            make,
            inputs,
            _batched,
            conv_delta,
            lambda layer, r, form=form: _conv_count(layer, r, form),
            {"conv_form": form},
        )
        for form in forms
    ]
    if dora:
        rows.append(
            Row(
                f"{id}-dora",
                make,
                inputs,
                _batched,
                conv_delta,
                lambda layer, r: _conv_count(layer, r) + layer.weight.shape[0],
                {"method": "dora"},
            )
        )
        rows += [
            Row(
                f"{id}-loha{suffix}",
                make,
                inputs,
                _batched,
                conv_delta,
                lambda layer, r, o=options: _loha_count(
                    layer, r, o.get("use_effective_conv2d", False)
                ),
                options,
            )
            for suffix, options in (
                ("", {"method": "loha"}),
                ("-dropout", {"method": "loha", "rank_dropout": 0.3, "module_dropout": 0.1}),
                ("-tucker", {"method": "loha", "use_effective_conv2d": True}),
            )
        ]
        if lokr:
            rows += _lokr_rows(id, make, inputs)
    return rows


def _merged_rows(rows):
    """The same rows with `conv_path="merged"`: the kernel formed for each step."""
    return [
        Row(
            f"{r.id}-merged",
            r.make,
            r.input,
            r.apply,
            r.delta,
            r.n_params,
            r.options | {"conv_path": "merged"},
        )
        for r in rows
    ]


ROWS = [
    Row(
        "linear",
        lambda k: eqx.nn.Linear(5, 3, key=k),
        lambda k: jr.normal(k, (4, 5)),
        _batched,
        matrix_delta,
        lambda layer, r: r * (5 + 3),
    ),
    *_conv_rows(
        "conv1d",
        lambda k: eqx.nn.Conv1d(4, 6, 3, padding=1, key=k),
        _images(4, 9),
        forms=("peft",),
    ),
    *_conv_rows(
        "conv2d-stride-pad-dilate",
        lambda k: eqx.nn.Conv2d(
            3, 5, (3, 2), stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2), key=k
        ),
        _images(3, 8, 7),
    ),
    *_conv_rows(
        "conv2d-groups",
        lambda k: eqx.nn.Conv2d(4, 6, 3, padding="SAME", groups=2, key=k),
        _images(4, 6, 5),
        lokr=False,  # in/groups = 2 and out = 6: LoKr's `w2` would be the whole kernel
    ),
    *_lokr_rows(
        "conv2d-groups",
        lambda k: eqx.nn.Conv2d(8, 12, 3, padding="SAME", groups=2, key=k),
        _images(8, 6, 5),
    ),
    *_conv_rows(
        "conv3d",
        lambda k: eqx.nn.Conv3d(2, 3, (2, 3, 2), padding=1, stride=(1, 2, 1), key=k),
        _images(2, 5, 6, 4),
        lokr=False,
    ),
    *_lokr_rows(
        "conv3d",
        lambda k: eqx.nn.Conv3d(4, 6, (2, 3, 2), padding=1, stride=(1, 2, 1), key=k),
        _images(4, 5, 6, 4),
    ),
    *_conv_rows(
        "convtranspose2d",
        lambda k: eqx.nn.ConvTranspose2d(
            3, 4, (3, 2), stride=2, padding=1, output_padding=1, key=k
        ),
        _images(3, 5, 4),
        dora=False,  # PEFT's DoRA adapts Conv1d/2d/3d, not transposed convs
    ),
    *_merged_rows(
        [
            r
            for r in _conv_rows(
                "conv2d-stride-pad-dilate",
                lambda k: eqx.nn.Conv2d(
                    3, 5, (3, 2), stride=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2), key=k
                ),
                _images(3, 8, 7),
            )
            if not r.id.endswith(("-w2-decomposed", "-decompose-both"))
        ]
        + _conv_rows(
            "convtranspose2d",
            lambda k: eqx.nn.ConvTranspose2d(
                3, 4, (3, 2), stride=2, padding=1, output_padding=1, key=k
            ),
            _images(3, 5, 4),
            forms=("peft",),
            dora=False,
        )
    ),
    Row(
        "embedding-scalar",
        lambda k: eqx.nn.Embedding(11, 5, key=k),
        lambda k: jr.randint(k, (), 0, 11),
        lambda layer, i: layer(i),
        matrix_delta,
        lambda layer, r: r * (11 + 5),
    ),
    Row(
        "embedding-vmapped",
        lambda k: eqx.nn.Embedding(11, 5, key=k),
        lambda k: jr.randint(k, (7,), -11, 11),
        _batched,
        matrix_delta,
        lambda layer, r: r * (11 + 5),
    ),
]

RANK = 2
ALPHA = 3.0


def _adapt(row, key, **kwargs):
    layer = row.make(jr.fold_in(key, 0))
    if row.options.get("method") in ("loha", "lokr"):
        # LoHa and LoKr take PEFT's `init_weights` (True, the default: a no-op), not
        # `init`.
        kwargs.pop("init", None)
    kw = dict(rank=RANK, alpha=ALPHA, key=jr.fold_in(key, 1), where=lambda n, l: True)
    adapted = lora.loraify(layer, **(kw | row.options | kwargs))
    return layer, adapted


def _dense_layer(layer, adapter, **fields):
    """The plain layer holding the adapted weight built here from the factors (`fields`
    overriding the adapter's): `w + s·Δ`, or DoRA's `m ⊙ V / ‖V‖` with `V = w + s·Δ`,
    the norm per output channel over every other axis and detached from the graph."""
    get = lambda f: fields.get(f, getattr(adapter, f))  # noqa: E731
    if isinstance(adapter, lora.LohaConvArray):
        if get("t1") is not None:  # PEFT's Tucker form: W[o, i, *s] = a[o, x] t[x, y, *s] b[y, i]
            tucker = lambda a, t, b: jnp.einsum("ox,xy...,yi->oi...", a, t, b)
            hadamard = tucker(get("w1a"), get("t1"), get("w1b")) * tucker(
                get("w2a"), get("t2"), get("w2b")
            )
        else:
            hadamard = (get("w1a") @ get("w1b")) * (get("w2a") @ get("w2b"))
        return eqx.tree_at(
            lambda l: l.weight,
            layer,
            adapter._w + adapter.scaling * hadamard.reshape(adapter._w.shape),
        )
    if isinstance(adapter, lora.LokrConvArray):
        # Δ[(i, j), (u, v), *s] = w1[i, u]·w2[j, v, *s], by broadcasting.
        w1 = get("w1") if get("w1") is not None else get("w1_a") @ get("w1_b")
        window = adapter._w.shape[2:]
        if get("w2") is not None:
            w2 = get("w2")
        elif get("t2") is not None:  # PEFT's Tucker form
            w2 = jnp.einsum("jx,xy...,yv->jv...", get("w2_a"), get("t2"), get("w2_b"))
        else:
            w2 = (get("w2_a") @ get("w2_b")).reshape(get("w2_a").shape[0], -1, *window)
        spatial = (None,) * len(window)
        kron = w1[:, None, :, None, *spatial] * w2[None, :, None, :]
        return eqx.tree_at(
            lambda l: l.weight,
            layer,
            adapter._w + adapter.scaling * kron.reshape(adapter._w.shape),
        )
    a, b = get("a"), get("b")
    merged = adapter._w + adapter.scaling * (
        conv_delta(a, b) if adapter._w.ndim > 2 else matrix_delta(a, b)
    )
    if isinstance(adapter, lora.DoraConvArray):
        axes = tuple(range(1, merged.ndim))
        norm = lax.stop_gradient(jnp.sqrt(jnp.sum(merged * merged, axis=axes, keepdims=True)))
        merged = get("m").reshape(-1, *(1,) * len(axes)) * merged / norm
    return eqx.tree_at(lambda l: l.weight, layer, merged)


def _trained(adapter) -> tuple[str, ...]:
    """The trainable fields the adapter holds (LoKr leaves its unused factors `None`)."""
    return tuple(f for f in type(adapter).trainable_fields if getattr(adapter, f) is not None)


def _with_factors(adapted, **fields):
    names = list(fields)
    return eqx.tree_at(
        lambda l: [getattr(l.weight, n) for n in names], adapted, [fields[n] for n in names]
    )


def _run(adapted, x, row):
    return quax.quaxify(row.apply)(adapted, x)


@pytest.fixture(params=ROWS, ids=[r.id for r in ROWS])
def row(request):
    return request.param


def _setup(row, getkey):
    layer, adapted = _adapt(row, getkey())
    adapted = eqx.tree_at(lambda l: l.weight, adapted, randomise_factors(adapted.weight, getkey()))
    x = row.input(getkey())
    return layer, adapted, x


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------


def test_forward_matches_dense(row, getkey):
    layer, adapted, x = _setup(row, getkey)
    fwd = eqx.filter_jit(eqx.debug.assert_max_traces(lambda m, x: _run(m, x, row), max_traces=1))
    dense = eqx.filter_jit(lambda m, x: row.apply(_dense_layer(layer, m.weight), x))
    for s in (1.0, 2.5):  # a new scaling is a new leaf value, not a recompile
        m = eqx.tree_at(lambda l: l.weight.scaling, adapted, jnp.asarray(ALPHA / RANK * s))
        expected = dense(m, x)
        got = fwd(m, x)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_factor_gradients_match_dense(row, getkey):
    layer, adapted, x = _setup(row, getkey)
    lw = adapted.weight
    target = jr.normal(getkey(), jax.eval_shape(row.apply, layer, x).shape)

    fields = {f: getattr(lw, f) for f in _trained(lw)}

    def adapted_loss(fields):
        return jnp.sum((_run(_with_factors(adapted, **fields), x, row) - target) ** 2)

    def dense_loss(fields):
        return jnp.sum((row.apply(_dense_layer(layer, lw, **fields), x) - target) ** 2)

    got = jax.jit(jax.grad(adapted_loss))(fields)
    expected = jax.jit(jax.grad(dense_loss))(fields)
    assert set(got) == set(_trained(lw))
    for f in fields:
        np.testing.assert_allclose(got[f], expected[f], rtol=1e-4, atol=1e-4, err_msg=f)


@pytest.mark.parametrize("init", ["quax", "peft", "gaussian"])
def test_noop_at_init(row, getkey, init):
    layer, adapted = _adapt(row, getkey(), init=init)
    x = row.input(getkey())
    got = eqx.filter_jit(lambda m, x: _run(m, x, row))(adapted, x)
    np.testing.assert_allclose(got, eqx.filter_jit(row.apply)(layer, x), rtol=1e-5, atol=1e-6)


def test_materialise_equals_adapted(row, getkey):
    layer, adapted, x = _setup(row, getkey)
    merged = lora.materialise(adapted)
    assert type(merged) is type(layer)
    assert type(merged.weight) is type(layer.weight)
    assert merged.weight.shape == layer.weight.shape
    got = eqx.filter_jit(lambda m, x: _run(m, x, row))(adapted, x)
    np.testing.assert_allclose(eqx.filter_jit(row.apply)(merged, x), got, rtol=1e-4, atol=1e-4)


def test_training_lowers_loss_base_frozen(row, getkey):
    layer, adapted = _adapt(row, getkey(), init="peft")
    x = row.input(getkey())
    # A target the adapter can reach: the layer under other, random factors.
    goal = randomise_factors(adapted.weight, getkey())
    target = eqx.filter_jit(row.apply)(_dense_layer(layer, goal), x)
    params, frozen = lora.partition(adapted)
    opt = optax.adam(3e-2)
    state = opt.init(params)

    def loss_fn(params):
        model = eqx.combine(params, frozen)
        return jnp.mean((_run(model, x, row) - target) ** 2)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction
            updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    trained = eqx.combine(params, frozen)
    assert np.array_equal(np.asarray(trained.weight._w), np.asarray(layer.weight))
    assert any(
        not np.allclose(getattr(trained.weight, f), getattr(adapted.weight, f))
        for f in _trained(adapted.weight)
    )


def test_parameter_counts(row, getkey):
    layer, adapted = _adapt(row, getkey())
    expected = row.n_params(layer, RANK)
    s = lora.summary(adapted)
    assert s.trainable == expected
    params, _ = lora.partition(adapted)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == expected
    base = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(layer, eqx.is_array)))
    assert s.total == base + expected


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jexc.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_no_materialised_weight(row, getkey):
    """Neither the forward nor the backward pass builds an array of the weight's shape:
    the only one is the (gradient-stopped) base weight itself."""
    layer, adapted, x = _setup(row, getkey)
    params, frozen = lora.partition(adapted)

    def loss(params):
        return jnp.sum(_run(eqx.combine(params, frozen), x, row) ** 2)

    if row.options.get("conv_path") == "merged":
        # By request, the kernel is formed for the step: one conv in the forward pass.
        forward = jax.make_jaxpr(loss)(params).jaxpr
        convs = [e for e in _all_eqns(forward) if e.primitive.name == "conv_general_dilated"]
        assert len(convs) == 1, convs
        return
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
    shape = layer.weight.shape
    for eqn in _all_eqns(jaxpr):
        if eqn.primitive.name in ("stop_gradient", "pjit", "jit"):
            continue
        for v in eqn.outvars:
            assert getattr(v.aval, "shape", None) != shape, f"materialised weight: {eqn}"


# ---------------------------------------------------------------------------------------
# Kind-specific facts
# ---------------------------------------------------------------------------------------


def test_balanced_is_alf_matrix_factorisation(getkey):
    """Conv2d balanced: the kernel seen as the (out·k0, in·k1) matrix equals
    w + s·A @ B with A (out·k0, r) and B (r, in·k1) read off the factors."""
    out, inp, k0, k1, r = 5, 3, 3, 2, 2
    w = jr.normal(getkey(), (out, inp, k0, k1))
    lw = randomise_factors(
        lora.LoraConvArray(w, rank=r, key=getkey(), conv_form="balanced"), getkey()
    )
    assert lw.a.shape == (out, r, k0, 1) and lw.b.shape == (r, inp, 1, k1)
    A = jnp.transpose(lw.a[..., 0], (0, 2, 1)).reshape(out * k0, r)
    B = lw.b[:, :, 0, :].reshape(r, inp * k1)
    as_matrix = lambda k: jnp.transpose(k, (0, 2, 1, 3)).reshape(out * k0, inp * k1)
    np.testing.assert_allclose(
        as_matrix(lw.merge()), as_matrix(w) + lw.scaling * A @ B, rtol=1e-5, atol=1e-5
    )


def test_peft_conv_is_two_convs(getkey):
    """PEFT's form: `b` is a conv with the kernel's size, `a` a 1×1 conv after it."""
    w = jr.normal(getkey(), (4, 3, 3, 3))
    lw = randomise_factors(lora.LoraConvArray(w, rank=2, key=getkey()), getkey())
    assert lw.b.shape == (2, 3, 3, 3) and lw.a.shape == (4, 2, 1, 1)
    x = jr.normal(getkey(), (1, 3, 7, 7))
    conv = lambda x, k, s: lax.conv_general_dilated(x, k, s, "SAME")
    expected = conv(x, w, (2, 2)) + lw.scaling * conv(conv(x, lw.b, (2, 2)), lw.a, (1, 1))
    got = quax.quaxify(conv)(x, lw, (2, 2))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_embedding_lookups(getkey):
    """Every way of reading rows: vmap outside quaxify, a Python int, `jnp.take` with an
    out-of-bounds id (filled), fancy indexing, slices, and a tied output head."""
    emb = eqx.nn.Embedding(11, 5, key=getkey())
    adapted = lora.loraify(emb, rank=2, alpha=3.0, key=getkey(), where=lambda n, l: True)
    adapted = eqx.tree_at(lambda e: e.weight, adapted, randomise_factors(adapted.weight, getkey()))
    lw = adapted.weight
    dense = lw._w + lw.scaling * lw.a @ lw.b
    ids = jnp.array([0, 4, 10, -1])
    q = quax.quaxify
    np.testing.assert_allclose(
        eqx.filter_jit(lambda m, i: jax.vmap(q(lambda m, i: m(i)), (None, 0))(m, i))(adapted, ids),
        dense[ids],
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(q(adapted)(3), dense[3], rtol=1e-5, atol=1e-5)
    take = jax.jit(q(lambda w, i: jnp.take(w, i, axis=0)))(lw, jnp.array([2, 11]))
    np.testing.assert_allclose(
        take, jnp.take(dense, jnp.array([2, 11]), axis=0), rtol=1e-5, atol=1e-5
    )
    idx = jnp.array([[1, 2], [3, 4]])
    np.testing.assert_allclose(jax.jit(q(lambda w: w[idx]))(lw), dense[idx], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(q(lambda w: w[2:9:3, 1:4]))(lw), dense[2:9:3, 1:4], rtol=1e-5, atol=1e-5
    )
    h = jr.normal(getkey(), (3, 5))
    np.testing.assert_allclose(
        jax.jit(q(lambda w, h: h @ w.T))(lw, h), h @ dense.T, rtol=1e-4, atol=1e-4
    )


def test_peft_embedding_init(getkey):
    """PEFT: `lora_embedding_A` (= aᵀ) zeros, `lora_embedding_B` (= bᵀ) standard
    normal."""
    lw = lora.LoraEmbeddingArray(jnp.zeros((200, 50)), rank=4, key=getkey(), init="peft")
    assert np.all(np.asarray(lw.a) == 0)
    assert abs(float(jnp.std(lw.b)) - 1) < 0.15


def test_conv_errors(getkey):
    with pytest.raises(ValueError, match="`conv_form`"):
        lora.LoraConvArray(jnp.zeros((2, 2, 3)), rank=1, key=getkey(), conv_form="dense")
    with pytest.raises(ValueError, match="`conv_form`"):
        lora.loraify(eqx.nn.Conv1d(2, 2, 3, key=getkey()), rank=1, key=getkey(), conv_form="x")
    with pytest.raises(ValueError, match="`weight`"):
        lora.LoraConvArray(jnp.zeros((2, 2)), rank=1, key=getkey())
    with pytest.raises(ValueError, match="`weight`"):
        lora.LoraEmbeddingArray(jnp.zeros((2, 2, 2)), rank=1, key=getkey())
    lw = lora.LoraConvArray(jnp.zeros((4, 1, 3)), rank=1, key=getkey())
    x = jnp.zeros((2, 2, 5))
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1,), "VALID", batch_group_count=2)
    with pytest.raises(ValueError, match="`batch_group_count=1`"):
        quax.quaxify(conv)(x, lw)


def test_default_targets_linear_only(getkey):
    """`where=None` adapts Linear only (quax's loraify); convs and embeddings when
    named."""
    model = [
        eqx.nn.Conv2d(2, 3, 3, key=getkey()),
        eqx.nn.Embedding(4, 3, key=getkey()),
        eqx.nn.Linear(3, 2, key=getkey()),
    ]
    adapted = lora.loraify(model, rank=1, key=getkey())
    assert [type(m.weight).__name__ for m in adapted] == ["ArrayImpl", "ArrayImpl", "LoraArray"]
    adapted = lora.loraify(model, rank=1, key=getkey(), where=["0", "1"])
    assert [type(m.weight).__name__ for m in adapted] == [
        "LoraConvArray",
        "LoraEmbeddingArray",
        "ArrayImpl",
    ]


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_conv_rank_dropout_masks_output_channels(getkey, method):
    """With a dropout key, LoHa's and LoKr's rank dropout zeroes the update of some
    output channels and divides the others by the kept fraction (PEFT's rescaling,
    `rank_dropout_scale` for LoKr); without a key it is the identity."""
    conv = eqx.nn.Conv2d(4, 16, 3, padding=1, key=getkey())
    options = dict(rank_dropout_scale=True) if method == "lokr" else {}
    adapted = lora.loraify(
        conv,
        rank=2,
        key=getkey(),
        method=method,
        rank_dropout=0.5,
        where=lambda n, l: True,
        **options,
    )
    adapted = eqx.tree_at(lambda c: c.weight, adapted, randomise_factors(adapted.weight, getkey()))
    x = jr.normal(getkey(), (2, 4, 6, 6))
    run = eqx.filter_jit(lambda m, x: _run(m, x, ROWS[0]))
    base = jax.vmap(conv)(x)
    full = run(adapted, x) - base
    dropped = run(lora.with_dropout_keys(adapted, getkey()), x) - base
    per_channel = lambda d: jnp.max(jnp.abs(d), axis=(0, 2, 3))  # noqa: E731
    kept = per_channel(dropped) > 1e-6
    assert 0 < int(kept.sum()) < 16
    fraction = float(kept.mean())
    np.testing.assert_allclose(dropped[:, kept], full[:, kept] / fraction, rtol=1e-4, atol=1e-4)
    assert np.allclose(per_channel(dropped)[~kept], 0, atol=1e-5)  # a GPU's rounding


GPU_BLOCK_ROWS = [
    r
    for r in ROWS
    if "-lokr" in r.id and r.id.startswith(("conv2d-groups", "conv3d")) and "merged" not in r.id
]


@pytest.mark.parametrize("row", GPU_BLOCK_ROWS, ids=[r.id for r in GPU_BLOCK_ROWS])
def test_lokr_block_conv_as_on_a_gpu(row, getkey, monkeypatch):
    """LoKr's first factor conv (`b` on each slice of the input channels) takes another
    branch on a GPU than on the CPU: a block-diagonal kernel where that is at most half
    the weight's size, a grouped conv otherwise. Run here by choosing the GPU's branch:
    the forward pass and the factor gradients equal the dense reference, and no array
    of the weight's shape is built."""
    monkeypatch.setattr(lax, "platform_dependent", lambda *args, default, **_: default(*args))
    # Which branch: at rank 1 (`w2` decomposed) the block-diagonal kernel is small, one
    # conv with the layer's own groups; at rank 2 `w2` is whole and the block kernel
    # would be larger than half the weight, so the conv is grouped into the slices.
    layer, adapted, x = _setup(row, getkey)
    jaxpr = jax.make_jaxpr(lambda m: _run(m, x, row))(adapted).jaxpr
    groups = [
        e.params["feature_group_count"]
        for e in _all_eqns(jaxpr)
        if e.primitive.name == "conv_general_dilated"
    ]
    sliced = [g for g in groups if g > layer.groups]
    assert (not sliced) if row.options.get("rank") == 1 else sliced, groups
    test_forward_matches_dense(row, getkey)
    test_factor_gradients_match_dense(row, getkey)
    test_no_materialised_weight(row, getkey)


class StackedConvs(eqx.Module):
    """Three Conv2d kernels stacked by `eqx.filter_vmap`, run with `lax.scan`."""

    convs: eqx.nn.Conv2d

    def __init__(self, key):
        make = lambda k: eqx.nn.Conv2d(4, 4, 3, padding=1, key=k)  # noqa: E731
        self.convs = eqx.filter_vmap(make)(jr.split(key, 3))

    def __call__(self, x):
        params, static = eqx.partition(self.convs, eqx.is_array)
        body = lambda x, p: (jnp.tanh(eqx.combine(p, static)(x)), None)  # noqa: E731
        return lax.scan(body, x, params)[0]


STACKED_CONV_OPTIONS = {
    "lora": {},
    "lora-balanced": {"conv_form": "balanced"},
    "dora": {"method": "dora"},
    "loha": {"method": "loha"},
    "loha-tucker-dropout": {"method": "loha", "use_effective_conv2d": True, "module_dropout": 0.5},
    "lokr": {"method": "lokr"},
    "lokr-merged-dropout": {"method": "lokr", "conv_path": "merged", "rank_dropout": 0.5},
}


@pytest.mark.parametrize("options", list(STACKED_CONV_OPTIONS))
def test_stacked_convs_scan(options, getkey):
    """A stacked conv (kernels `(layers, out, in, kh, kw)`) gets one adapter per kernel,
    every leaf with the stacking axis (so `lax.scan` slices one kernel's adapter per
    step); the scanned forward pass and the factor gradients equal the materialised
    model's; with dropout keys (one per kernel) the scan runs and the dropout acts."""
    options = STACKED_CONV_OPTIONS[options]
    model = lora.loraify(
        StackedConvs(getkey()), rank=2, key=getkey(), where=lambda n, l: True, **options
    )
    v = model.convs.weight
    assert v.rank == 2 and v.scaling.shape == (3,)
    assert all(x.shape[0] == 3 for x in jax.tree.leaves(v))
    model = eqx.tree_at(lambda m: m.convs.weight, model, randomise_factors(v, getkey()))
    x = jr.normal(getkey(), (4, 6, 5))
    params, frozen = lora.partition(model)

    def loss(params, run):
        return jnp.sum(run(eqx.combine(params, frozen))(x) ** 2)

    got = jax.jit(lambda p: loss(p, quax.quaxify))(params)
    np.testing.assert_allclose(got, loss(params, lora.materialise), rtol=1e-4)
    g = jax.jit(jax.grad(lambda p: loss(p, quax.quaxify)))(params)
    g_ref = jax.grad(lambda p: loss(p, lora.materialise))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        # Three layers deep, the two sums' roundings differ more than one layer's.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.abs(b).max()))
    if any("dropout" in o for o in options):
        keyed = lora.with_dropout_keys(model, getkey())
        assert keyed.convs.weight.dropout_key.shape == (3,)
        run = jax.jit(lambda m, x: quax.quaxify(m)(x))
        assert not np.allclose(run(keyed, x), run(model, x), atol=1e-5)


def test_stacked_convs_files(tmp_path, getkey):
    """A stacked conv's adapters round-trip through a lora_jax file; PEFT's format has
    no form for them, which `save_peft` says before writing anything."""
    base = StackedConvs(getkey())
    model = lora.loraify(base, rank=2, key=getkey(), where=lambda n, l: True)
    model = eqx.tree_at(
        lambda m: m.convs.weight, model, randomise_factors(model.convs.weight, getkey())
    )
    lora.save_adapter(tmp_path / "a.safetensors", model)
    fresh = lora.loraify(base, rank=2, key=getkey(), where=lambda n, l: True)
    loaded = lora.load_adapter(tmp_path / "a.safetensors", fresh)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="stack of layers have no PEFT form.*save_adapter"):
        lora.save_peft(tmp_path / "peft", model)
    assert not (tmp_path / "peft").exists()
