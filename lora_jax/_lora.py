"""LoRA: `w + s·a @ b`, computed as `w·x + s·a·(b·x)`."""

import math
from typing import Literal

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import quax
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from . import _mosaic
from ._base import AbstractAdapter, as_scaling, expand_scaling
from ._dropout import dropout as apply_dropout
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
    check_bool,
    check_choice,
    check_dtype,
    check_flags,
    check_key,
    check_probability,
    check_rank,
    check_scalar,
    check_weight,
)


Init = Literal["quax", "peft", "gaussian"]


def lora_scaling(rank: int, alpha: float | None, rslora: bool) -> float:
    """`1` when `alpha` is `None` (quax's convention), `alpha / rank` (PEFT's), or
    `alpha / sqrt(rank)` with `rslora` (rank-stabilised LoRA)."""
    check_bool(rslora, "rslora")
    if alpha is None:
        if rslora:
            raise ValueError("`rslora=True` needs `alpha`: the scaling is alpha/sqrt(rank).")
        return 1.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def init_factors(key, a_shape, b_shape, *, init: str, rank: int, scale, fan_in: int, dtype):
    """The factors `(a, b)` at initialisation, `a @ b = 0`: quax's (`a` normal with
    standard deviation `scale`, `b` zeros), PEFT's (`a` zeros, `b` as PyTorch's
    kaiming-uniform of a layer with `fan_in` inputs) or `"gaussian"` (`a` zeros, `b`
    normal with standard deviation `1/rank`)."""
    if init == "quax":
        return jr.normal(key, a_shape, dtype) * jnp.asarray(scale, dtype), jnp.zeros(b_shape, dtype)
    a = jnp.zeros(a_shape, dtype)
    if init == "peft":
        bound = 1 / math.sqrt(fan_in)
        return a, jr.uniform(key, b_shape, dtype, -bound, bound)
    return a, jr.normal(key, b_shape, dtype) * jnp.asarray(1 / rank, dtype)


