"""LoRA for embedding tables: `w + s·a @ b`, looked up as `w[i] + s·a[i] @ b`."""

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import quax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from ._base import AbstractAdapter, as_scaling
from ._lora import Init, _delta, _lora_dot, lora_scaling
from ._rules import Dims
from ._validate import (
    check_choice,
    check_dtype,
    check_flags,
    check_key,
    check_not_empty,
    check_rank,
    check_scalar,
)


class LoraEmbeddingArray(AbstractAdapter):
    """Replaces an embedding table `w ∈ R^{num×dim}` with `w + s·a @ b`, where
    `a ∈ R^{num×k}` and `b ∈ R^{k×dim}`.

    A lookup (`w[i]`, `jnp.take`, a vmapped `eqx.nn.Embedding`) gathers the rows of `w`
    and of `a`, then multiplies the `a` rows by `b`: the dense update is never formed.
    Products with the table (tied output heads) are computed as for
    [`lora_jax.LoraArray`][].

    PEFT's `lora_embedding_A` (shape `(rank, num)`) is `aᵀ` and `lora_embedding_B`
    (shape `(dim, rank)`) is `bᵀ`.
    """

    _w: Shaped[Array, "num dim"]
    a: Float[Array, "num rank"]
    b: Float[Array, "rank dim"]
    scaling: Float[Array, ""]
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)

    trainable_fields = ("a", "b")

    def __init__(
        self,
        weight: Shaped[Array, "num dim"],
        *,
        rank: int,
        scale: float = 0.01,
        allow_materialise: bool = False,
        stop_gradient: bool = True,
        key: PRNGKeyArray,
        alpha: float | None = None,
        rslora: bool = False,
        init: Init = "quax",
        dtype=None,
    ):
        """**Arguments:**

        - `weight`: the embedding table, `(num_embeddings, embedding_size)`.
        - `rank`, `scale`, `allow_materialise`, `stop_gradient`, `key`, `alpha`,
            `rslora`, `dtype`: as for [`lora_jax.LoraArray`][].
        - `init`: `"quax"` (`a ~ Normal(0, scale²)`, `b = 0`), `"peft"` (PEFT's
            embedding init: `a = 0` as `lora_embedding_A`, `b ~ Normal(0, 1)` as
            `lora_embedding_B`) or `"gaussian"` (`a = 0`, `b ~ Normal(0, 1/rank²)`).
            Each is a no-op at initialisation.

        !!! Example

            ```python
            import equinox as eqx
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            emb = eqx.nn.Embedding(10, 4, key=jr.key(0))
            lw = lora.LoraEmbeddingArray(emb.weight, rank=2, key=jr.key(1))
            emb = eqx.tree_at(lambda e: e.weight, emb, lw)
            y = quax.quaxify(emb)(jnp.array(3))
            ```
        """
        shape = getattr(weight, "shape", None)
        if shape is None or getattr(weight, "dtype", None) is None:
            raise TypeError(f"`weight` must be an array, got {type(weight).__name__}.")
        if len(shape) != 2:
            raise ValueError(
                "`weight` must be an embedding table (num_embeddings, embedding_size), "
                f"got shape {tuple(shape)}."
            )
        if not jnp.issubdtype(weight.dtype, jnp.floating):
            raise TypeError(f"`weight` must have a floating dtype, got {weight.dtype}.")
        check_not_empty(shape)
        check_rank(rank)
        check_key(key)
        check_flags(allow_materialise=allow_materialise, stop_gradient=stop_gradient)
        check_scalar(scale, "scale")
        if alpha is not None:
            check_scalar(alpha, "alpha", positive=True)
        check_choice(init, "init", ("quax", "peft", "gaussian"))
        dtype = check_dtype(dtype, weight.dtype)
        num, dim = shape
        if init == "quax":
            a = jr.normal(key, (num, rank), dtype) * jnp.asarray(scale, dtype)
            b = jnp.zeros((rank, dim), dtype)
        elif init == "peft":
            a = jnp.zeros((num, rank), dtype)
            b = jr.normal(key, (rank, dim), dtype)
        else:
            a = jnp.zeros((num, rank), dtype)
            b = jr.normal(key, (rank, dim), dtype) * jnp.asarray(1 / rank, dtype)
        self._w = weight
        self.a = a
        self.b = b
        self.scaling = as_scaling(lora_scaling(rank, alpha, rslora))
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def delta(self) -> Array:
        return _delta(self.a, self.b, lax.stop_gradient(self.scaling))

    def dot_general(self, other, dims: Dims, params):
        return _lora_dot(
            self.w, self.a, self.b, lax.stop_gradient(self.scaling), other, dims, params
        )

    def transpose(self, permutation, *, swap):
        # A tied output head reads the table transposed: still `w + s·a @ b`.
        t = lambda x: lax.transpose(x, permutation)
        a, b = (t(self.b), t(self.a)) if swap else (self.a, self.b)
        w = quax.quaxify(t)(self._w)
        return eqx.tree_at(lambda v: (v._w, v.a, v.b), self, (w, a, b))


