"""DoRA: `m ⊙ (w + s·a @ b) / ‖w + s·a @ b‖`, the norm taken per output unit, computed
as `(m / n) ⊙ (w·x + s·a·(b·x))` without forming the sum."""

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import quax
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from . import _mosaic
from ._base import AbstractAdapter, as_scaling, expand_scaling
from ._broadcast import along_output
from ._dropout import dropout as apply_dropout
from ._lora import Init, init_factors, lora_scaling
from ._remat import OUTPUT_NAME
from ._rules import Dims, join_dims, lowrank_product, per_matrix, per_matrix_keys, result_order
from ._validate import (
    check_choice,
    check_dtype,
    check_flags,
    check_key,
    check_probability,
    check_rank,
    check_scalar,
    check_weight,
)


class DoraArray(AbstractAdapter):
    """Weight-decomposed low-rank adaptation (DoRA, Liu et al. 2024) of a matrix
    `w ∈ R^{n×m}`: `w' = m ⊙ (w + s·a @ b) / ‖w + s·a @ b‖`, the norm taken over the
    input dimension for each of the `n` output units and the magnitudes `m ∈ R^n`
    trained along with `a ∈ R^{n×k}` and `b ∈ R^{k×m}`.

    As in PEFT, the norm is detached from the graph (no gradient flows through it), and
    `m` starts at the row norms of `w`, so the adapter is a no-op at initialisation.

    Neither `w + s·a @ b` nor `w'` is ever formed: a product with the matrix is
    `(m / n) ⊙ (w·x + s·a·(b·x))`, the squared norms coming from
    `‖w_j‖² + 2s⟨w_j, (a @ b)_j⟩ + s²‖(a @ b)_j‖²` with `⟨w_j, (a@b)_j⟩ = Σ_k a_jk (w bᵀ)_jk`
    and `‖(a @ b)_j‖² = a_j (b bᵀ) a_jᵀ`: `O(n·k)` memory beyond `w`. Leading dimensions of
    `w` (stacked layers) are carried by `a`, `b` and `m` too.
    """

    _w: Shaped[Array, "*batch out in"]
    a: Float[Array, "*batch out rank"]
    b: Float[Array, "*batch rank in"]
    m: Float[Array, "*batch out"]
    scaling: Float[Array, "*batch"]
    dropout_key: PRNGKeyArray | None
    dropout: float = eqx.field(static=True)
    # Which axis of the stored matrix holds the output units: -2, or -1 once transposed.
    axis: int = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    kernel: str = eqx.field(static=True, default="xla")

    trainable_fields = ("a", "b", "m")

    def __init__(
        self,
        weight: Shaped[Array, "*batch out in"],
        *,
        rank: int,
        key: PRNGKeyArray,
        alpha: float | None = None,
        rslora: bool = False,
        init: Init = "quax",
        scale: float = 0.01,
        dtype=None,
        dropout: float = 0.0,
        allow_materialise: bool = False,
        stop_gradient: bool = True,
        kernel: str = "xla",
    ):
        """**Arguments:**

        - `weight`: the original weight, of shape `(*batch, out, in)`.
        - `rank`, `key`, `alpha`, `rslora`, `init`, `scale`, `dtype`,
            `allow_materialise`, `stop_gradient`, `kernel`: as for
            [`lora_jax.LoraArray`][]. The magnitudes `m` take the factors' dtype. With
            `kernel="mosaic"` the fused kernel computes `w·x + s·a·(b·x)` and the
            magnitudes scale its output.
        - `dropout`: PEFT's `lora_dropout` for DoRA: while the adapter holds a key
            (see [`lora_jax.with_dropout_keys`][]), the product is
            `w·x + (m/n - 1) ⊙ w·x̃ + (m/n) ⊙ s·a·(b·x̃)` with `x̃` the dropped-out input,
            as PEFT computes it (one more product with `w`); the identity otherwise.

        !!! Example

            ```python
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            w = jr.normal(jr.key(0), (3, 4))
            dw = lora.DoraArray(w, rank=2, key=jr.key(1))
            x = jnp.ones(4)
            assert jnp.allclose(quax.quaxify(jnp.matmul)(dw, x), w @ x, atol=1e-6)
            ```
        """
        check_weight(weight, "weight")
        check_rank(rank)
        check_key(key)
        check_flags(allow_materialise=allow_materialise, stop_gradient=stop_gradient)
        check_scalar(scale, "scale")
        check_probability(dropout, "dropout")
        check_choice(kernel, "kernel", ("xla", "mosaic"))
        if alpha is not None:
            check_scalar(alpha, "alpha", positive=True)
        if init not in ("quax", "peft", "gaussian"):
            raise ValueError(f"`init` must be one of 'quax', 'peft' or 'gaussian', got {init!r}.")
        dtype = check_dtype(dtype, weight.dtype)
        *batch, out, inp = weight.shape
        a_shape, b_shape = (*batch, out, rank), (*batch, rank, inp)
        a, b = init_factors(
            key,
            a_shape,
            b_shape,
            init=init,
            rank=rank,
            scale=scale,
            fan_in=inp,
            dtype=dtype,
        )
        self._w = weight
        self.a = a
        self.b = b
        self.scaling = as_scaling(lora_scaling(rank, alpha, rslora), tuple(batch))
        self.axis = -2
        self.kernel = kernel
        self.m = _norm(weight, a, b, self.scaling, -2)
        self.dropout = float(dropout)
        self.dropout_key = None
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def norm(self) -> Array:
        """`‖w + s·a @ b‖` per output unit, shape `(*batch, out)` (not detached)."""
        return _norm(self.w, self.a, self.b, lax.stop_gradient(self.scaling), self.axis)

    def delta(self) -> Array:
        return _delta(self.w, self.a, self.b, self.m, lax.stop_gradient(self.scaling), self.axis)

    def dot_general(self, other, dims: Dims, params):
        if per_matrix_keys(self):  # one dropout key per matrix of the stack
            return per_matrix(self, other, dims, params)
        # The kernel's gradient stops at `w`: a trained base takes XLA's path.
        if self.kernel == "mosaic" and self.stop_gradient and self.axis == -2:
            rate = self.dropout if self.dropout_key is not None else 0.0
            scaling = lax.stop_gradient(self.scaling)
            out = _mosaic.product(self.w, self.a, self.b, scaling, other, dims, params, rate)
            if out is not None:
                # The output units are the product's first axis with the matrix on the
                # left, its last otherwise (`_mosaic.product` takes plain `x·wᵀ` only).
                g = self.m / lax.stop_gradient(_norm(self.w, self.a, self.b, scaling, -2))
                g = g.astype(out.dtype)
                ones = [1] * (out.ndim - 1)
                g = g.reshape(-1, *ones) if dims.adapter_lhs else g.reshape(*ones, -1)
                return checkpoint_name(out, OUTPUT_NAME) * g
        return _dora_dot(
            self.w,
            self.a,
            self.b,
            self.m,
            lax.stop_gradient(self.scaling),
            self.axis,
            other,
            dims,
            params,
            self.dropout_key,
            self.dropout,
        )

    def transpose(self, permutation, *, swap):
        t = lambda x: lax.transpose(x, permutation)
        a, b = (t(self.b), t(self.a)) if swap else (t(self.a), t(self.b))
        m = lax.transpose(self.m, permutation[:-2] + (len(permutation) - 2,))
        w = quax.quaxify(t)(self._w)
        axis = (-1 if self.axis == -2 else -2) if swap else self.axis
        s = lax.transpose(self.scaling, permutation[:-2])
        new = eqx.tree_at(lambda v: (v._w, v.a, v.b, v.m, v.scaling), self, (w, a, b, m, s))
        object.__setattr__(new, "axis", axis)
        return new