class LoraArray(AbstractAdapter):
    """Replaces a matrix `w ∈ R^{n×m}` with `w + s·a @ b`, where `a ∈ R^{n×k}`,
    `b ∈ R^{k×m}` and `s` is a scalar scaling.

    The sum is never formed: quax's dispatch computes every product with the matrix as
    `w·x + s·a·(b·x)`. Leading dimensions of `w` (stacked layers) are carried by the
    factors too. A drop-in replacement for `quax.examples.lora.LoraArray`.
    """

    _w: Shaped[Array, "*batch out in"]
    a: Float[Array, "*batch out rank"]
    b: Float[Array, "*batch rank in"]
    scaling: Float[Array, "*batch"]
    dropout_key: PRNGKeyArray | None
    dropout: float = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    kernel: str = eqx.field(static=True, default="xla")

    trainable_fields = ("a", "b")

    def __init__(
        self,
        weight: Shaped[Array, "*batch out in"],
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
        dropout: float = 0.0,
        kernel: str = "xla",
    ):
        """**Arguments:**

        - `weight`: the original weight to wrap, of shape `(*batch, out, in)`.
        - `rank`: the rank of the low-rank adaptation.
        - `scale`: with `init="quax"`, `a` is initialised at `Normal(0, scale²)`.
        - `allow_materialise`: if an operation has no rule for `LoraArray`, either
            (a) raise an error (`False`, the default), or (b) silently form
            `w + s·a @ b` and carry on (`True`).
        - `stop_gradient`: whether to stop the gradient of (freeze) `weight`.
        - `key`: randomness for initialising the factors.
        - `alpha`: the scaling is `alpha / rank` (PEFT's `lora_alpha`). `None` (the
            default) keeps quax's scaling of `1`.
        - `rslora`: scale by `alpha / sqrt(rank)` instead (rank-stabilised LoRA).
        - `init`: `"quax"` (`a ~ Normal(0, scale²)`, `b = 0`), `"peft"` (`a = 0`, `b`
            Kaiming-uniform as PEFT's `lora_A`) or `"gaussian"` (`a = 0`,
            `b ~ Normal(0, 1/rank²)`). Each makes the adapter a no-op at
            initialisation.
        - `dtype`: the factors' dtype (float32 factors on a bfloat16 base, say).
            Defaults to the weight's.
        - `dropout`: PEFT's `lora_dropout`: the probability of zeroing an element of
            the input to the low-rank path (`s·a·(b·dropout(x))`; `w·x` sees `x`).
            Active only while the adapter holds a key, given by
            [`lora_jax.with_dropout_keys`][]; the identity otherwise.
        - `kernel`: how a product with the adapted matrix is computed. `"xla"` (the
            default): `w·x + s·a·(b·x)` as XLA's products. `"mosaic"`: on a Hopper GPU
            (H100, H200), a linear layer's product and its input gradient are each one
            Mosaic GPU kernel that adds the low-rank term to the large product's
            accumulator, so the activation-sized `s·a·(b·x)` is never written. It
            applies to bf16/f16 weights (quantised ones too) with factors and inputs
            of the same dtype, rank ≤ 64, no dropout, a frozen base
            (`stop_gradient=True`), the product `x·wᵀ` over the
            input's last axis (a `Linear` under `vmap`, or `x @ w.T`), rows a
            multiple of 256, `out` of 128 and `in` of 64 (the input gradient's kernel
            also needs `in` a multiple of 128, and is XLA's product otherwise); every
            other product (and every other backend) takes XLA's path. Under `jit`
            with sharded inputs the kernel is split over the devices like XLA's
            products (on a mesh with explicit axes, XLA's path is taken). See the
            [performance notes](../howto/performance.md#a-fused-kernel-on-hopper-gpus-kernelmosaic).

        !!! Example

            ```python
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            w = jr.normal(jr.key(0), (3, 4))
            lw = lora.LoraArray(w, rank=2, key=jr.key(1))
            x = jnp.ones(4)
            assert jnp.allclose(quax.quaxify(jnp.matmul)(lw, x), w @ x)
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
        self.dropout = float(dropout)
        self.dropout_key = None
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise
        self.kernel = kernel

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def delta(self) -> Array:
        return _delta(self.a, self.b, lax.stop_gradient(self.scaling))

    def dot_general(self, other, dims: Dims, params):
        if per_matrix_keys(self):  # one dropout key per matrix of the stack
            return per_matrix(self, other, dims, params)
        # The kernel's gradient stops at `w`: a trained base takes XLA's path.
        if self.kernel == "mosaic" and self.stop_gradient:
            rate = self.dropout if self.dropout_key is not None else 0.0
            out = _mosaic.product(
                self.w, self.a, self.b, lax.stop_gradient(self.scaling), other, dims, params, rate
            )
            if out is not None:
                return out
        return _lora_dot(
            self.w,
            self.a,
            self.b,
            lax.stop_gradient(self.scaling),
            other,
            dims,
            params,
            self.dropout_key,
            self.dropout,
        )

    def factor_specs(self, spec):
        # `a` shares `w`'s `out` axis, `b` its `in` axis; the rank is replicated.
        *lead, out, inp = spec
        return {"a": (*lead, out, None), "b": (*lead, None, inp)}

    def transpose(self, permutation, *, swap):
        t = lambda x: lax.transpose(x, permutation)
        a, b = (t(self.b), t(self.a)) if swap else (t(self.a), t(self.b))
        w = quax.quaxify(t)(self._w)
        # One scaling per stacked matrix: it follows the stacking dimensions.
        s = lax.transpose(self.scaling, permutation[:-2])
        return eqx.tree_at(lambda v: (v._w, v.a, v.b, v.scaling), self, (w, a, b, s))


def _delta(a, b, scaling):
    batch = tuple(range(a.ndim - 2))
    ab = lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)))
    return ab * expand_scaling(scaling, ab)


@quax.quaxify
def _lora_dot(w, a, b, scaling, other, dims: Dims, params, key=None, rate=0.0):
    dims, perm = result_order(dims, w.ndim, other.ndim, params)
    out = plain_product(w, other, dims, params)
    a = a * expand_scaling(scaling, a)
    # The caller's `out_sharding` is the result's; the thin products derive theirs.
    sharding = product_sharding(params.get("out_sharding"), out)
    other = apply_dropout(key, rate, other)
    delta = lowrank_product(a, b, other, dims, params.get("precision"), sharding)
    out = out + delta.astype(out.dtype)
    return out if perm is None else lax.transpose(out, perm)
