"""LoHa for convolution kernels: `w + s·((w1a @ w1b) ⊙ (w2a @ w2b))` with the kernel
seen as the matrix `(out, in·k_1···k_n)`, as PEFT's LoHa for `Conv1d/2d` without
`use_effective_conv2d`; with it (PEFT's Tucker form), each of the two factors is a
Tucker product `w1[o, i, *s] = Σ_ab w1a[o, a]·t1[a, b, *s]·w1b[b, i]` with a core
`t1 (r, r, *kernel)`, and the update is `s·(w1 ⊙ w2)`.

By the face-splitting identity the update is a rank-`r²` conv LoRA in the `"peft"`
form: a conv with the kernel's size from `in` to `r²` channels (`w1b •col w2b`), then a
1×1 conv to `out` (`w1a •row w2a`). A conv with the adapted kernel is computed as
`conv(x, w) + s·conv(conv(x, b'), a')` with those factors; neither the Hadamard product
nor `w + Δ` is formed. In the Tucker form `w1b` is the core contracted with `w1b`,
`(r, in·window)`, small.
"""

import math

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from ._base import AbstractAdapter
from ._conv import (
    CONV_PATHS,
    ConvPath,
    check_conv_weight,
    conv_delta,
    lora_conv,
    per_kernel,
    register_conv_rules,
)
from ._dropout import module_keep, unit_mask
from ._loha import LohaArray, _face_split
from ._lokr import _kaiming
from ._validate import check_choice