@quax.quaxify
def _norm(w, a, b, scaling, axis: int):
    """Per-unit norms of `w + s·a @ b` along `axis` (-2: rows, -1: columns of the stored
    matrix), from thin products only. Cast to the factors' dtype.

    The sum `‖w_j‖² + 2s⟨w_j, (a@b)_j⟩ + s²‖(a@b)_j‖²` cancels when the adapted row is
    much shorter than its parts, so it is accumulated in float32 (at least) from the
    unrounded inputs: in bfloat16 a row shorter than a tenth of its parts came out as a
    norm of zero (and the output as NaN)."""
    acc = a.dtype if jnp.finfo(a.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    s = scaling.astype(acc)[..., None]
    batch = tuple(range(a.ndim - 2))
    n = a.ndim

    def dot(x, y, contract):
        return lax.dot_general(x, y, (contract, (batch, batch)), preferred_element_type=acc)

    # ‖w_j‖²: XLA fuses the cast and the square into the reduction.
    ww = jnp.sum(jnp.square(w.astype(acc)), axis=-1 if axis == -2 else -2)
    if axis == -2:
        # Σ_k a_jk (w bᵀ)_jk and a_j (b bᵀ) a_jᵀ.
        wb = dot(w, b, ((n - 1,), (n - 1,)))
        cross = jnp.sum(a.astype(acc) * wb, axis=-1)
        bb = dot(b, b, ((n - 1,), (n - 1,)))
        quad = jnp.sum(dot(a, bb, ((n - 1,), (n - 2,))) * a.astype(acc), -1)
    else:
        # Σ_k b_kj (aᵀ w)_kj and b_jᵀ (aᵀ a) b_j.
        aw = dot(a, w, ((n - 2,), (n - 2,)))
        cross = jnp.sum(b.astype(acc) * aw, axis=-2)
        aa = dot(a, a, ((n - 2,), (n - 2,)))
        quad = jnp.sum(dot(aa, b, ((n - 1,), (n - 2,))) * b.astype(acc), -2)
    sq = ww + 2 * s * cross + s * s * quad
    return jnp.sqrt(jnp.maximum(sq, jnp.zeros((), acc))).astype(a.dtype)


def _per_unit(g, axis):
    """`g` of shape `(*batch, units)` broadcast against the stored matrix."""
    return g[..., :, None] if axis == -2 else g[..., None, :]


@quax.quaxify
def _delta(w, a, b, m, scaling, axis):
    # The norm detached from the graph (PEFT's DoRA), as in the product rules.
    g = m / lax.stop_gradient(_norm(w, a, b, scaling, axis))
    batch = tuple(range(a.ndim - 2))
    ab = lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)))
    merged = _per_unit(g, axis) * (w.astype(a.dtype) + expand_scaling(scaling, ab) * ab)
    return merged - w.astype(a.dtype)


