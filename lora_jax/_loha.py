"""LoHa: `w + s·(w1a @ w1b) ⊙ (w2a @ w2b)`, computed as a rank-`r²` LoRA through the
face-splitting identity, never forming the Hadamard product."""

import math

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import quax
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from . import _mosaic
from ._base import AbstractAdapter, as_scaling, expand_scaling
from ._dropout import module_keep, unit_mask
from ._rules import (
    Dims,
    lowrank_product,
    per_matrix,
    per_matrix_keys,
    plain_product,
    product_sharding,
    result_order,
)
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


class LohaArray(AbstractAdapter):
    """Low-rank Hadamard product adaptation (LoHa, FedPara; PEFT's / LyCORIS') of a
    matrix `w ∈ R^{n×m}`: `w + s·(w1a @ w1b) ⊙ (w2a @ w2b)` with `w1a, w2a ∈ R^{n×r}`,
    `w1b, w2b ∈ R^{r×m}` and `s = alpha / r`.

    The Hadamard product is never formed: by the face-splitting identity
    `(A1 B1) ⊙ (A2 B2) = (A1 •row A2)(B1 •col B2)` the update is a rank-`r²` LoRA whose
    factors are the row-wise Kronecker product of `w1a`, `w2a` (`n × r²`) and the
    column-wise one of `w1b`, `w2b` (`r² × m`). Leading dimensions of `w` (stacked
    layers) are carried by the factors too.
    """

    _w: Shaped[Array, "*batch out in"]
    w1a: Float[Array, "*batch out rank"]
    w1b: Float[Array, "*batch rank in"]
    w2a: Float[Array, "*batch out rank"]
    w2b: Float[Array, "*batch rank in"]
    scaling: Float[Array, "*batch"]
    dropout_key: PRNGKeyArray | None
    rank_dropout: float = eqx.field(static=True)
    module_dropout: float = eqx.field(static=True)
    # Whether the stored matrix is the transpose of the adapted one (rank dropout
    # masks the adapted matrix's output rows).
    transposed: bool = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    kernel: str = eqx.field(static=True, default="xla")

    trainable_fields = ("w1a", "w1b", "w2a", "w2b")

    def __init__(
        self,
        weight: Shaped[Array, "*batch out in"],
        *,
        rank: int,
        key: PRNGKeyArray,
        alpha: float | None = None,
        init_weights: bool = True,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        use_effective_conv2d: bool = False,
        dtype=None,
        allow_materialise: bool = False,
        stop_gradient: bool = True,
        kernel: str = "xla",
    ):
        """**Arguments:**

        - `weight`: the original weight, of shape `(*batch, out, in)`.
        - `rank`: PEFT's `r`.
        - `key`: randomness for initialising the factors.
        - `alpha`: the scaling is `alpha / rank`. `None` (the default) means a scaling
            of `1` (PEFT's default `alpha == r`).
        - `init_weights`: PEFT's: `True` (`w1a`, `w1b`, `w2a` Kaiming-uniform, `w2b`
            zero: a no-op) or `False` (all Kaiming-uniform: not a no-op).
        - `rank_dropout`: PEFT's: the probability of zeroing each output row of the
            update, the mask divided by its mean (as PEFT's LoHa always does).
        - `module_dropout`: PEFT's: the probability of skipping the update entirely
            (per layer of a stack).

            Both dropouts act only while the adapter holds a key (see
            [`lora_jax.with_dropout_keys`][]); they are the identity otherwise.
        - `use_effective_conv2d`: accepted for PEFT's configuration surface; it only
            concerns convolutions and has no effect on a matrix.
        - `dtype`: the factors' dtype. Defaults to the weight's.
        - `allow_materialise`, `stop_gradient`: as for [`lora_jax.LoraArray`][].
        - `kernel`: `"xla"` (the default) or `"mosaic"`: as for
            [`lora_jax.LoraArray`][], applied to the equivalent rank-`r²` LoRA, so
            where `r² ≤ 64` (rank 8 or less).

        !!! Example

            ```python
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            w = jr.normal(jr.key(0), (5, 4))
            lw = lora.LohaArray(w, rank=2, key=jr.key(1))
            x = jnp.ones(4)
            assert jnp.allclose(quax.quaxify(jnp.matmul)(lw, x), w @ x)
            ```
        """
        check_weight(weight, "weight")
        rank = check_rank(rank)
        check_key(key)
        if alpha is not None:
            check_scalar(alpha, "alpha", positive=True)
        if not isinstance(init_weights, bool):
            raise TypeError(f"`init_weights` must be True or False, got {init_weights!r}.")
        if not isinstance(use_effective_conv2d, bool):
            raise TypeError(f"`use_effective_conv2d` must be a bool, got {use_effective_conv2d!r}.")
        check_flags(allow_materialise=allow_materialise, stop_gradient=stop_gradient)
        check_probability(rank_dropout, "rank_dropout")
        check_probability(module_dropout, "module_dropout")
        check_choice(kernel, "kernel", ("xla", "mosaic"))
        dtype = check_dtype(dtype, weight.dtype)
        *batch, out, inp = weight.shape
        k1, k2, k3, k4 = jr.split(key, 4)

        def kaiming(k, shape):
            # PyTorch's kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(fan_in)), fan_in = shape[-1].
            bound = 1 / math.sqrt(shape[-1])
            return jr.uniform(k, shape, dtype, -bound, bound)

        self._w = weight
        self.w1a = kaiming(k1, (*batch, out, rank))
        self.w1b = kaiming(k2, (*batch, rank, inp))
        self.w2a = kaiming(k3, (*batch, out, rank))
        self.w2b = (
            kaiming(k4, (*batch, rank, inp))
            if not init_weights
            else (jnp.zeros((*batch, rank, inp), dtype))
        )
        self.scaling = as_scaling(1.0 if alpha is None else alpha / rank, tuple(batch))
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.transposed = False
        self.dropout_key = None
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise
        self.kernel = kernel

    @property
    def rank(self) -> int:
        return self.w1a.shape[-1]

    def lora_factors(self) -> tuple[Array, Array]:
        """The equivalent rank-`r²` LoRA factors `(a, b)`, `a @ b` equal to the update
        without the scaling."""
        return _face_split(self.w1a, self.w1b, self.w2a, self.w2b)

    def delta(self) -> Array:
        a, b = self.lora_factors()
        ab = a @ b
        return ab * expand_scaling(lax.stop_gradient(self.scaling), ab)

    def dot_general(self, other, dims: Dims, params):
        if per_matrix_keys(self):  # one dropout key per matrix of the stack
            return per_matrix(self, other, dims, params)
        a, b = self.lora_factors()
        if self.dropout_key is not None:
            k_rank, k_module = jr.split(self.dropout_key)
            *lead, units = a.shape[:-1] if not self.transposed else (*a.shape[:-2], b.shape[-1])
            if self.rank_dropout > 0:
                rows = unit_mask(k_rank, self.rank_dropout, (*lead, units), a.dtype, rescale=True)
                if self.transposed:
                    b = b * rows[..., None, :]
                else:
                    a = a * rows[..., :, None]
            if self.module_dropout > 0:
                keep = module_keep(k_module, self.module_dropout, tuple(lead), a.dtype)
                a = a * keep[..., None, None]
        # The kernel's gradient stops at `w`: a trained base takes XLA's path. Both
        # dropouts act on the factors, so the kernel takes them as they are.
        if self.kernel == "mosaic" and self.stop_gradient:
            scaling = lax.stop_gradient(self.scaling)
            out = _mosaic.product(self.w, a, b, scaling, other, dims, params, 0.0)
            if out is not None:
                return out
        return _loha_dot(self.w, a, b, lax.stop_gradient(self.scaling), other, dims, params)

    def transpose(self, permutation, *, swap):
        t = lambda x: lax.transpose(x, permutation)
        if swap:
            f = (t(self.w1b), t(self.w1a), t(self.w2b), t(self.w2a))
        else:
            f = (t(self.w1a), t(self.w1b), t(self.w2a), t(self.w2b))
        w = quax.quaxify(t)(self._w)
        s = lax.transpose(self.scaling, permutation[:-2])
        new = eqx.tree_at(lambda v: (v._w, v.w1a, v.w1b, v.w2a, v.w2b, v.scaling), self, (w, *f, s))
        # A static field: set on the fresh copy `tree_at` made.
        object.__setattr__(new, "transposed", self.transposed != swap)
        return new


def _face_split(w1a, w1b, w2a, w2b):
    *lead, out, r = w1a.shape
    inp = w1b.shape[-1]
    a = (w1a[..., :, :, None] * w2a[..., :, None, :]).reshape(*lead, out, r * r)
    b = (w1b[..., :, None, :] * w2b[..., None, :, :]).reshape(*lead, r * r, inp)
    return a, b


@quax.quaxify
def _loha_dot(w, a, b, scaling, other, dims: Dims, params):
    dims, perm = result_order(dims, w.ndim, other.ndim, params)
    out = plain_product(w, other, dims, params)
    a = a * expand_scaling(scaling, a)
    sharding = product_sharding(params.get("out_sharding"), out)
    delta = lowrank_product(a, b, other, dims, params.get("precision"), sharding)
    out = out + delta.astype(out.dtype)
    return out if perm is None else lax.transpose(out, perm)
