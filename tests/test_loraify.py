"""loraify's targeting, partition/summary, training, drop-in compatibility with
quax.examples.lora, and bad arguments."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
import quax

import lora_jax as lora

from .helpers import dense_lora, randomise_model


class Block(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.attn = eqx.nn.MultiheadAttention(2, 8, key=k1)
        self.mlp = eqx.nn.Linear(8, 8, key=k2)

    def __call__(self, x):
        x = x + self.attn(x, x, x)
        return x + jax.vmap(self.mlp)(x)


class Net(eqx.Module):
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, key, n=3):
        keys = jr.split(key, n + 1)
        self.blocks = [Block(k) for k in keys[:n]]
        self.head = eqx.nn.Linear(8, 2, key=keys[-1])

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return jax.vmap(self.head)(x)


def _names(model, **kw):
    return [n for n, _ in lora.find_targets(model, **kw)]


def test_quax_drop_in_readme_example():
    """quax's own LoRA example, run unchanged with `import lora_jax as lora`."""
    key1, key2, key3 = jr.split(jr.PRNGKey(0), 3)
    linear = eqx.nn.Linear(10, 12, key=key1)
    vector = jr.normal(key2, (10,))

    def run(model, x):
        return model(x)

    lora_weight = lora.LoraArray(linear.weight, rank=2, key=key3)
    lora_linear = eqx.tree_at(lambda l: l.weight, linear, lora_weight)
    out = quax.quaxify(run)(lora_linear, vector)
    np.testing.assert_allclose(out, run(linear, vector), rtol=1e-6)  # a no-op at init
    lora_linear = lora.loraify(linear, rank=2, key=key3)
    assert isinstance(lora_linear.weight, lora.LoraArray)
    # Same attribute surface as quax's LoraArray.
    w = lora_linear.weight
    assert w.a.shape == (12, 2) and w.b.shape == (2, 10)
    assert np.all(np.asarray(w.b) == 0)
    assert w.stop_gradient is True and w.allow_materialise is False
    with pytest.raises(RuntimeError, match="Refusing to materialise `LoraArray`"):
        w.materialise()
    assert np.allclose(
        lora.LoraArray(linear.weight, rank=2, key=key3, allow_materialise=True).materialise(),
        linear.weight,
    )
    # Same initialisation as quax's for the same key.
    import quax.examples.lora as qlora

    q = qlora.LoraArray(linear.weight, rank=2, key=key3)
    np.testing.assert_array_equal(q.a, lora.LoraArray(linear.weight, rank=2, key=key3).a)
    mlp = eqx.nn.MLP(3, 2, width_size=4, depth=2, key=key1)
    ours, theirs = lora.loraify(mlp, rank=2, key=key2), qlora.loraify(mlp, rank=2, key=key2)
    for o, t in zip(ours.layers, theirs.layers):
        np.testing.assert_array_equal(o.weight.a, t.weight.a)


def test_default_targets_every_linear_including_attention(getkey):
    net = Net(getkey())
    names = _names(net)
    assert "blocks.0.attn.query_proj" in names and "head" in names
    assert len(names) == 3 * 5 + 1


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(where=["query_proj", "value_proj"]), 6),
        (dict(where=["blocks.1.mlp"]), 1),
        (dict(where=r"blocks\.\d\.attn\.(query|key)_proj"), 6),
        (dict(where="all-linear"), 15),
        (dict(where=lambda name, layer: layer.out_features == 2), 1),
        (dict(where=["mlp"], exclude=["blocks.0.mlp"]), 2),
        (dict(where=["mlp"], layers_to_transform=[0, 2]), 2),
        (dict(where=["mlp"], layers_to_transform=1, layers_pattern="blocks"), 1),
        (dict(exclude=r".*proj"), 4),
    ],
)
def test_targeting(kw, expected, getkey):
    net = Net(getkey())
    assert len(_names(net, **kw)) == expected
    adapted = lora.loraify(net, rank=2, key=getkey(), **kw)
    n_adapters = sum(lora.is_adapter(x) for x in jax.tree.leaves(adapted, is_leaf=lora.is_adapter))
    assert n_adapters == expected
    assert "head" not in _names(net, where="all-linear")


def test_rank_and_alpha_patterns(getkey):
    net = Net(getkey())
    adapted = lora.loraify(
        net,
        rank=2,
        alpha=4.0,
        key=getkey(),
        rank_pattern={r"blocks\.1\.mlp": 5, "head": 1},
        alpha_pattern={"query_proj": 16.0},
    )
    assert adapted.blocks[1].mlp.weight.rank == 5
    assert adapted.blocks[0].mlp.weight.rank == 2
    assert adapted.head.weight.rank == 1
    assert float(adapted.blocks[2].attn.query_proj.weight.scaling) == 16.0 / 2
    assert float(adapted.blocks[2].attn.key_proj.weight.scaling) == 4.0 / 2
    assert float(adapted.head.weight.scaling) == 4.0 / 1


