"""Dropout inside adapters: the rates are fixed at construction; the randomness arrives
with the model, as a key held by each adapter (`None`: inference, the identity)."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import PRNGKeyArray, PyTree

from ._base import is_adapter
from ._validate import check_key


def with_dropout_keys(model: PyTree, key: PRNGKeyArray | None) -> PyTree:
    """Gives every adapter in `model` its own dropout key, switching its dropout on
    (LoRA's and DoRA's `dropout`, LoKr's and LoHa's `rank_dropout` and
    `module_dropout`); `key=None` takes the keys away again (inference: every dropout
    is the identity). Adapters built without dropout are unaffected.

    Call it inside the loss function with a fresh key each step, so that the model the
    optimiser sees never holds a key.

    **Arguments:**

    - `model`: a PyTree holding adapters.
    - `key`: a JAX PRNG key, split once per adapter (and once per matrix of a stacked
        adapter, so that `lax.scan` over the stack gives each layer its own), or
        `None`.

    **Returns:**

    A copy of `model`.

    !!! Note

        One key per adapter per call: an adapter applied to several inputs in one call
        draws its masks from the same key. Under `jax.vmap(quax.quaxify(model))` the
        masks are shared across the batch unless the key is vmapped too (split one key
        per example); with `jax.vmap` inside `quax.quaxify`
        (`quax.quaxify(lambda m, x: jax.vmap(m)(x))(model, x)`) the adapter's rule sees
        the whole batch and draws independent masks.

    !!! Example

        ```python
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        model = lora.loraify(
            eqx.nn.Linear(4, 3, key=jr.key(0)), rank=2, dropout=0.5, key=jr.key(1)
        )
        train = lora.with_dropout_keys(model, jr.key(2))
        y = quax.quaxify(train)(jnp.ones(4))
        ```
    """
    if key is not None:
        check_key(key)
    leaves, treedef = jtu.tree_flatten(model, is_leaf=is_adapter)
    holders = [i for i, x in enumerate(leaves) if is_adapter(x) and hasattr(x, "dropout_key")]
    keys = [None] * len(holders) if key is None else list(jr.split(key, max(len(holders), 1)))
    for i, k in zip(holders, keys):
        stack = leaves[i].scaling.shape  # a stacked adapter: one key per matrix
        if k is not None and stack:
            k = jr.split(k, stack)
        leaves[i] = eqx.tree_at(lambda v: v.dropout_key, leaves[i], k, is_leaf=lambda x: x is None)
    return jtu.tree_unflatten(treedef, leaves)


def dropout(key, rate: float, x):
    """Inverted dropout of `x`'s elements at `rate` (the identity without a key)."""
    if key is None or rate == 0:
        return x
    keep = jr.bernoulli(key, 1 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1 - rate, x.dtype), jnp.zeros((), x.dtype))


def unit_mask(key, rate: float, shape, dtype, *, rescale: bool):
    """PEFT's rank dropout: a 0/1 mask over output units (the last axis of `shape`),
    divided by its mean if `rescale`."""
    keep = jr.bernoulli(key, 1 - rate, shape).astype(dtype)
    if rescale:
        # PEFT divides by the mean over all units; guard the all-dropped case.
        mean = jnp.mean(keep, axis=-1, keepdims=True)
        keep = keep / jnp.maximum(mean, jnp.asarray(1e-12, dtype))
    return keep


def module_keep(key, rate: float, shape, dtype):
    """PEFT's module dropout: the whole update kept with probability `1 - rate`."""
    return jr.bernoulli(key, 1 - rate, shape).astype(dtype)
