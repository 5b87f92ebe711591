"""Dense references and comparisons shared by the tests."""

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-6):
    """Same structure, and every array leaf close."""
    xs, xt = jtu.tree_flatten(x)
    ys, yt = jtu.tree_flatten(y)
    if xt != yt:
        return False
    for a, b in zip(xs, ys):
        if eqx.is_array_like(a):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
                return False
        elif a != b:
            return False
    return True


def dense_lora(w, a, b, scaling):
    """The LoRA weight written plainly: w + s·a@b (batched over leading dims)."""
    s = jnp.asarray(scaling)[..., None, None]
    return w + s * jnp.einsum("...or,...ri->...oi", a, b)


def dense_dora(w, a, b, m, scaling):
    """DoRA written plainly: m ⊙ V / ‖V‖ with V = w + s·a@b, the norm over the input
    dimension of each output row and detached from the graph (PEFT's rule)."""
    v = dense_lora(w, a, b, scaling)
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True)))
    return m[..., :, None] * v / norm


def dense_lokr(w, w1, w2, scaling):
    """LoKr written plainly: w + s·kron(w1, w2)."""
    l, p = w1.shape
    k, q = w2.shape
    kron = jnp.einsum("ij,kl->ikjl", w1, w2).reshape(l * k, p * q)
    return w + scaling * kron


def dense_loha(w, w1a, w1b, w2a, w2b, scaling):
    """LoHa written plainly: w + s·(w1a@w1b) ⊙ (w2a@w2b)."""
    return w + scaling * (w1a @ w1b) * (w2a @ w2b)


def randomise_factors(adapter, key):
    """Give every trainable factor random values (an initialised adapter is a no-op,
    which would hide bugs in the products)."""
    fields = type(adapter).trainable_fields
    for field, k in zip(fields, jr.split(key, len(fields))):
        x = getattr(adapter, field)
        if x is None:
            continue
        adapter = eqx.tree_at(
            lambda v, f=field: getattr(v, f), adapter, jr.normal(k, x.shape, x.dtype)
        )
    return adapter


def randomise_model(model, key):
    from lora_jax import is_adapter

    leaves, treedef = jtu.tree_flatten(model, is_leaf=is_adapter)
    keys = jr.split(key, len(leaves))
    leaves = [randomise_factors(x, k) if is_adapter(x) else x for x, k in zip(leaves, keys)]
    return jtu.tree_unflatten(treedef, leaves)


def assert_no_dense_delta(jaxpr, out: int, inp: int):
    """No intermediate of the full (out, in) weight shape other than the base weight
    itself is built: the sum w + a@b is never formed."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            if eqn.primitive.name in ("add", "add_any") and shape[-2:] == (out, inp):
                raise AssertionError(f"materialised weight: {eqn}")


def jaxpr_eqns(jaxpr) -> list:
    """Every equation of `jaxpr` and of the jaxprs nested in it, in order."""
    eqns = []

    def visit(j):
        for eqn in j.eqns:
            eqns.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr)
    return eqns


def jaxpr_primitives(jaxpr) -> list[str]:
    return [eqn.primitive.name for eqn in jaxpr_eqns(jaxpr)]
