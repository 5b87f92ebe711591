"""Soak: a few thousand Adam steps of a small LoRA model (biases training too), saving
the adapter every `SAVE_EVERY` steps over the same file and loading it back into the
untrained model, training on from what was loaded.

Checked: every loss finite; the loss falling window after window (until it reaches
float32's floor); the reloaded adapter equal to the one in memory bitwise (every saved
leaf, and the forward pass); the frozen base bitwise unchanged at the end; no stray
files beside the adapter. A time limit stops the loop early on a slow machine; what ran
is still checked (at least two save/load round trips must have)."""

import os
import time

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

from .helpers import randomise_model


MAX_STEPS = 4000
SAVE_EVERY = 250
TIME_LIMIT = float(os.environ.get("LORA_JAX_SOAK_SECONDS", 150))
WINDOW = 250
FLOOR = 1e-9  # float32 noise: below this, the loss no longer has to fall


def _bitwise(x, y) -> bool:
    xs, xt = jtu.tree_flatten(eqx.filter(x, eqx.is_array))
    ys, yt = jtu.tree_flatten(eqx.filter(y, eqx.is_array))
    return xt == yt and all(
        a.dtype == b.dtype and a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(xs, ys)
    )


@pytest.mark.slow
def test_soak(tmp_path):
    key = jr.key(0)
    k_base, k_adapt, k_teacher, k_x = jr.split(key, 4)
    base = eqx.nn.MLP(16, 4, width_size=32, depth=2, activation=jnp.tanh, key=k_base)
    initial = lora.loraify(base, rank=4, alpha=8.0, key=k_adapt, init="peft")
    # A target the adapter can reach: the model under other factors and biases.
    teacher = randomise_model(initial, k_teacher)
    teacher = jtu.tree_map(lambda v: 0.3 * v if eqx.is_inexact_array(v) else v, teacher)
    teacher = eqx.tree_at(
        lambda m: [l._w for l in _adapters(m)],
        teacher,
        [l._w for l in _adapters(initial)],
    )
    x = jr.normal(k_x, (128, 16))
    forward = eqx.filter_jit(lambda m, x: quax.quaxify(lambda m, x: jax.vmap(m)(x))(m, x))
    y = forward(teacher, x)

    params, frozen = lora.partition(initial, train_bias="all")
    opt = optax.adam(3e-3)
    with jax.numpy_dtype_promotion("standard"):
        state = opt.init(params)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def step(params, state):
        def loss(params):
            return jnp.mean((forward(eqx.combine(params, frozen), x) - y) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction
            updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, value

    path = tmp_path / "adapter.safetensors"
    losses, round_trips = [], 0
    start = time.monotonic()
    for i in range(1, MAX_STEPS + 1):
        params, state, value = step(params, state)
        losses.append(float(value))
        if i % SAVE_EVERY == 0:
            model = eqx.combine(params, frozen)
            lora.save_adapter(path, model, train_bias="all")
            loaded = lora.load_adapter(path, initial)
            assert _bitwise(lora.partition(loaded, train_bias="all")[0], params), i
            assert _bitwise(loaded, model), i
            np.testing.assert_array_equal(forward(loaded, x), forward(model, x))
            # Train on from what was loaded.
            params = lora.partition(loaded, train_bias="all")[0]
            round_trips += 1
        if time.monotonic() - start > TIME_LIMIT:
            break

    assert round_trips >= 2, f"only {len(losses)} steps in {TIME_LIMIT}s"
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    windows = losses[: len(losses) // WINDOW * WINDOW].reshape(-1, WINDOW).mean(axis=1)
    assert windows[-1] < 0.05 * windows[0], windows
    for before, after in zip(windows, windows[1:]):
        assert after <= max(before, FLOOR), windows
    final = eqx.combine(params, frozen)
    assert _bitwise(lora.partition(final, train_bias="all")[1], frozen)
    assert _bitwise([l._w for l in _adapters(final)], [l._w for l in _adapters(initial)])
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]


def _adapters(model):
    return [x for x in jtu.tree_leaves(model, is_leaf=lora.is_adapter) if lora.is_adapter(x)]