class LohaConvArray(AbstractAdapter):
    """Low-rank Hadamard product adaptation (LoHa) of a conv kernel `w` of shape
    `(out, in/groups, k_1, ..., k_n)`: `w + s·((w1a @ w1b) ⊙ (w2a @ w2b))` reshaped to
    the kernel's shape, with `w1a, w2a` of shape `(out, r)`, `w1b, w2b` of shape
    `(r, in/groups · k_1···k_n)` (PEFT's `hada_w1_a`, ... for a conv) and `s = alpha/r`.

    With `use_effective_conv2d=True` and a kernel larger than 1, PEFT's Tucker form:
    `w + s·(W1 ⊙ W2)`, `W1[o, i, *s] = Σ_ab w1a[o, a]·t1[a, b, *s]·w1b[b, i]` (and
    `W2` alike), with the cores `t1, t2` of shape `(r, r, k_1, ..., k_n)`, `w1a, w2a`
    of shape `(out, r)` (PEFT's `hada_w1_a` is `w1a` transposed) and `w1b, w2b` of
    shape `(r, in/groups)`.

    A conv with this value as its kernel computes `conv(x, w) + s·conv(conv(x, b'), a')`
    with `a' = w1a •row w2a` (a 1×1 conv, `r²` channels to `out`) and
    `b' = w1b •col w2b` (a conv with the kernel's size, `in` to `r²` channels), with
    the strides, padding, dilations and feature groups of the call.
    """

    _w: Shaped[Array, "out in *kernel"]
    w1a: Float[Array, "out rank"]
    w1b: Float[Array, "rank fan_in"]
    w2a: Float[Array, "out rank"]
    w2b: Float[Array, "rank fan_in"]
    t1: Float[Array, "rank rank *kernel"] | None
    t2: Float[Array, "rank rank *kernel"] | None
    scaling: Float[Array, ""]
    dropout_key: PRNGKeyArray | None
    rank_dropout: float = eqx.field(static=True)
    module_dropout: float = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    conv_path: str = eqx.field(static=True, default="factored")

    trainable_fields = ("w1a", "w1b", "w2a", "w2b", "t1", "t2")

    def __init__(
        self,
        weight: Shaped[Array, "out in *kernel"],
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
        conv_path: ConvPath = "factored",
    ):
        """**Arguments:**

        - `weight`: the conv kernel to wrap, `(out, in/groups, k_1, ..., k_n)` with
            `n >= 1` spatial dimensions (Equinox's layout).
        - `rank`, `key`, `alpha`, `init_weights`, `rank_dropout`, `module_dropout`,
            `dtype`, `allow_materialise`, `stop_gradient`: as for
            [`lora_jax.LohaArray`][], the kernel seen as the matrix
            `(out, in/groups · k_1···k_n)` (rank dropout masks output channels).
        - `use_effective_conv2d`: PEFT's Tucker form (see above) for a kernel larger
            than 1, initialised as PEFT does (`w1a`, `w1b`, `w2a`, `t1`, `t2`
            Kaiming-uniform in PEFT's shapes, `w2b` zero unless `init_weights=False`).
            PEFT ignores it for a 1×1 kernel, and so does this.
        - `conv_path`: as for [`lora_jax.LoraConvArray`][].

        !!! Example

            ```python
            import jax.lax as lax
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            w = jr.normal(jr.key(0), (4, 3, 3, 3))
            lw = lora.LohaConvArray(w, rank=2, key=jr.key(1))
            x = jnp.ones((1, 3, 8, 8))
            conv = lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME")
            assert jnp.allclose(quax.quaxify(conv)(lw), conv(w))
            ```
        """
        shape = check_conv_weight(weight)
        check_choice(conv_path, "conv_path", CONV_PATHS)
        tucker = use_effective_conv2d is True and math.prod(shape[2:]) > 1
        # The factors, their checks and initialisation are LoHa's on the kernel seen
        # as the matrix (out, in·k_1···k_n), as PEFT builds them for a conv; in the
        # Tucker form, on the matrix (out, in/groups), the cores drawn here.
        lw = LohaArray(
            weight[(slice(None), slice(None), *(0,) * (len(shape) - 2))]
            if tucker
            else weight.reshape(shape[0], math.prod(shape[1:])),
            rank=rank,
            key=key,
            alpha=alpha,
            init_weights=init_weights,
            rank_dropout=rank_dropout,
            module_dropout=module_dropout,
            use_effective_conv2d=use_effective_conv2d,
            dtype=dtype,
            allow_materialise=allow_materialise,
            stop_gradient=stop_gradient,
        )
        self._w = weight
        self.w1a, self.w1b, self.w2a, self.w2b = lw.w1a, lw.w1b, lw.w2a, lw.w2b
        self.t1 = self.t2 = None
        if tucker:
            # PyTorch's kaiming_uniform_(a=sqrt(5)) in PEFT's shapes: `hada_w1_a` is
            # (r, out), our `w1a` transposed; the cores are (r, r, *kernel).
            k1, k2, k3, k4 = jr.split(jr.fold_in(key, 1), 4)
            out, rank = lw.w1a.shape
            dtype = lw.w1a.dtype
            self.w1a = _kaiming(k1, (rank, out), dtype).T
            self.w2a = _kaiming(k2, (rank, out), dtype).T
            core = (rank, rank, *shape[2:])
            self.t1, self.t2 = _kaiming(k3, core, dtype), _kaiming(k4, core, dtype)
        self.scaling = lw.scaling
        self.dropout_key = None
        self.rank_dropout = lw.rank_dropout
        self.module_dropout = lw.module_dropout
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise
        self.conv_path = conv_path

    @property
    def rank(self) -> int:
        return self.w1a.shape[-1]

    def conv_factors(self, key: PRNGKeyArray | None = None) -> tuple[Array, Array]:
        """The equivalent rank-`r²` conv LoRA factors `(a', b')` as conv kernels,
        `(out, r², 1, ..., 1)` and `(r², in/groups, *kernel)`; with a `key`, PEFT's
        rank dropout (over output channels) and module dropout applied to `a'`."""
        w1b, w2b = self.w1b, self.w2b
        if self.t1 is not None:  # each core contracted with its `b`: (r, in/groups·window)
            core_b = lambda t, b: jnp.einsum("ab...,bi->ai...", t, b).reshape(b.shape[0], -1)
            w1b, w2b = core_b(self.t1, w1b), core_b(self.t2, w2b)
        a, b = _face_split(self.w1a, w1b, self.w2a, w2b)
        if key is not None:
            k_rank, k_module = jr.split(key)
            if self.rank_dropout > 0:
                channels = unit_mask(k_rank, self.rank_dropout, a.shape[:1], a.dtype, rescale=True)
                a = a * channels[:, None]
            if self.module_dropout > 0:
                a = a * module_keep(k_module, self.module_dropout, (), a.dtype)
        window = self._w.shape[1:]  # (in/groups, *kernel)
        return a.reshape(*a.shape, *(1,) * (len(window) - 1)), b.reshape(b.shape[0], *window)

    @per_kernel
    def delta(self, key: PRNGKeyArray | None = None) -> Array:
        """The dense update; with a `key`, under rank and module dropout."""
        a, b = self.conv_factors(key)
        return conv_delta(a, b, "peft", lax.stop_gradient(self.scaling))


def _loha_conv(lhs, v: LohaConvArray, params):
    a, b = v.conv_factors(v.dropout_key)
    return lora_conv(lhs, v.w, a, b, lax.stop_gradient(v.scaling), "peft", params)


register_conv_rules(LohaConvArray, _loha_conv)
