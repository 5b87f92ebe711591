"""LoKr for convolution kernels: `w + s·(w1 ⊗ w2)`, as PEFT's LoKr for `Conv1d/2d`,
with or without `use_effective_conv2d`.

A kernel `w` of shape `(out, in/groups, *kernel)` has `out = l·k` and `in/groups = p·q`
split by PEFT's `factorization`; `w1` is `(l, p)` and `w2` is `(k, q, *kernel)`, and the
update is `Δ[(i, j), (u, v), *s] = w1[i, u]·w2[j, v, *s]`. `w2` is held whole or as
`w2_a (k, r) @ w2_b (r, q·kernel)` (PEFT's shapes), `w1` whole or as `w1_a @ w1_b`.
With `use_effective_conv2d` (PEFT's Tucker form, for a kernel larger than 1) a
decomposed `w2` is `w2[j, v, *s] = Σ_ab w2_a[j, a]·t2[a, b, *s]·w2_b[b, v]`, with the
core `t2 (r, r, *kernel)`, `w2_a (k, r)` and `w2_b (r, q)`.

The update is a conv LoRA of rank `p·c` in the `"peft"` form, `c` being `w2`'s rank
(`r`, or `k` for a whole `w2`): `b` is block-diagonal, `w2_b` (or `w2`; in the Tucker
form the core contracted with `w2_b`, `(r, q, *kernel)`, small) applied to each of the
`p` slices of `q` input channels on its own (a grouped conv with the kernel's size,
`b` repeated), and `a = w1 ⊗ w2_a` (or `w1 ⊗ I`) is a 1×1 conv to `out`. A conv
with the adapted kernel is `conv(x, w) + s·conv(conv(x, b), a)`; neither the Kronecker
product nor `w + Δ` is formed.
"""

import math

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from ._base import AbstractAdapter, as_scaling
from ._conv import (
    CONV_PATHS,
    ConvPath,
    check_conv_weight,
    lora_conv,
    per_kernel,
    register_conv_rules,
)
from ._dropout import module_keep, unit_mask
from ._lokr import check_lokr_options, lokr_factors
from ._validate import check_choice, check_dtype, check_not_empty


