"""Every `dot_general` a LoraArray can meet, against the dense reference: random shapes,
dimension numbers, sides; forward and gradients."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax
from hypothesis import example, given, settings, strategies as st

import lora_jax as lora

from .helpers import dense_lora, randomise_factors


@st.composite
def dot_problems(draw, max_lead: int = 2):
    """A `dot_general` with a `(*lead, out, in)` adapter (`max_lead` stacking dimensions
    at most): the adapter's sizes, the other operand's shape, the dimension numbers seen
    from the adapter's side, a rank, which side the adapter is on, and a seed."""
    n_lead = draw(st.integers(0, max_lead))
    sizes = [draw(st.integers(1, 4)) for _ in range(n_lead + 2)]
    n = len(sizes)
    roles = [draw(st.sampled_from("cbf")) for _ in range(n)]
    n_extra = draw(st.integers(0, 2))
    extra = [draw(st.integers(1, 4)) for _ in range(n_extra)]
    # The other operand: one dimension per contracted/batched adapter dimension, plus
    # free ones, in a random order.
    paired = [d for d in range(n) if roles[d] in "cb"]
    slots = [("p", d) for d in paired] + [("x", i) for i in range(n_extra)]
    order = draw(st.permutations(slots))
    other_shape = [sizes[d] if kind == "p" else extra[d] for kind, d in order]
    pos = {s: i for i, s in enumerate(order)}
    contract = [d for d in range(n) if roles[d] == "c"]
    batch = [d for d in range(n) if roles[d] == "b"]
    batch = draw(st.permutations(batch))
    contract = draw(st.permutations(contract))
    ac, oc = tuple(contract), tuple(pos[("p", d)] for d in contract)
    ab, ob = tuple(batch), tuple(pos[("p", d)] for d in batch)
    rank = draw(st.integers(1, 3))
    lhs = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return sizes, other_shape, (ac, oc, ab, ob), rank, lhs, seed


def _setup(sizes, other_shape, rank, seed):
    k = jr.split(jr.key(seed), 4)
    w = jr.normal(k[0], sizes)
    lw = randomise_factors(lora.LoraArray(w, rank=rank, alpha=2.0, key=k[1]), k[2])
    x = jr.normal(k[3], other_shape)
    return lw, x


def _dn(dims, lhs):
    ac, oc, ab, ob = dims
    return ((ac, oc), (ab, ob)) if lhs else ((oc, ac), (ob, ab))


def _apply(weight, x, dims, lhs):
    if lhs:
        return lax.dot_general(weight, x, _dn(dims, lhs))
    return lax.dot_general(x, weight, _dn(dims, lhs))


