import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import lora_jax as lora

from .helpers import dense_lora, randomise_model


def _mlp(key):
    return eqx.nn.MLP(4, 3, width_size=5, depth=1, key=key)


def _dense(model, x, deltas=None):
    """The MLP written plainly: weight w + Σ cᵢ·sᵢ·aᵢ@bᵢ over `deltas`, a list of
    (coefficient, adapted model)."""
    out = x
    for i, layer in enumerate(model.layers):
        w = layer.weight
        w = w._w if lora.is_adapter(w) else w
        for c, m in deltas or []:
            v = m.layers[i].weight
            w = w + c * (dense_lora(v._w, v.a, v.b, v.scaling) - v._w)
        out = w @ out + layer.bias
        if i < len(model.layers) - 1:
            out = jnp.maximum(out, 0)
    return out


@pytest.fixture
def setup(getkey):
    base = _mlp(getkey())
    en = randomise_model(lora.loraify(base, rank=2, key=getkey()), getkey())
    fr = randomise_model(lora.loraify(base, rank=3, alpha=6.0, key=getkey()), getkey())
    model = lora.stack_adapters({"en": en, "fr": fr})
    return base, en, fr, model


def _call(model, x):
    return quax.quaxify(model)(x)


def test_select_disable_mix(setup, getkey):
    base, en, fr, model = setup
    x = jr.normal(getkey(), (4,))
    assert lora.adapter_names(model) == ("en", "fr")
    assert model.layers[0].weight.a.shape == (2, 5, 3)  # ranks padded to 3
    assert np.allclose(_call(model, x), _dense(base, x, [(1.0, en)]), atol=1e-5)
    assert np.allclose(
        _call(lora.set_adapter(model, "fr"), x), _dense(base, x, [(1.0, fr)]), atol=1e-5
    )
    assert np.allclose(
        _call(lora.set_adapter(model, 0), x), _dense(base, x, [(1.0, en)]), atol=1e-5
    )
    assert np.allclose(_call(lora.set_adapter(model, None), x), base(x), atol=1e-5)
    mixed = lora.set_adapter(model, {"en": 0.3, "fr": -0.7})
    assert np.allclose(_call(mixed, x), _dense(base, x, [(0.3, en), (-0.7, fr)]), atol=1e-5)
    merged = lora.materialise(mixed)
    assert np.allclose(merged(x), _dense(base, x, [(0.3, en), (-0.7, fr)]), atol=1e-5)


def test_switching_does_not_recompile(setup, getkey):
    base, en, fr, model = setup

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(model, x):
        return eqx.filter_grad(lambda m: jnp.sum(_call(m, x) ** 2))(model)

    x = jr.normal(getkey(), (4,))
    for which in ["en", "fr", None, {"en": 0.5, "fr": 0.5}, 1, jnp.asarray(0)]:
        grads = step(lora.set_adapter(model, which), x)
    # Only the active adapter's factors get a gradient.
    g = step(lora.set_adapter(model, "fr"), x).layers[0].weight
    assert np.all(g.a[0] == 0) and np.any(g.a[1] != 0)
    del grads


def test_per_example_selection(setup, getkey):
    base, en, fr, model = setup
    xs = jr.normal(getkey(), (6, 4))
    idx = jnp.asarray([0, 1, 1, 0, 1, 0])
    out = jax.jit(jax.vmap(lambda x, i: _call(lora.set_adapter(model, i), x)))(xs, idx)
    for x, i, y in zip(xs, idx, out):
        ref = _dense(base, x, [(1.0, (en, fr)[int(i)])])
        assert np.allclose(y, ref, atol=1e-5)


def test_add_delete(setup, getkey):
    base, en, fr, model = setup
    de = randomise_model(lora.loraify(base, rank=4, key=getkey()), getkey())
    model3 = lora.add_adapter(model, "de", de)
    assert lora.adapter_names(model3) == ("en", "fr", "de")
    assert model3.layers[1].weight.a.shape[-1] == 4
    x = jr.normal(getkey(), (4,))
    assert np.allclose(_call(model3, x), _dense(base, x, [(1.0, en)]), atol=1e-5)  # still "en"
    assert np.allclose(
        _call(lora.set_adapter(model3, "de"), x), _dense(base, x, [(1.0, de)]), atol=1e-5
    )
    model2 = lora.delete_adapter(model3, "en")
    assert lora.adapter_names(model2) == ("fr", "de")
    assert np.allclose(
        _call(lora.set_adapter(model2, "fr"), x), _dense(base, x, [(1.0, fr)]), atol=1e-5
    )
    with pytest.raises(ValueError, match="`name` 'fr' is already"):
        lora.add_adapter(model, "fr", de)
    with pytest.raises(ValueError, match="`which` 'it' is not an adapter.*'en', 'fr'"):
        lora.set_adapter(model, "it")
    with pytest.raises(ValueError, match="index 5 is out of range"):
        lora.set_adapter(model, 5)
    other = lora.loraify(base, rank=2, key=getkey(), where=["layers.0"])
    with pytest.raises(ValueError, match="adapted at the same places"):
        lora.stack_adapters({"en": en, "x": other})


