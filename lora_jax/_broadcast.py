"""Per-axis factors (DoRA's magnitudes, rank-dropout masks) laid along the dimensions of
a `dot_general` output, without transposing anything of activation size."""

import jax.numpy as jnp

from ._rules import Dims, output_position


def along_output(v, adapter_dims, dims: Dims, adapter_ndim: int, other_ndim: int, out_ndim: int):
    """`v`, whose axes are the adapter's dimensions `adapter_dims` (each free or batched
    in the product), reshaped to broadcast against the `dot_general` output. Returns
    `None` if one of them is contracted."""
    pos = [output_position(dims, adapter_ndim, other_ndim, d) for d in adapter_dims]
    if any(p is None for p in pos):
        return None
    order = sorted(range(len(pos)), key=lambda i: pos[i])
    v = jnp.transpose(v, order)  # `v` is small: a vector per layer
    shape = [1] * out_ndim
    for i in order:
        shape[pos[i]] = v.shape[order.index(i)]
    return v.reshape(shape)