def test_rslora_scaling(getkey):
    w = lora.LoraArray(jnp.ones((4, 3)), rank=4, alpha=8.0, rslora=True, key=getkey())
    assert float(w.scaling) == 8.0 / 2.0


@pytest.mark.parametrize("init", ["quax", "peft", "gaussian"])
def test_inits_are_noops(init, getkey):
    w = jr.normal(getkey(), (6, 5))
    lw = lora.LoraArray(w, rank=3, init=init, alpha=3.0, key=getkey())
    np.testing.assert_array_equal(dense_lora(lw._w, lw.a, lw.b, lw.scaling), w)
    if init == "peft":
        assert np.all(np.abs(np.asarray(lw.b)) <= 1 / np.sqrt(5)) and np.any(lw.b != 0)


def test_adapter_dtype(getkey):
    w = jr.normal(getkey(), (6, 5)).astype(jnp.bfloat16)
    lw = lora.LoraArray(w, rank=2, dtype=jnp.float32, key=getkey())
    assert lw.a.dtype == jnp.float32 and lw.dtype == jnp.bfloat16
    lw = randomise_model(lw, getkey())
    x = jr.normal(getkey(), (5,)).astype(jnp.bfloat16)
    out = quax.quaxify(jnp.matmul)(lw, x)
    assert out.dtype == jnp.bfloat16
    ref = dense_lora(w.astype(jnp.float32), lw.a, lw.b, lw.scaling) @ x.astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=3e-2, atol=3e-2)
    merged = lora.materialise(lw)
    assert merged.dtype == jnp.bfloat16


def test_never_mutates_never_nests(getkey):
    net = Net(getkey())
    before = jax.tree.leaves(net)
    adapted = lora.loraify(net, rank=2, key=getkey())
    assert all(a is b for a, b in zip(jax.tree.leaves(net), before))
    again = lora.loraify(adapted, rank=2, key=getkey())  # default targets: skip adapted
    assert not lora.is_adapter(again.head.weight._w)
    with pytest.raises(ValueError, match="already adapted"):
        lora.loraify(adapted, rank=2, key=getkey(), where=["head"])


def test_partition_and_mask(getkey):
    net = Net(getkey())
    adapted = lora.loraify(net, rank=2, key=getkey(), where=["mlp"])
    params, frozen = lora.partition(adapted)
    leaves = jax.tree.leaves(params)
    assert len(leaves) == 3 * 2  # a and b of three adapters, nothing else
    params, _ = lora.partition(adapted, train_bias="lora_only")
    assert params.blocks[0].mlp.bias is not None
    assert params.blocks[0].attn.query_proj.bias is None
    params, _ = lora.partition(adapted, train_bias="all")
    assert params.head.bias is not None
    params, _ = lora.partition(adapted, trainable=["head"])
    assert params.head.weight is not None and params.head.bias is not None
    mask = lora.trainable_mask(adapted)
    assert mask.blocks[0].mlp.weight.a is True and mask.blocks[0].mlp.weight._w is False
    assert mask.blocks[0].mlp.weight.scaling is False
    # The mask as optax labels over the array part of the model: only factors move.
    arrays = eqx.filter(adapted, eqx.is_array)
    opt = optax.multi_transform(
        {True: optax.sgd(1.0), False: optax.set_to_zero()},
        lambda _: lora.trainable_mask(arrays),  # (a Module is callable: wrap it)
    )
    ones = jax.tree.map(jnp.ones_like, arrays)
    updates, _ = opt.update(ones, opt.init(arrays), arrays)
    new = eqx.combine(optax.apply_updates(arrays, updates), adapted)
    w_old, w_new = adapted.blocks[0].mlp.weight, new.blocks[0].mlp.weight
    np.testing.assert_array_equal(w_new.a, w_old.a - 1)
    np.testing.assert_array_equal(w_new._w, w_old._w)
    np.testing.assert_array_equal(new.head.weight, adapted.head.weight)


def test_summary_counts(getkey):
    mlp = eqx.nn.MLP(10, 4, width_size=16, depth=2, key=getkey())
    adapted = lora.loraify(mlp, rank=2, key=getkey())
    s = lora.summary(adapted)
    total_plain = sum(x.size for x in jax.tree.leaves(eqx.filter(mlp, eqx.is_array)))
    lora_params = 2 * ((10 + 16) + (16 + 16) + (16 + 4))
    assert s.trainable == lora_params
    assert s.total == total_plain + lora_params
    assert s.non_trainable == total_plain
    assert "Trainable params: 156" in str(s)
    assert s.peft_line.startswith("trainable params: 156 || all params: ")
    s_bias = lora.summary(adapted, train_bias="all")
    assert s_bias.trainable == lora_params + 16 + 16 + 4


