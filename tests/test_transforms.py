"""LoRA models under every transformation users compose with quaxify: jit, grad, vmap
(either side of quaxify), scan over stacked layers, cond, while_loop, checkpoint and
custom_jvp; no recompile when a scaling changes."""

import re

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import lora_jax as lora

from .helpers import jaxpr_primitives, randomise_model, tree_allclose


def _mlp(key):
    return eqx.nn.MLP(6, 3, width_size=8, depth=2, activation=jax.nn.relu, key=key)


def _setup(getkey):
    mlp = _mlp(getkey())
    adapted = randomise_model(lora.loraify(mlp, rank=2, alpha=4.0, key=getkey()), getkey())
    dense = lora.materialise(adapted)
    x = jr.normal(getkey(), (5, 6))
    return adapted, dense, x


def _loss(model, x):
    return jnp.mean(jax.vmap(model)(x) ** 2)


# quaxify around the loss of the recombined model; any order of jit/grad/vmap outside
# (and jit inside) gives the factors' gradients.
ORDERS = {
    "jit(grad(quaxify))": (lambda g: jax.jit(jax.grad(g)), lambda f: quax.quaxify(f)),
    "grad(jit(quaxify))": (lambda g: jax.grad(jax.jit(g)), lambda f: quax.quaxify(f)),
    "grad(quaxify(jit))": (lambda g: jax.grad(g), lambda f: quax.quaxify(eqx.filter_jit(f))),
    "jit(grad(quaxify(jit)))": (
        lambda g: jax.jit(jax.grad(g)),
        lambda f: quax.quaxify(eqx.filter_jit(f)),
    ),
    "filter_jit(filter_grad(quaxify))": (
        lambda g: eqx.filter_jit(eqx.filter_grad(g)),
        lambda f: quax.quaxify(f),
    ),
    "vmap(grad(quaxify))": (
        lambda g: (
            lambda p, x: jax.tree.map(
                lambda t: t[0], jax.vmap(jax.grad(g), in_axes=(None, 0))(p, x[None])
            )
        ),
        lambda f: quax.quaxify(f),
    ),
}


@pytest.mark.parametrize("order", ORDERS)
def test_decorator_orders(order, getkey):
    adapted, dense, x = _setup(getkey)
    params, frozen = lora.partition(adapted)
    outer, inner = ORDERS[order]

    def loss(params, x):
        return inner(_loss)(eqx.combine(params, frozen), x)

    grads = outer(loss)(params, x)
    # Reference: the gradient of the dense model with respect to its merged weights,
    # pulled back through the factors: d/da = s·G bᵀ, d/db = s·aᵀ G.
    dense_grads = eqx.filter_grad(_loss)(dense, x)
    for layer, g_layer, d_layer in zip(adapted.layers, grads.layers, dense_grads.layers):
        w = layer.weight
        s = w.scaling
        G = d_layer.weight
        np.testing.assert_allclose(g_layer.weight.a, s * G @ w.b.T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g_layer.weight.b, s * w.a.T @ G, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "order",
    {
        "jit(quaxify(grad))": lambda f: jax.jit(quax.quaxify(jax.grad(f))),
        "quaxify(jit(grad))": lambda f: quax.quaxify(jax.jit(jax.grad(f))),
    }.items(),
    ids=lambda o: o[0],
)
def test_quaxify_outside_grad_gives_weight_gradient(order, getkey):
    """quax's semantics: with quaxify outside grad, the whole adapted weight is the
    variable, and its gradient is the dense weight gradient."""
    adapted, dense, x = _setup(getkey)
    arrays, static = eqx.partition(
        adapted, lambda v: eqx.is_array(v) or lora.is_adapter(v), is_leaf=lora.is_adapter
    )

    def loss(arrays, x):
        return _loss(eqx.combine(arrays, static), x)

    grads = order[1](loss)(arrays, x)
    dense_grads = eqx.filter_grad(_loss)(dense, x)
    for g, d in zip(grads.layers, dense_grads.layers):
        np.testing.assert_allclose(g.weight, d.weight, rtol=1e-4, atol=1e-6)


def test_partition_half_under_outer_quaxify_is_a_clear_error(getkey):
    adapted, _, x = _setup(getkey)
    params, frozen = lora.partition(adapted)
    with pytest.raises(ValueError, match="inside the quaxified"):
        quax.quaxify(jax.grad(lambda p, x: _loss(eqx.combine(p, frozen), x)))(params, x)


