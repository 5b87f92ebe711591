"""LoRA on a device mesh (8 simulated CPU devices): factors follow the weight, the
products carry a correct `out_sharding` on explicit meshes, sharded training equals
unsharded training, and `materialise` keeps every weight's sharding."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import quax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import lora_jax as lora
from lora_jax._sharding import follow_weight

from .helpers import dense_lora, randomise_factors, randomise_model, tree_allclose


# CPU CI simulates 8 devices (conftest.py); a machine with one GPU has 1 device of its
# default backend: run this file there with JAX_PLATFORMS=cpu.
pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason="needs 8 devices of the default backend (JAX_PLATFORMS=cpu simulates them)",
)

AXES = ("data", "fsdp", "tensor")
RULES = [
    lora.tensor_parallel(column=["up"], row=["down"]),
    lora.fsdp("fsdp", min_size=16),
]


def make_mesh(kind):
    types = AxisType.Explicit if kind == "explicit" else AxisType.Auto
    return jax.make_mesh((2, 2, 2), AXES, axis_types=(types,) * 3)


def _explicit() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and bool(mesh.explicit_axes)


def _gather(w, spec):
    """FSDP's gather before use: `reshard` on an explicit mesh, a constraint on an
    auto one, nothing off a mesh."""
    if jax.sharding.get_abstract_mesh().empty:
        return w
    if _explicit():
        return jax.sharding.reshard(w, spec)
    return jax.lax.with_sharding_constraint(w, spec)


def _out(spec):
    return spec if _explicit() else None


class Block(eqx.Module):
    """A Megatron MLP block written for explicit meshes: gather the FSDP shards, a
    column-parallel `up`, a row-parallel `down` whose contraction is sharded."""

    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __call__(self, x):
        w = _gather(self.up.weight, P("tensor", None))
        h = jnp.einsum("bd,hd->bh", x, w, out_sharding=_out(P("data", "tensor")))
        h = jax.nn.relu(h + self.up.bias[None])
        w = _gather(self.down.weight, P(None, "tensor"))
        y = jnp.einsum("bh,dh->bd", h, w, out_sharding=_out(P("data", None)))
        return x + y + self.down.bias[None]


def dense_block(block, x):
    """The adapted block written plainly from LoRA's formula."""
    w_up = dense_lora(
        block.up.weight._w, block.up.weight.a, block.up.weight.b, block.up.weight.scaling
    )
    w_dn = dense_lora(
        block.down.weight._w, block.down.weight.a, block.down.weight.b, block.down.weight.scaling
    )
    h = jax.nn.relu(x @ w_up.T + block.up.bias[None])
    return x + h @ w_dn.T + block.down.bias[None]


def make_block(getkey):
    block = Block(eqx.nn.Linear(8, 16, key=getkey()), eqx.nn.Linear(16, 8, key=getkey()))
    return randomise_model(lora.loraify(block, rank=2, key=getkey()), getkey())


def loss_fn(model, x):
    return jnp.mean(quax.quaxify(model)(x) ** 2)


def _pad(spec, ndim):
    return P(*(tuple(spec) + (None,) * (ndim - len(spec))))


def specs_of(model):
    """Every array's spec, one entry per dimension (jit may drop trailing `None`s)."""
    return jax.tree.map(lambda x: _pad(x.sharding.spec, x.ndim), eqx.filter(model, eqx.is_array))


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_factors_follow_weight(kind, getkey):
    mesh = make_mesh(kind)
    stacked = eqx.filter_vmap(lambda k: eqx.nn.Linear(8, 16, key=k))(jr.split(getkey(), 2))
    model = [eqx.nn.Linear(8, 16, key=getkey()), stacked]
    with jax.set_mesh(mesh):
        model[0] = eqx.tree_at(
            lambda l: l.weight, model[0], jax.device_put(model[0].weight, P("tensor", "fsdp"))
        )
        model[1] = eqx.tree_at(
            lambda l: l.weight, model[1], jax.device_put(model[1].weight, P(None, "fsdp", "tensor"))
        )
        adapted = lora.loraify(model, rank=2, key=getkey())
    for layer, (lead, out, inp) in zip(
        adapted, [((), "tensor", "fsdp"), ((None,), "fsdp", "tensor")]
    ):
        lw = layer.weight
        assert lw.a.sharding == NamedSharding(mesh, P(*lead, out, None))
        assert lw.b.sharding == NamedSharding(mesh, P(*lead, None, inp))
        assert lw.scaling.sharding == NamedSharding(mesh, P())


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_shard_model_specs(kind, getkey):
    mesh = make_mesh(kind)
    block = make_block(getkey)
    sharded = lora.shard_model(block, mesh, RULES)
    specs = specs_of(sharded)
    up, down = specs.up.weight, specs.down.weight
    assert (up._w, up.a, up.b) == (P("tensor", "fsdp"), P("tensor", None), P(None, "fsdp"))
    assert (down._w, down.a, down.b) == (P("fsdp", "tensor"), P("fsdp", None), P(None, "tensor"))
    assert specs.up.bias == P("tensor") and specs.down.bias == P(None)
    assert specs_of(sharded) == jax.tree.map(
        lambda s: s, lora.partition_specs(block, mesh, RULES), is_leaf=lambda s: isinstance(s, P)
    )
    assert tree_allclose(jax.device_get(sharded), jax.device_get(block), rtol=0, atol=0)