@settings(max_examples=150, deadline=None)
@given(dot_problems())
def test_dot_general_matches_dense(problem):
    sizes, other_shape, dims, rank, lhs, seed = problem
    lw, x = _setup(sizes, other_shape, rank, seed)
    dense = dense_lora(lw._w, lw.a, lw.b, lw.scaling)
    expected = _apply(dense, x, dims, lhs)
    got = jax.jit(quax.quaxify(_apply), static_argnums=(2, 3))(lw, x, dims, lhs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(dot_problems())
# A stack with one stacking dimension batched and one free: XLA:CPU aborted compiling
# this gradient when `rank_minor` also applied to stacked factors.
@example(([2, 3, 4, 3], [1, 3, 3, 2], ((3,), (1,), (0,), (3,)), 2, False, 0))
def test_dot_general_gradients_match_dense(problem):
    """The factors' gradients equal the dense weight's gradient pulled back through
    them; the input's gradient equals the dense one."""
    sizes, other_shape, dims, rank, lhs, seed = problem
    lw, x = _setup(sizes, other_shape, rank, seed)

    def lora_loss(a, b, x):
        value = eqx.tree_at(lambda v: (v.a, v.b), lw, (a, b))
        out = quax.quaxify(_apply)(value, x, dims, lhs)
        return jnp.sum(jnp.sin(out))

    def dense_loss(a, b, x):
        dense = dense_lora(lw._w, a, b, lw.scaling)
        return jnp.sum(jnp.sin(_apply(dense, x, dims, lhs)))

    got = jax.jit(jax.grad(lora_loss, argnums=(0, 1, 2)))(lw.a, lw.b, x)
    expected = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2)))(lw.a, lw.b, x)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "fn",
    [
        lambda w, x: w @ x.T,
        lambda w, x: x @ w.T,
        lambda w, x: w.T.T @ x[0],
        lambda w, x: (x @ w.T).T,
        lambda w, x: jnp.einsum("oi,...i->...o", w, x),
        lambda w, x: jnp.einsum("...i,oi->o...", x, w),
        lambda w, x: jnp.matmul(w, x[0]),
        lambda w, x: jax.vmap(lambda v: w @ v)(x),
        lambda w, x: jax.vmap(lambda v: v @ w.T, in_axes=1, out_axes=1)(x.T),
    ],
)
def test_user_forms(fn, getkey):
    w = jr.normal(getkey(), (5, 3))
    lw = randomise_factors(lora.LoraArray(w, rank=2, key=getkey()), getkey())
    x = jr.normal(getkey(), (4, 3))
    dense = dense_lora(lw._w, lw.a, lw.b, lw.scaling)
    expected = fn(dense, x)
    got = quax.quaxify(fn)(lw, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_with_lora(getkey):
    w1, w2 = jr.normal(getkey(), (4, 3)), jr.normal(getkey(), (3, 5))
    l1 = randomise_factors(lora.LoraArray(w1, rank=2, key=getkey()), getkey())
    l2 = randomise_factors(lora.LoraArray(w2, rank=1, key=getkey()), getkey())
    d1 = dense_lora(l1._w, l1.a, l1.b, l1.scaling)
    d2 = dense_lora(l2._w, l2.a, l2.b, l2.scaling)
    got = quax.quaxify(jnp.matmul)(l1, l2)
    np.testing.assert_allclose(got, d1 @ d2, rtol=1e-5, atol=1e-5)


def test_stacked_weights(getkey):
    w = jr.normal(getkey(), (3, 5, 4))
    lw = randomise_factors(lora.LoraArray(w, rank=2, key=getkey()), getkey())
    dense = dense_lora(lw._w, lw.a, lw.b, lw.scaling)
    x = jr.normal(getkey(), (3, 4))
    fn = lambda w, x: jax.vmap(lambda wi, xi: wi @ xi)(w, x)
    np.testing.assert_allclose(quax.quaxify(fn)(lw, x), fn(dense, x), rtol=1e-5, atol=1e-5)
    fn2 = lambda w, x: jnp.einsum("loi,bi->lbo", w, x)
    xb = jr.normal(getkey(), (2, 4))
    np.testing.assert_allclose(quax.quaxify(fn2)(lw, xb), fn2(dense, xb), rtol=1e-5, atol=1e-5)


def test_transpose_keeps_factors(getkey):
    w = jr.normal(getkey(), (2, 5, 4))
    lw = randomise_factors(lora.LoraArray(w, rank=2, key=getkey()), getkey())
    # A transposed LoraArray that is returned out of quaxify stays a LoraArray.
    out = quax.quaxify(lambda v: jnp.transpose(v, (0, 2, 1)))(lw)
    assert isinstance(out, lora.LoraArray)
    assert out.shape == (2, 4, 5)
    dense = dense_lora(lw._w, lw.a, lw.b, lw.scaling)
    np.testing.assert_allclose(
        dense_lora(out._w, out.a, out.b, out.scaling), jnp.transpose(dense, (0, 2, 1)), atol=1e-5
    )


def test_astype(getkey):
    w = jr.normal(getkey(), (5, 4))
    lw = randomise_factors(lora.LoraArray(w, rank=2, key=getkey()), getkey())
    x = jr.normal(getkey(), (4,)).astype(jnp.bfloat16)
    got = quax.quaxify(lambda v, x: v.astype(jnp.bfloat16) @ x)(lw, x)
    assert got.dtype == jnp.bfloat16
    dense = dense_lora(lw._w, lw.a, lw.b, lw.scaling)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(dense @ x.astype(jnp.float32)), rtol=5e-2, atol=5e-2
    )