class LokrConvArray(AbstractAdapter):
    """Low-rank Kronecker product adaptation (LoKr) of a conv kernel `w` of shape
    `(out, in/groups, k_1, ..., k_n)`: `w + s·(w1 ⊗ w2)` with `w1 (l, p)`,
    `w2 (k, q, k_1, ..., k_n)`, `out = l·k`, `in/groups = p·q`, as PEFT's LoKr for a
    conv (its `lokr_w1`, ... tensors, the same shapes; `s = alpha/r`).

    With `use_effective_conv2d=True` and a decomposed `w2`, PEFT's Tucker form:
    `w2 = t2 ×₁ w2_a ×₂ w2_bᵀ`, the core `t2` of shape `(r, r, k_1, ..., k_n)`,
    `w2_a (k, r)` and `w2_b (r, q)` (PEFT's `lokr_w2_a` is `w2_a` transposed).

    A conv with this value as its kernel computes `conv(x, w) + s·conv(conv(x, b), a)`
    with `b` the block-diagonal conv of `w2_b` (or `w2`) over the `p` slices of each
    group's inputs and `a = w1 ⊗ w2_a` (or `w1 ⊗ I`) a 1×1 conv, with the strides,
    padding, dilations and feature groups of the call.
    """

    _w: Shaped[Array, "out in *kernel"]
    w1: Float[Array, "l p"] | None
    w1_a: Float[Array, "l rank"] | None
    w1_b: Float[Array, "rank p"] | None
    w2: Float[Array, "k q *kernel"] | None
    w2_a: Float[Array, "k rank"] | None
    w2_b: Float[Array, "rank q_kernel"] | None
    t2: Float[Array, "rank rank *kernel"] | None
    scaling: Float[Array, ""]
    dropout_key: PRNGKeyArray | None
    r: int = eqx.field(static=True)
    rank_dropout: float = eqx.field(static=True)
    module_dropout: float = eqx.field(static=True)
    rank_dropout_scale: bool = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    conv_path: str = eqx.field(static=True, default="factored")

    trainable_fields = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")

    def __init__(
        self,
        weight: Shaped[Array, "out in *kernel"],
        *,
        rank: int,
        key: PRNGKeyArray,
        alpha: float | None = None,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        init_weights: bool | str = True,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        use_effective_conv2d: bool = False,
        dtype=None,
        allow_materialise: bool = False,
        stop_gradient: bool = True,
        conv_path: ConvPath = "factored",
    ):
        """**Arguments:**

        - `weight`: the conv kernel to wrap, `(out, in/groups, k_1, ..., k_n)` with
            `n >= 1` spatial dimensions (Equinox's layout).
        - `rank`, `key`, `alpha`, `decompose_both`, `decompose_factor`,
            `init_weights`, `rank_dropout`, `module_dropout`, `rank_dropout_scale`,
            `dtype`, `allow_materialise`, `stop_gradient`: as for
            [`lora_jax.LokrArray`][], with `out` and `in/groups` split into the
            factors' sizes (rank dropout masks output channels).
        - `use_effective_conv2d`: PEFT's Tucker form: where `w2` is decomposed
            (`rank < max(k, q)/2`) and the kernel is larger than 1, `w2` is held as
            the core `t2 (r, r, *kernel)` between `w2_a (k, r)` and `w2_b (r, q)`
            (initialised as PEFT does: `t2` Kaiming-uniform). PEFT ignores it for a
            1×1 kernel, and so does this.
        - `conv_path`: as for [`lora_jax.LoraConvArray`][].

        !!! Example

            ```python
            import jax.lax as lax
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            w = jr.normal(jr.key(0), (4, 6, 3, 3))
            lw = lora.LokrConvArray(w, rank=2, key=jr.key(1))
            x = jnp.ones((1, 6, 8, 8))
            conv = lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME")
            assert jnp.allclose(quax.quaxify(conv)(lw), conv(w))
            ```
        """
        shape = check_conv_weight(weight)
        if not jnp.issubdtype(weight.dtype, jnp.floating):
            raise TypeError(f"`weight` must have a floating dtype, got {weight.dtype}.")
        check_not_empty(shape)
        check_choice(conv_path, "conv_path", CONV_PATHS)
        rank = check_lokr_options(
            rank=rank,
            key=key,
            alpha=alpha,
            decompose_both=decompose_both,
            decompose_factor=decompose_factor,
            init_weights=init_weights,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
            rank_dropout_scale=rank_dropout_scale,
            use_effective_conv2d=use_effective_conv2d,
            allow_materialise=allow_materialise,
            stop_gradient=stop_gradient,
        )
        dtype = check_dtype(dtype, weight.dtype)
        tucker = use_effective_conv2d and math.prod(shape[2:]) > 1
        factors = lokr_factors(
            key, shape, rank, decompose_both, decompose_factor, init_weights, dtype, tucker
        )
        self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2 = factors
        self._w = weight
        self.scaling = as_scaling(1.0 if alpha is None else alpha / rank)
        self.dropout_key = None
        self.r = rank
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.rank_dropout_scale = rank_dropout_scale
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise
        self.conv_path = conv_path

    @property
    def rank(self) -> int:
        return self.r

    def _w1(self) -> Array:
        return self.w1 if self.w1 is not None else self.w1_a @ self.w1_b

    def conv_factors(self, key: PRNGKeyArray | None = None) -> tuple[Array, Array, int]:
        """`(a, b, p)`: the equivalent conv LoRA, `a` of shape `(out, p·c, 1, ...)` and
        `b` of shape `(c, q, *kernel)` applied to each of the `p` slices of a group's
        input channels; with a `key`, PEFT's rank dropout (over output channels) and
        module dropout applied to `a`."""
        w1 = self._w1()
        window = self._w.shape[2:]
        if self.w2 is not None:
            c = self.w2.shape[0]
            b = self.w2
            a = jnp.kron(w1, jnp.eye(c, dtype=w1.dtype))
        else:
            c = self.w2_a.shape[1]
            if self.t2 is not None:  # the core contracted with `w2_b`: (r, q, *kernel)
                b = jnp.einsum("ab...,bv->av...", self.t2, self.w2_b)
            else:
                b = self.w2_b.reshape(c, -1, *window)
            a = jnp.kron(w1, self.w2_a)
        if key is not None:
            k_rank, k_module = jr.split(key)
            if self.rank_dropout > 0:
                channels = unit_mask(
                    k_rank, self.rank_dropout, a.shape[:1], a.dtype, rescale=self.rank_dropout_scale
                )
                a = a * channels[:, None]
            if self.module_dropout > 0:
                a = a * module_keep(k_module, self.module_dropout, (), a.dtype)
        return a.reshape(*a.shape, *(1,) * len(window)), b, w1.shape[1]

    @per_kernel
    def delta(self, key: PRNGKeyArray | None = None) -> Array:
        """The dense update, from the conv factors; with a `key`, under rank and module
        dropout."""
        a, b, blocks = self.conv_factors(key)
        a = a.reshape(a.shape[0], blocks, -1)  # (out, p, c)
        d = jnp.einsum("ouc,cv...->ouv...", a, b).reshape(self._w.shape)
        return d * lax.stop_gradient(self.scaling).astype(d.dtype)


def _lokr_conv(lhs, v: LokrConvArray, params):
    a, b, blocks = v.conv_factors(v.dropout_key)
    return lora_conv(lhs, v.w, a, b, lax.stop_gradient(v.scaling), "peft", params, blocks)


register_conv_rules(LokrConvArray, _lokr_conv)