@pytest.mark.parametrize("inside", [True, False])
def test_vmap_either_side(inside, getkey):
    adapted, dense, x = _setup(getkey)
    if inside:
        out = quax.quaxify(lambda m, x: jax.vmap(m)(x))(adapted, x)
    else:
        out = jax.vmap(quax.quaxify(adapted))(x)
    np.testing.assert_allclose(out, jax.vmap(dense)(x), rtol=1e-5, atol=1e-5)


def test_vmap_over_models(getkey):
    """vmap over a batch of adapters (stacked LoRA values) outside quaxify."""
    keys = jr.split(getkey(), 3)
    mlp = _mlp(getkey())
    adapted = eqx.filter_vmap(lambda k: randomise_model(lora.loraify(mlp, rank=2, key=k), k))(keys)
    x = jr.normal(getkey(), (6,))
    out = eqx.filter_vmap(lambda m: quax.quaxify(m)(x))(adapted)
    for i in range(3):
        one = jax.tree.map(lambda t: t[i] if eqx.is_array(t) else t, adapted)
        np.testing.assert_allclose(out[i], lora.materialise(one)(x), rtol=1e-5, atol=1e-5)


class Block(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
        return x + jnp.tanh(self.linear(x))


def _stack(key, n=4, width=6):
    return eqx.filter_vmap(lambda k: Block(eqx.nn.Linear(width, width, key=k)))(jr.split(key, n))


def _scan(blocks, x):
    params, static = eqx.partition(blocks, eqx.is_array)

    def step(x, p):
        return eqx.combine(p, static)(x), None

    return lax.scan(step, x, params)[0]


def test_scan_over_stacked_layers(getkey):
    blocks = _stack(getkey())
    adapted = randomise_model(lora.loraify(blocks, rank=2, key=getkey()), getkey())
    assert adapted.linear.weight.a.shape == (4, 6, 2)
    x = jr.normal(getkey(), (6,))
    out = jax.jit(quax.quaxify(_scan))(adapted, x)
    np.testing.assert_allclose(out, _scan(lora.materialise(adapted), x), rtol=1e-5, atol=1e-5)
    params, frozen = lora.partition(adapted)
    loss = lambda p, x: jnp.sum(quax.quaxify(_scan)(eqx.combine(p, frozen), x))
    g = jax.jit(jax.grad(loss))(params, x)
    dense_loss = lambda w, x: jnp.sum(_scan(eqx.tree_at(lambda m: m.linear.weight, blocks, w), x))
    G = jax.grad(dense_loss)(lora.materialise(adapted).linear.weight, x)
    w = adapted.linear.weight
    s = w.scaling[:, None, None]
    np.testing.assert_allclose(
        g.linear.weight.a, s * G @ jnp.swapaxes(w.b, 1, 2), rtol=1e-3, atol=1e-5
    )
    np.testing.assert_allclose(
        g.linear.weight.b, s * jnp.swapaxes(w.a, 1, 2) @ G, rtol=1e-3, atol=1e-5
    )


def test_cond_and_while(getkey):
    adapted, dense, x = _setup(getkey)

    def f(m, x, flag):
        y = lax.cond(flag, lambda: jax.vmap(m)(x), lambda: -jax.vmap(m)(x))

        def body(c):
            i, y = c
            return i + 1, y + jax.vmap(m.layers[-1])(jnp.ones((5, 8)))

        return lax.while_loop(lambda c: c[0] < 2, body, (0, y))[1]

    for flag in (True, False):
        got = eqx.filter_jit(quax.quaxify(f))(adapted, x, flag)
        np.testing.assert_allclose(got, f(dense, x, flag), rtol=1e-5, atol=1e-5)


def test_checkpoint_does_not_materialise(getkey):
    adapted, dense, x = _setup(getkey)

    def f(m, x):
        return jnp.sum(eqx.filter_checkpoint(lambda m, x: jax.vmap(m)(x))(m, x) ** 2)

    # allow_materialise=False: a materialise under remat would raise.
    params, frozen = lora.partition(adapted)
    loss = lambda p, x: quax.quaxify(f)(eqx.combine(p, frozen), x)
    got = jax.jit(jax.grad(loss))(params, x)
    ref = eqx.filter_grad(f)(dense, x)
    w = adapted.layers[0].weight
    np.testing.assert_allclose(
        got.layers[0].weight.b, w.scaling * w.a.T @ ref.layers[0].weight, rtol=1e-4, atol=1e-6
    )
    prims = jaxpr_primitives(jax.make_jaxpr(jax.grad(loss))(params, x).jaxpr)
    assert "remat2" in prims or "checkpoint" in prims


def test_custom_jvp_inside(getkey):
    adapted, dense, x = _setup(getkey)

    @jax.custom_jvp
    def act(x):
        return jnp.tanh(x)

    @act.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return jnp.tanh(x), t * (1 - jnp.tanh(x) ** 2)

    def f(m, x):
        return jnp.sum(act(jax.vmap(m)(x)))

    np.testing.assert_allclose(quax.quaxify(f)(adapted, x), f(dense, x), rtol=1e-5)
    g = eqx.filter_grad(quax.quaxify(f))(adapted, x)
    assert np.isfinite(np.asarray(g.layers[0].weight.b)).all()


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr"])
def test_forward_mode(method, getkey):
    """`jax.jvp` and `jax.hessian` (forward over reverse) through an adapted model:
    the factors' tangents push forward as the dense weight's tangent does."""
    mlp = _mlp(getkey())
    adapted = lora.loraify(mlp, rank=2, alpha=4.0, method=method, key=getkey())
    adapted = randomise_model(adapted, getkey())
    params, frozen = lora.partition(adapted)
    x = jr.normal(getkey(), (5, 6))
    tangent = jax.tree.map(lambda p: jr.normal(getkey(), p.shape), params)

    def ours(p):
        return _loss(quax.quaxify(eqx.combine(p, frozen)), x)

    def dense(p):
        return _loss(lora.materialise(eqx.combine(p, frozen)), x)

    got = jax.jvp(ours, (params,), (tangent,))
    want = jax.jvp(dense, (params,), (tangent,))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # A Hessian-vector product, forward over reverse.
    hvp = lambda f: jax.jvp(jax.grad(f), (params,), (tangent,))[1]
    assert tree_allclose(hvp(ours), hvp(dense), rtol=1e-3, atol=1e-5)


def test_changing_scaling_does_not_recompile(getkey):
    adapted, _, x = _setup(getkey)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(m, x):
        return quax.quaxify(lambda m, x: jax.vmap(m)(x))(m, x)

    f(adapted, x)
    rescaled = eqx.tree_at(
        lambda m: m.layers[0].weight.scaling, adapted, jnp.asarray(7.0, jnp.float32)
    )
    out = f(rescaled, x)
    assert not np.allclose(out, f(adapted, x))


_HLO_MOVE = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (transpose|copy)\(")


def _compiled_moves(fn, *args):
    """Shapes of the `transpose` and `copy` ops in the optimised HLO: the data
    movement XLA could not fold into a dot or a fusion's indexing."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return sorted(
        tuple(int(d) for d in m.group(2).split(",") if d) for m in _HLO_MOVE.finditer(text)
    )


def test_no_transposes_beyond_the_plain_model(getkey):
    """Under vmap, JAX binds `W @ x` as a product laid out (out, batch) that the
    consumer transposes. The compiled LoRA forward and training gradient move no
    full-size tensor the plain model's do not (rank-sized ones excepted): the adapter's
    sum is computed in the consumer's layout, so XLA cancels the transpose."""
    adapted, dense, x = _setup(getkey)
    rank = adapted.layers[0].weight.rank
    d_arrays, d_static = eqx.partition(dense, eqx.is_array)
    params, frozen = lora.partition(adapted)

    def run(m, x):
        return jnp.sum(jnp.sin(jax.vmap(m)(x)))

    def full_size(shapes):
        return [s for s in shapes if rank not in s]

    plain_fwd = _compiled_moves(lambda d, x: run(eqx.combine(d, d_static), x), d_arrays, x)
    ours_fwd = _compiled_moves(lambda p, x: quax.quaxify(run)(eqx.combine(p, frozen), x), params, x)
    assert full_size(ours_fwd) == plain_fwd
    floor = _compiled_moves(jax.grad(lambda x, d: run(eqx.combine(d, d_static), x)), x, d_arrays)
    ours = _compiled_moves(
        jax.grad(lambda p, x: quax.quaxify(run)(eqx.combine(p, frozen), x)), params, x
    )
    assert full_size(ours) == full_size(floor)


@pytest.mark.parametrize("options", [{}, {"decompose_factor": 4, "rank": 8}])
def test_lokr_moves_nothing_beyond_the_plain_model(options, getkey):
    """A LoKr Linear under vmap: `w2` contracts the minor dimension of the rows as one
    matrix product and `w1` the middle one batched over the rows, so its forward and
    training gradient compile with no transpose or copy the plain layer does not have
    (the earlier split-in-place product moved activation-sized tensors 8 times)."""
    linear = eqx.nn.Linear(64, 128, use_bias=False, key=getkey())
    options = {"rank": 2, **options}
    adapted = lora.loraify(linear, method="lokr", key=getkey(), **options)
    params, frozen = lora.partition(adapted)
    x = jr.normal(getkey(), (32, 64))

    def run(m, x):
        return jnp.sum(jnp.sin(jax.vmap(m)(x)))

    floor = _compiled_moves(jax.grad(run, argnums=1), linear, x)
    ours = _compiled_moves(
        jax.grad(lambda p, x: quax.quaxify(run)(eqx.combine(p, frozen), x)), params, x
    )
    # Rank-sized moves are allowed: on a CPU, a decomposed factor's gradient is written
    # rank-major and transposed (`rank_minor`); a GPU's batched product wants its batch
    # dimension major, so XLA moves the tensor `w1` mixes, (rows, p1, r).
    ours = [s for s in ours if options["rank"] not in s]
    assert ours == floor


_HLO_DOT = re.compile(r"= \w+\[([\d,]*)\]\{([\d,]*)\} dot\(")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's layout choice")
@pytest.mark.parametrize(
    "method, options",
    [("lora", {}), ("dora", {}), ("loha", {}), ("lokr", {"decompose_factor": 4})],
)
def test_factor_gradients_written_rank_major_on_cpu(method, options, getkey):
    """XLA:CPU computes a factor's gradient (a product over the tokens) 7× slower when
    its result's minor dimension in memory is the rank: each factor with the rank
    minor (`a`, LoKr's `w?_a`) has its gradient written rank-major and transposed
    (`rank_minor`). (DoRA's norm also multiplies `w·bᵀ`, a forward product of `a`'s
    shape over the input dimension, which is fast either way.)"""
    linear = eqx.nn.Linear(48, 96, use_bias=False, key=getkey())
    adapted = lora.loraify(linear, method=method, rank=4, key=getkey(), **options)
    params, frozen = lora.partition(adapted)
    x = jr.normal(getkey(), (40, 48))

    def loss(p, x):
        return jnp.sum(jnp.sin(jax.vmap(quax.quaxify(eqx.combine(p, frozen)))(x)))

    rank_minor = {
        leaf.shape
        for leaf in jax.tree.leaves(params)
        if leaf.ndim == 2 and leaf.shape[-1] == 4 and leaf.shape[0] > 4
    }
    if method == "loha":
        rank_minor = {(96, 16)}  # the face-split `a`, (out, r·r), is what the product sees
    assert rank_minor  # the test sees the factors it is about
    text = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    # Each product's result as laid out in memory, major dimension first.
    written = set()
    for m in _HLO_DOT.finditer(text):
        shape = tuple(int(d) for d in m.group(1).split(",") if d)
        layout = [int(d) for d in m.group(2).split(",") if d]
        written.add(tuple(shape[d] for d in reversed(layout)))
    assert {shape[::-1] for shape in rank_minor} <= written, (written, rank_minor)
    if method != "dora":
        assert not written & rank_minor, (written, rank_minor)


def test_materialise_round_trip(getkey):
    adapted, dense, x = _setup(getkey)
    assert type(dense) is type(adapted)
    assert all(
        not lora.is_adapter(leaf) for leaf in jax.tree.leaves(dense, is_leaf=lora.is_adapter)
    )
    np.testing.assert_allclose(
        quax.quaxify(lambda m, x: jax.vmap(m)(x))(adapted, x),
        jax.vmap(dense)(x),
        rtol=1e-5,
        atol=1e-5,
    )
    plain = _mlp(getkey())
    assert tree_allclose(lora.materialise(plain), plain)
    base, adapters = lora.unloraify(adapted)
    assert base.layers[0].weight is adapted.layers[0].weight._w
    assert adapters.layers[0].weight._w is None
    assert adapters.layers[0].bias is None


def test_rule_traced_once_for_identical_layers(getkey, monkeypatch):
    """The dot_general rule runs under a cached jit: a stack of identical layers
    traces it once (quax would otherwise inline it afresh at every layer), and the
    result is the dense model's."""
    calls = []
    rule = lora.LoraArray.dot_general

    def counted(self, *args):
        calls.append(1)
        return rule(self, *args)

    monkeypatch.setattr(lora.LoraArray, "dot_general", counted)
    jax.clear_caches()
    layers = [eqx.nn.Linear(7, 7, key=k) for k in jr.split(getkey(), 5)]
    adapted = randomise_model(lora.loraify(layers, rank=3, key=getkey()), getkey())

    def run(layers, x):
        for layer in layers:
            x = jnp.tanh(layer(x))
        return x

    x = jr.normal(getkey(), (7,))
    out = jax.jit(quax.quaxify(run))(adapted, x)
    assert len(calls) == 1
    np.testing.assert_allclose(out, run(lora.materialise(adapted), x), rtol=1e-5, atol=1e-5)