def test_training_lowers_loss_and_keeps_base_bitwise(getkey):
    """100 optax steps on a real regression task: the loss falls, frozen weights are
    bitwise unchanged."""
    mlp = eqx.nn.MLP(4, 1, width_size=32, depth=2, key=getkey())
    teacher = eqx.nn.MLP(4, 1, width_size=32, depth=2, key=getkey())
    x = jr.normal(getkey(), (256, 4))
    y = jax.vmap(teacher)(x)
    model = lora.loraify(mlp, rank=4, alpha=8.0, init="peft", key=getkey())
    params, frozen = lora.partition(model, train_bias="lora_only")
    opt = optax.adamw(3e-3)
    state = opt.init(params)

    def loss_fn(params, x, y):
        m = eqx.combine(params, frozen)
        pred = quax.quaxify(lambda m, x: jax.vmap(m)(x))(m, x)
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        # optax's bias correction mixes a Python float and an int32 count, which the
        # strict promotion mode of these tests refuses; lora_jax's code runs strict.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(100):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    trained = eqx.combine(params, frozen)
    for before, after in zip(model.layers, trained.layers):
        np.testing.assert_array_equal(np.asarray(before.weight._w), np.asarray(after.weight._w))
    # The merged model computes what the adapted one does.
    merged = lora.materialise(trained)
    np.testing.assert_allclose(
        quax.quaxify(lambda m, x: jax.vmap(m)(x))(trained, x),
        jax.vmap(merged)(x),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, "`rank` must be a positive integer, got 0"),
        (dict(rank=-1), ValueError, "`rank`"),
        (dict(rank=2.0), TypeError, "`rank` must be a positive integer"),
        (dict(rank=True), TypeError, "`rank`"),
        (dict(rank=2, key=None), TypeError, "`key`"),
        (dict(rank=2, key=3), TypeError, "`key`"),
        (dict(rank=2, init="xavier"), ValueError, "`init`"),
        (dict(rank=2, alpha=-1.0), ValueError, "`alpha`"),
        (dict(rank=2, rslora=True), ValueError, "`rslora=True` needs `alpha`"),
        (dict(rank=2, dtype=jnp.int32), TypeError, "`dtype`"),
        (dict(rank=2, scale="big"), TypeError, "`scale`"),
    ],
)
def test_lora_array_bad_arguments(kwargs, error, match, getkey):
    kwargs.setdefault("key", getkey())
    with pytest.raises(error, match=match):
        lora.LoraArray(jnp.ones((3, 4)), **kwargs)


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (jnp.ones(4), ValueError, "at least two dimensions"),
        (jnp.ones((3, 4), jnp.int32), TypeError, "floating dtype"),
        ([[1.0, 2.0]], TypeError, "`weight` must be an array"),
    ],
)
def test_bad_weights(weight, error, match, getkey):
    with pytest.raises(error, match=match):
        lora.LoraArray(weight, rank=1, key=getkey())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(where=["nonexistent"]), ValueError, "'nonexistent' matches no layer"),
        (dict(where=r"foo.*"), ValueError, "matches no layer"),
        (dict(where=3), TypeError, "`where`"),
        (dict(where="(unclosed"), ValueError, "regular expression"),
        (dict(method="ia3"), ValueError, "`method`"),
        (dict(rank_pattern={"nothing": 2}), ValueError, "`rank_pattern` key 'nothing'"),
        (dict(rank_pattern={"head": 0}), ValueError, "rank_pattern"),
        (dict(rank_pattern=[1]), TypeError, "`rank_pattern`"),
        (dict(stop_gradient="yes"), TypeError, "`stop_gradient`"),
        (dict(unknown_option=1), TypeError, "unknown_option"),
    ],
)
def test_loraify_bad_arguments(kwargs, error, match, getkey):
    with pytest.raises(error, match=match):
        lora.loraify(Net(getkey()), rank=2, key=getkey(), **kwargs)


def test_partition_bad_arguments(getkey):
    adapted = lora.loraify(Net(getkey()), rank=2, key=getkey())
    with pytest.raises(ValueError, match="`train_bias`"):
        lora.partition(adapted, train_bias="some")
    with pytest.raises(ValueError, match="match no module"):
        lora.partition(adapted, trainable=["classifier"])
    with pytest.raises(TypeError, match="`trainable`"):
        lora.partition(adapted, trainable="head")