# ---------------------------------------------------------------------------------------
# Lookups. Both rules slice rows of `a` exactly as rows of `w` are sliced (same indices,
# same clamping or filling, since both have `num` rows), then multiply by `b`.
# ---------------------------------------------------------------------------------------


@quax.quaxify
def _slice_lookup(w, a, b, scaling, starts, slice_sizes):
    rows, cols = slice_sizes
    out = lax.dynamic_slice(w, starts, slice_sizes)
    a_rows = lax.dynamic_slice(a, (starts[0], jnp.zeros_like(starts[0])), (rows, a.shape[1]))
    b_cols = lax.dynamic_slice(b, (jnp.zeros_like(starts[1]), starts[1]), (b.shape[0], cols))
    delta = (a_rows * scaling.astype(a.dtype)) @ b_cols
    return out + delta.astype(out.dtype)


@quax.register(lax.dynamic_slice_p)
def _(operand: LoraEmbeddingArray, *indices: ArrayLike, slice_sizes):
    if len(indices) != 2:
        # Dynamic slice sizes (not produced by Equinox or jnp indexing).
        return quax.quaxify(lambda x, *i: lax.dynamic_slice_p.bind(x, *i, slice_sizes=slice_sizes))(
            operand.materialise(), *indices
        )
    return _slice_lookup(
        operand.w,
        operand.a,
        operand.b,
        lax.stop_gradient(operand.scaling),
        indices,
        tuple(slice_sizes),
    )


@quax.quaxify
def _static_lookup(w, a, b, scaling, start, limit, strides):
    out = lax.slice(w, start, limit, strides)
    s0, s1 = strides if strides is not None else (1, 1)
    a_rows = lax.slice(a, (start[0], 0), (limit[0], a.shape[1]), (s0, 1))
    b_cols = lax.slice(b, (0, start[1]), (b.shape[0], limit[1]), (1, s1))
    delta = (a_rows * scaling.astype(a.dtype)) @ b_cols
    return out + delta.astype(out.dtype)


@quax.register(lax.slice_p)
def _(operand: LoraEmbeddingArray, *, start_indices, limit_indices, strides):
    # `w[3]` with a Python int: a static slice.
    return _static_lookup(
        operand.w,
        operand.a,
        operand.b,
        lax.stop_gradient(operand.scaling),
        tuple(start_indices),
        tuple(limit_indices),
        None if strides is None else tuple(strides),
    )


@quax.quaxify
def _squeeze_lookup(w, a, b, scaling, dimensions):
    # Only a table of one row (or of one column) squeezes: the update is that row.
    delta = (a * scaling.astype(a.dtype)) @ b
    out = lax.squeeze(w, dimensions)
    return out + lax.squeeze(delta, dimensions).astype(out.dtype)


@quax.register(lax.squeeze_p)
def _(operand: LoraEmbeddingArray, *, dimensions):
    # `w[0]` on a table of one row (RoBERTa's token types) is a squeeze, not a slice.
    return _squeeze_lookup(
        operand.w,
        operand.a,
        operand.b,
        lax.stop_gradient(operand.scaling),
        tuple(dimensions),
    )


@quax.quaxify
def _gather_lookup(w, a, b, scaling, indices, params, position):
    out = lax.gather_p.bind(w, indices, **params)
    # Out-of-bounds rows of `w` are filled (NaN under jnp.take's default mode); those
    # of `a` with zeros, so that the filled rows, which a plain table's gradient
    # ignores, do not turn the gradient of `b` into NaN.
    a_params = dict(params, slice_sizes=(params["slice_sizes"][0], a.shape[1]), fill_value=0)
    a_rows = lax.gather_p.bind(a, indices, **a_params)
    a_rows = a_rows * scaling.astype(a.dtype)
    # `a_rows` holds `rank` where `out` holds the embedding dimension.
    delta = lax.dot_general(a_rows, b, (((position,), (0,)), ((), ())))
    if position != out.ndim - 1:
        delta = jnp.moveaxis(delta, -1, position)
    return out + delta.astype(out.dtype)


@quax.register(lax.gather_p)
def _(operand: LoraEmbeddingArray, indices: ArrayLike, **params):
    dn = params["dimension_numbers"]
    dim = operand.shape[1]
    whole_rows = (
        tuple(params["slice_sizes"])[1] == dim
        and 1 not in dn.collapsed_slice_dims
        and not dn.operand_batching_dims
    )
    if not whole_rows:
        # A gather of part of a row: no factored rule.
        return quax.quaxify(lambda x, i: lax.gather_p.bind(x, i, **params))(
            operand.materialise(), indices
        )
    offset_axes = [d for d in range(2) if d not in dn.collapsed_slice_dims]
    position = dn.offset_dims[offset_axes.index(1)]
    return _gather_lookup(
        operand.w,
        operand.a,
        operand.b,
        lax.stop_gradient(operand.scaling),
        indices,
        params,
        position,
    )