@quax.quaxify
def _dora_dot(w, a, b, m, scaling, axis, other, dims: Dims, params, key=None, rate=0.0):
    dims, perm = result_order(dims, w.ndim, other.ndim, params)
    out = _dora_product(w, a, b, m, scaling, axis, other, dims, params, key, rate)
    return out if perm is None else lax.transpose(out, perm)


def _dora_product(w, a, b, m, scaling, axis, other, dims: Dims, params, key, rate):
    n = a.ndim
    g = m / lax.stop_gradient(_norm(w, a, b, scaling, axis))
    a = a * expand_scaling(scaling, a)
    precision = params.get("precision")
    unit_dim = n - 2 if axis == -2 else n - 1

    def dot(x, y):
        dn = join_dims(*dims)
        return (
            lax.dot_general(x, y, dn, **params)
            if dims.adapter_lhs
            else (lax.dot_general(y, x, dn, **params))
        )

    out_ndim = (
        len(dims.adapter_batch)
        + (n - len(dims.adapter_contract) - len(dims.adapter_batch))
        + (other.ndim - len(dims.other_contract) - len(dims.other_batch))
    )
    dropped = apply_dropout(key, rate, other)
    g_out = along_output(g, (*range(n - 2), unit_dim), dims, n, other.ndim, out_ndim)
    if g_out is not None:
        # The usual case: the output units (and any stacking dimensions) survive in the
        # product, so the magnitudes scale its output.
        out = dot(w, other)
        g_out = g_out.astype(out.dtype)
        delta = lowrank_product(a, b, dropped, dims, precision).astype(out.dtype)
        if dropped is other:
            # Named so that `remat_policy` keeps it: the magnitudes' gradient needs it,
            # and recomputing it would redo the full product.
            return checkpoint_name(out + delta, OUTPUT_NAME) * g_out
        # PEFT's training form: w·x + (g - 1)·w·x̃ + g·s·a·(b·x̃).
        return out + (g_out - 1) * dot(w, dropped) + g_out * delta
    # Fallback, for products that contract the output units or a stacking dimension
    # (`x @ w` on an untransposed matrix, say): scale a copy of `w` by the magnitudes.
    # This is one full-size intermediate (never `w + Δ`).
    gw = _per_unit(g, axis)
    if axis == -2:
        a = a * g[..., :, None]
    else:
        b = b * g[..., None, :]
    delta = lowrank_product(a, b, dropped, dims, precision)
    gw = w * gw.astype(w.dtype)
    if dropped is other:
        out = dot(gw, other)
    else:
        out = dot(w, other) + dot(gw, dropped) - dot(w, dropped)
    return out + delta.astype(out.dtype)