def test_partition_specs_of_abstract_model(getkey):
    """An abstract model (eval_shape: nothing allocated) gets the concrete one's specs,
    so a large model can be created straight into its shards."""
    mesh = make_mesh("auto")
    block = make_block(getkey)
    abstract = eqx.filter_eval_shape(lambda: block)
    is_spec = lambda s: isinstance(s, P)  # noqa: E731
    want = lora.partition_specs(block, mesh, RULES)
    got = lora.partition_specs(abstract, mesh, RULES)
    assert jax.tree.leaves(got, is_leaf=is_spec) == jax.tree.leaves(want, is_leaf=is_spec)
    assert got.up.weight.a == P("tensor", None)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_forward_grad_match_single_device(kind, getkey):
    block = make_block(getkey)
    x = jr.normal(getkey(), (4, 8))
    ref_y = dense_block(block, x)
    ref_v, ref_g = eqx.filter_value_and_grad(loss_fn)(block, x)
    mesh = make_mesh(kind)
    with jax.set_mesh(mesh):
        sharded = lora.shard_model(block, mesh, RULES)
        xs = jax.device_put(x, P("data", None))
        y = eqx.filter_jit(lambda m, x: quax.quaxify(m)(x))(sharded, xs)
        v, g = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))(sharded, xs)
    if kind == "explicit":
        assert jax.typeof(y).sharding.spec == P("data", None)
    assert np.allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    assert np.allclose(v, ref_v, rtol=1e-5)
    assert tree_allclose(jax.device_get(g), ref_g, rtol=1e-4, atol=1e-5)
    # On an explicit mesh the gradients of the factors are typed as the factors are
    # (on an auto one the partitioner picks the output layout).
    for name in ("up", "down"):
        for f in ("a", "b"):
            got, want = (getattr(getattr(m, name).weight, f) for m in (g, sharded))
            if kind == "explicit":
                assert specs_of(got) == specs_of(want)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_training_matches_unsharded(kind, getkey):
    block = make_block(getkey)
    x = jr.normal(getkey(), (4, 8))
    optim = optax.adam(1e-2)

    def train(model, x, steps=3, specs=None):
        params, frozen = lora.partition(model)
        opt_state = optim.init(params)

        @eqx.filter_jit
        def step(params, opt_state, x):
            grads = eqx.filter_grad(lambda p: loss_fn(eqx.combine(p, frozen), x))(params)
            updates, opt_state = optim.update(grads, opt_state)
            params = eqx.apply_updates(params, updates)
            if specs is not None:  # pin the layout (an auto mesh would choose)
                params = jax.tree.map(_gather, params, specs, is_leaf=lambda s: isinstance(s, P))
            return params, opt_state

        for _ in range(steps):
            params, opt_state = step(params, opt_state, x)
        return params, opt_state

    # optax's bias correction mixes int32 counts and Python floats.
    promotion = lambda: jax.numpy_dtype_promotion("standard")
    with promotion():
        ref, _ = train(block, x)
    mesh = make_mesh(kind)
    with jax.set_mesh(mesh), promotion():
        sharded = lora.shard_model(block, mesh, RULES)
        specs = lora.trainable_partition_specs(block, mesh, RULES)
        params, opt_state = train(sharded, jax.device_put(x, P("data", None)), specs=specs)
    assert tree_allclose(jax.device_get(params), ref, rtol=1e-4, atol=1e-5)
    # The parameters and the optimiser state stay laid out as the rules say.
    want = specs
    got = specs_of(params)
    is_p = lambda s: isinstance(s, P)
    assert jax.tree.leaves(got, is_leaf=is_p) == jax.tree.leaves(want, is_leaf=is_p)
    assert specs_of(opt_state[0].mu) == got


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_materialise_keeps_shardings(kind, getkey):
    block = make_block(getkey)
    mesh = make_mesh(kind)
    with jax.set_mesh(mesh):
        sharded = lora.shard_model(block, mesh, RULES)
        arrays, static = eqx.partition(sharded, eqx.is_array)
        merge = jax.jit(
            lambda p: eqx.filter(lora.materialise(eqx.combine(p, static)), eqx.is_array)
        )
        merged = merge(arrays)
        hlo = merge.lower(arrays).compile().as_text()
    for name in ("up", "down"):
        lw = getattr(sharded, name).weight
        w = getattr(merged, name).weight
        assert w.sharding == lw._w.sharding
        ref = dense_lora(*(jax.device_get(t) for t in (lw._w, lw.a, lw.b, lw.scaling)))
        assert np.allclose(w, ref, rtol=1e-5, atol=1e-6)
    # Each device forms its own block of w + s·a@b: nothing is gathered.
    assert "all-gather" not in hlo and "all-reduce" not in hlo