def test_combine(setup, getkey):
    base, en, fr, model = setup
    x = jr.normal(getkey(), (4,))
    w = {"en": 0.4, "fr": 1.5}
    ref = _dense(base, x, [(0.4, en), (1.5, fr)])
    cat = lora.combine_adapters(model, w)
    assert isinstance(cat.layers[0].weight, lora.LoraArray) and cat.layers[0].weight.rank == 5
    assert np.allclose(_call(cat, x), ref, atol=1e-5)
    full = lora.combine_adapters(model, w, how="svd", rank=5)
    assert np.allclose(_call(full, x), ref, atol=1e-4)
    low = lora.combine_adapters(model, w, how="svd", rank=1)
    assert low.layers[0].weight.rank == 1
    # Reference: the rank-1 truncated SVD of the summed update, written with numpy.
    for i in range(2):
        d = sum(
            c
            * np.asarray(
                dense_lora(
                    m.layers[i].weight._w,
                    m.layers[i].weight.a,
                    m.layers[i].weight.b,
                    m.layers[i].weight.scaling,
                )
                - m.layers[i].weight._w
            )
            for c, m in [(0.4, en), (1.5, fr)]
        )
        u, s, vt = np.linalg.svd(d)
        want = s[0] * np.outer(u[:, 0], vt[0])
        v = low.layers[i].weight
        assert np.allclose(np.asarray(v.a @ v.b) * float(v.scaling), want, atol=1e-4)


def _bytes_equal(x, y):
    xs, xt = jax.tree_util.tree_flatten(x)
    ys, yt = jax.tree_util.tree_flatten(y)
    assert xt == yt
    for a, b in zip(xs, ys):
        if eqx.is_array(a):
            assert a.dtype == b.dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_save_load_every_adapter(setup, tmp_path, getkey):
    import json

    from lora_jax._io import read_safetensors

    base, en, fr, model = setup
    model = lora.set_adapter(model, {"en": 0.3, "fr": 0.7})
    path = tmp_path / "stack.safetensors"
    lora.save_adapter(path, model)
    _, meta = read_safetensors(path)
    assert json.loads(meta["adapter_names"]) == ["en", "fr"] and meta["method"] == "multi_lora"
    fresh = lora.stack_adapters(
        {
            "en": lora.loraify(base, rank=2, key=getkey()),
            "fr": lora.loraify(base, rank=3, key=getkey()),
        }
    )
    loaded = lora.load_adapter(path, fresh)
    _bytes_equal(loaded, model)  # factors, scalings and the mixing weights
    x = jr.normal(getkey(), (4,))
    assert np.allclose(_call(loaded, x), _dense(base, x, [(0.3, en), (0.7, fr)]), atol=1e-5)
    other = lora.stack_adapters({"en": en, "de": fr})
    with pytest.raises(
        ValueError, match=r"with names \['en', 'fr'\], but `model` has \['en', 'de'\]"
    ):
        lora.load_adapter(path, other)
    same_shapes = lora.stack_adapters({"en": lora.loraify(base, rank=3, key=getkey()), "fr": fr})
    with pytest.raises(ValueError, match=r"with ranks \[2, 3\], but `model` has \[3, 3\]"):
        lora.load_adapter(path, same_shapes)
    with pytest.raises(ValueError, match="holds a 'multi_lora' adapter"):
        lora.load_adapter(path, en)


def test_save_one_adapter_of_many(setup, tmp_path, getkey):
    base, en, fr, model = setup
    path = tmp_path / "fr.safetensors"
    lora.save_adapter(path, model, adapter="fr")
    loaded = lora.load_adapter(path, lora.loraify(base, rank=3, key=getkey()))
    for i in range(2):
        got, want = loaded.layers[i].weight, fr.layers[i].weight
        for f in ("a", "b", "scaling"):
            assert np.asarray(getattr(got, f)).tobytes() == np.asarray(getattr(want, f)).tobytes()
    with pytest.raises(ValueError, match="`adapter` 'it' is not an adapter"):
        lora.save_adapter(path, model, adapter="it")
    with pytest.raises(ValueError, match="but `model` has none"):
        lora.save_adapter(path, en, adapter="en")
