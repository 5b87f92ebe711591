"""`lora.remat_policy`: blocks under `jax.checkpoint` keep the adapted products and the
thin `b·x`, recompute everything elementwise, and compute the same gradients."""

import contextlib
import io
import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax
from jax.ad_checkpoint import print_saved_residuals

import lora_jax as lora

from .helpers import randomise_model


T, D, H = 16, 8, 32


class Block(eqx.Module):
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __call__(self, x):
        h = jax.nn.gelu(jax.vmap(self.up)(x))
        return x + jax.vmap(self.down)(h)


def make(method, getkey):
    block = Block(eqx.nn.Linear(D, H, key=getkey()), eqx.nn.Linear(H, D, key=getkey()))
    adapted = lora.loraify(block, rank=2, method=method, key=getkey())
    return randomise_model(adapted, getkey())


def _call(block, x):
    return block(x)


# The block is an argument of the checkpointed function, not a constant it closes over
# (JAX caches a checkpointed function's trace with its constants).
_checkpointed = eqx.filter_checkpoint(_call, policy=lora.remat_policy)


def loss(params, frozen, x, remat):
    block = eqx.combine(params, frozen)
    apply = _checkpointed if remat else _call
    return jnp.mean(quax.quaxify(apply)(block, x) ** 2)


@pytest.mark.parametrize("method", ["lora", "dora", "lokr", "loha"])
def test_same_gradients(method, getkey):
    params, frozen = lora.partition(make(method, getkey))
    x = jr.normal(getkey(), (T, D))
    plain = jax.jit(jax.grad(loss), static_argnums=3)(params, frozen, x, False)
    remat = jax.jit(jax.grad(loss), static_argnums=3)(params, frozen, x, True)
    for p, r in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(r, p, rtol=1e-5, atol=1e-6)


def saved_residuals(f, *args) -> list[tuple[int, str]]:
    """(size, description) of each value `jax.grad(f)` keeps for its backward pass,
    read from JAX's `print_saved_residuals` (the one public view of them)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    saved = []
    for line in out.getvalue().splitlines():
        shape = re.match(r"\s*\w+\[([\d,]*)\]", line)
        assert shape, line
        dims = [int(d) for d in shape.group(1).split(",") if d]
        saved.append((math.prod(dims), line))
    return saved


def full_size(residuals):
    """Saved values as large as a hidden activation (tokens × hidden)."""
    return [(n, why) for n, why in residuals if n >= T * H]


def test_keeps_one_activation_per_block(getkey):
    """Without the policy JAX keeps gelu's input and its intermediates (the down
    layer's input among them, for `b`'s gradient); with it, only the up projection's
    adapted product, and everything thin."""
    params, frozen = lora.partition(make("lora", getkey))
    x = jr.normal(getkey(), (T, D))
    without = full_size(saved_residuals(lambda p: loss(p, frozen, x, False), params))
    with_policy = saved_residuals(lambda p: loss(p, frozen, x, True), params)
    kept = full_size(with_policy)
    assert len(without) >= 2, without
    assert len(kept) == 1 and "lora_jax.output" in kept[0][1], kept
    thin = [why for _, why in with_policy if why.startswith(f"f32[{T},2]")]
    assert len(thin) == 2, with_policy  # b·x and b·h, kept (rank 2)