def test_out_sharding_contracting_dims_sharded(getkey):
    """Explicit mesh, a product whose contraction is sharded: the caller must give
    `out_sharding`, and the adapted product honours it."""
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    w0 = jr.normal(getkey(), (8, 16))
    x0 = jr.normal(getkey(), (4, 16))
    with jax.set_mesh(mesh):
        w = jax.device_put(w0, P(None, "tensor"))
        x = jax.device_put(x0, P("data", "tensor"))
        lw = randomise_factors(lora.LoraArray(w, rank=2, key=getkey()), getkey())
        lw = follow_weight(lw)
        assert lw.b.sharding.spec == P(None, "tensor")
        ref = x0 @ dense_lora(w0, *(jax.device_get(t) for t in (lw.a, lw.b, lw.scaling))).T
        cases = [
            (
                lambda w, x: jnp.einsum("bi,oi->bo", x, w, out_sharding=P("data", None)),
                P("data", None),
                ref,
            ),
            (
                lambda w, x: jnp.matmul(x, w.T, out_sharding=P("data", "tensor")),
                P("data", "tensor"),
                ref,
            ),
            (
                lambda w, x: jax.lax.dot_general(
                    w, x, (((1,), (1,)), ((), ())), out_sharding=P("tensor", "data")
                ),
                P("tensor", "data"),
                ref.T,
            ),
        ]
        # Without `out_sharding` JAX refuses the product (the dense one too).
        with pytest.raises(Exception, match="Contracting dimensions are sharded"):
            jax.jit(lambda w, x: x @ w.T)(w, x)
        for f, spec, want in cases:
            y = jax.jit(quax.quaxify(f))(lw, x)
            assert jax.typeof(y).sharding.spec == spec
            assert np.allclose(y, want, rtol=1e-5, atol=1e-5)


def test_quax_example_differs(getkey):
    """Documentation of the difference: `quax.examples.lora` forwards the caller's
    `out_sharding` to its inner products. With the output's `out` dimension sharded it
    lands on the rank dimension of `b·x` and fails; lora_jax replicates the rank."""
    from quax.examples import lora as quax_lora

    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    w0, b0, x0 = (
        jr.normal(getkey(), (8, 16)),
        jr.normal(getkey(), (2, 16)),
        jr.normal(getkey(), (16, 4)),
    )
    f = lambda w, x: jax.lax.dot_general(
        w, x, (((1,), (0,)), ((), ())), out_sharding=P("tensor", "data")
    )
    with jax.set_mesh(mesh):
        w = jax.device_put(w0, P(None, "tensor"))
        x = jax.device_put(x0, P("tensor", "data"))
        theirs = quax_lora.LoraArray(w, rank=2, key=getkey())
        theirs = eqx.tree_at(lambda v: v.b, theirs, jax.device_put(b0, P(None, "tensor")))
        with pytest.raises(ValueError, match="does not evenly divide"):
            jax.jit(quax.quaxify(f))(theirs, x)
        ours = follow_weight(lora.LoraArray(w, rank=2, key=getkey()))
        ours = eqx.tree_at(
            lambda v: (v.a, v.b),
            ours,
            (jax.device_put(theirs.a, P(None, None)), jax.device_put(b0, P(None, "tensor"))),
        )
        y = jax.jit(quax.quaxify(f))(ours, x)
    assert jax.typeof(y).sharding.spec == P("tensor", "data")
    ref = (w0 + jax.device_get(theirs.a) @ b0) @ x0
    assert np.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_rule_errors():
    mesh = jax.make_mesh((2, 2, 2), AXES)
    model = {"head": eqx.nn.Linear(6, 3, key=jr.key(0))}
    with pytest.raises(ValueError, match="does not divide"):
        lora.partition_specs(model, mesh, lora.tensor_parallel(column=["head"]))
    with pytest.raises(TypeError, match="`column`"):
        lora.tensor_parallel(column="head")
    with pytest.raises(TypeError, match="`axis`"):
        lora.fsdp(axis=3)
    with pytest.raises(TypeError, match="`rules`"):
        lora.shard_model(model, mesh, [1])
    with pytest.raises(TypeError, match="`mesh`"):
        lora.shard_model(model, "mesh", lora.fsdp())
    # FSDP shards the largest divisible matrix dimension, and leaves small arrays.
    specs = lora.partition_specs(model, mesh, lora.fsdp("fsdp", min_size=4))
    assert specs["head"].weight == P(None, "fsdp") and specs["head"].bias == P(None)
    specs = lora.partition_specs(model, mesh, lora.fsdp(("data", "fsdp"), min_size=4))
    assert specs["head"].weight == P(None, None)  # 4 devices divide neither 3 nor 6
