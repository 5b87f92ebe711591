"""DoRA for convolution kernels: `m ⊙ (w + s·Δ) / ‖w + s·Δ‖`, the norm taken per output
channel over the input channels and the kernel's window, `Δ` PEFT's conv LoRA update
(a conv with the kernel's size to `rank` channels, then a 1×1 conv).

A conv with the adapted kernel is `(m / n) ⊙ (conv(x, w) + s·conv(conv(x, b), a))`, the
magnitudes scaling the output channels; neither `w + s·Δ` nor the adapted kernel is
formed. Seen as a matrix `(out, in·k_1···k_n)`, `Δ` is `a @ b` (`a` holds one weight per
output channel and rank, `b` a window per rank and input channel), so the norms come
from DoRA's low-rank identity on the flattened kernel, as for a Linear.
"""

import equinox as eqx
import jax.lax as lax
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from ._base import AbstractAdapter
from ._conv import ConvPath, LoraConvArray, conv_delta, lora_conv, per_kernel, register_conv_rules
from ._dora import _norm
from ._lora import Init


class DoraConvArray(AbstractAdapter):
    """Weight-decomposed low-rank adaptation (DoRA) of a conv kernel `w` of shape
    `(out, in/groups, k_1, ..., k_n)`: `w' = m ⊙ (w + s·Δ) / ‖w + s·Δ‖`, the norm per
    output channel, as PEFT's DoRA for `Conv1d/2d/3d`.

    `Δ` is [`lora_jax.LoraConvArray`][]'s `"peft"` form: `b` of shape
    `(rank, in/groups, *kernel)` (PEFT's `lora_A`, a conv with the kernel's size) then
    `a` of shape `(out, rank, 1, ..., 1)` (PEFT's `lora_B`, a 1×1 conv). The magnitudes
    `m` (shape `(out,)`, PEFT's `lora_magnitude_vector`) start at the norms of `w`, so
    the adapter is a no-op at initialisation; the norm is detached from the graph.

    A conv with this value as its kernel computes
    `(m / n) ⊙ (conv(x, w) + s·conv(conv(x, b), a))` with the strides, padding,
    dilations and feature groups of the call, the norms `n` from thin products of the
    flattened kernel only (`‖w_o‖² + 2s⟨w_o, Δ_o⟩ + s²‖Δ_o‖²`).
    """

    _w: Shaped[Array, "out in *kernel"]
    a: Float[Array, "out rank *ones"]
    b: Float[Array, "rank in *kernel"]
    m: Float[Array, " out"]
    scaling: Float[Array, ""]
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    conv_path: str = eqx.field(static=True, default="factored")

    trainable_fields = ("a", "b", "m")

    def __init__(
        self,
        weight: Shaped[Array, "out in *kernel"],
        *,
        rank: int,
        key: PRNGKeyArray,
        alpha: float | None = None,
        rslora: bool = False,
        init: Init = "quax",
        scale: float = 0.01,
        dtype=None,
        allow_materialise: bool = False,
        stop_gradient: bool = True,
        conv_path: ConvPath = "factored",
    ):
        """**Arguments:**

        - `weight`: the conv kernel to wrap, `(out, in/groups, k_1, ..., k_n)` with
            `n >= 1` spatial dimensions (Equinox's layout).
        - `rank`, `key`, `alpha`, `rslora`, `init`, `scale`, `dtype`,
            `allow_materialise`, `stop_gradient`, `conv_path`: as for
            [`lora_jax.LoraConvArray`][]
            (whose `"peft"` form the factors take). The magnitudes take the factors'
            dtype.

        !!! Example

            ```python
            import jax.lax as lax
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            w = jr.normal(jr.key(0), (4, 3, 3, 3))
            dw = lora.DoraConvArray(w, rank=2, key=jr.key(1))
            x = jnp.ones((1, 3, 8, 8))
            conv = lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME")
            assert jnp.allclose(quax.quaxify(conv)(dw), conv(w), atol=1e-5)
            ```
        """
        # The factors, their checks and initialisation are conv LoRA's `"peft"` form.
        lw = LoraConvArray(
            weight,
            rank=rank,
            key=key,
            alpha=alpha,
            rslora=rslora,
            init=init,
            scale=scale,
            dtype=dtype,
            allow_materialise=allow_materialise,
            stop_gradient=stop_gradient,
            conv_form="peft",
            conv_path=conv_path,
        )
        self._w = lw._w
        self.a = lw.a
        self.b = lw.b
        self.scaling = lw.scaling
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise
        self.conv_path = conv_path
        self.m = _kernel_norm(weight, self.a, self.b, self.scaling)

    @property
    def rank(self) -> int:
        return self.b.shape[self.scaling.ndim]

    @per_kernel
    def norm(self) -> Array:
        """`‖w + s·Δ‖` per output channel, shape `(out,)` (not detached)."""
        return _kernel_norm(self.w, self.a, self.b, lax.stop_gradient(self.scaling))

    @per_kernel
    def delta(self) -> Array:
        # The norm is detached from the graph, as in the conv rule (PEFT's DoRA), so
        # that `conv_path="merged"` trains as the factored path does.
        scaling = lax.stop_gradient(self.scaling)
        g = self.m / lax.stop_gradient(_kernel_norm(self.w, self.a, self.b, scaling))
        w = self.w.astype(self.a.dtype)
        merged = _per_channel(g, w.ndim) * (w + conv_delta(self.a, self.b, "peft", scaling))
        return merged - w


def _kernel_norm(w, a, b, scaling):
    """DoRA's norms of the kernel seen as the matrix `(out, in·k_1···k_n)`."""
    out, rank = a.shape[:2]
    return _norm(w.reshape(out, -1), a.reshape(out, rank), b.reshape(rank, -1), scaling, -2)


def _per_channel(g, ndim: int, axis: int = 0):
    shape = [1] * ndim
    shape[axis] = -1
    return g.reshape(shape)


def _dora_conv(lhs, v: DoraConvArray, params):
    scaling = lax.stop_gradient(v.scaling)
    out = lora_conv(lhs, v.w, v.a, v.b, scaling, "peft", params)
    g = v.m / lax.stop_gradient(_kernel_norm(v.w, v.a, v.b, scaling))
    channels = params["dimension_numbers"].out_spec[1]
    return out * _per_channel(g.astype(out.dtype), out.ndim, channels)


register_conv_rules(DoraConvArray, _dora_conv)
