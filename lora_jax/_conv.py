"""LoRA for convolution kernels: `w + s·Δ` with `Δ` a composition of two thin convs.

A kernel `w` of shape `(out, in/groups, k_1, ..., k_n)` (Equinox's `OI...` layout) is
adapted by two factors, each itself a conv kernel:

- `b` of shape `(rank, in/groups, *kb)`, applied first (channels `in -> rank`);
- `a` of shape `(out, rank, *ka)`, applied second (channels `rank -> out`);

where every spatial axis `j` belongs to exactly one factor: `kb_j = k_j, ka_j = 1` or
`kb_j = 1, ka_j = k_j`. The dense update, used only for merging, is

    Δ[o, i, p_1..p_n] = Σ_r a[o, r, p_j for j on a's side] · b[r, i, p_j for j on b's side]

and a conv with `w + s·Δ` is computed as `conv(x, w) + s·conv(conv(x, b), a)`, each
factor conv doing the strides, padding and dilations of its own axes. Two forms:

- `"peft"`: every spatial axis on `b`'s side. `b` is PEFT's `lora_A` (a conv with the
    base kernel's size), `a` is PEFT's `lora_B` (a 1×1 conv).
- `"balanced"`: ALF's reshape. The kernel is seen as the matrix
    `(out·k_1···k_m, in·k_{m+1}···k_n)` with `m = n // 2`, factored `a @ b`: the first
    `⌊n/2⌋` spatial axes go with `out` (on `a`), the rest with `in` (on `b`). For
    Conv2d that is `(out·k_0, in·k_1)`: a `1×k_1` conv then a `k_0×1` conv. For
    Conv3d `(out·k_0, in·k_1·k_2)`. For Conv1d `m = 0`, `(out, in·k_0)`, the same
    factorisation as `"peft"`.
"""

import functools
import math
from typing import Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import quax
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Shaped

from ._base import AbstractAdapter, _merge as w_plus, as_scaling
from ._lora import Init, init_factors, lora_scaling
from ._validate import (
    check_choice,
    check_dtype,
    check_flags,
    check_key,
    check_not_empty,
    check_rank,
    check_scalar,
)


ConvForm = Literal["peft", "balanced"]
ConvPath = Literal["factored", "merged"]
CONV_PATHS = ("factored", "merged")


def check_conv_weight(weight) -> tuple[int, ...]:
    """`weight`'s shape, once it is known to be an array with the rank of a conv kernel
    `(out, in, *kernel)`."""
    shape = getattr(weight, "shape", None)
    if shape is None or getattr(weight, "dtype", None) is None:
        raise TypeError(f"`weight` must be an array, got {type(weight).__name__}.")
    if len(shape) < 3:
        raise ValueError(
            "`weight` must be a conv kernel (out, in, *kernel) with at least one "
            f"spatial dimension, got shape {tuple(shape)}."
        )
    return tuple(shape)


def per_kernel(method):
    """A conv adapter's method (`delta`, `norm`) for a stack of kernels too: where the
    adapter is stacked (the scaling's shape, the stacking dimensions, in front of
    every leaf, as `loraify` builds it for a stacked conv), one kernel at a time. A
    key argument is split per kernel."""

    @functools.wraps(method)
    def wrapper(self, *args):
        if self.scaling.ndim == 0:
            return method(self, *args)
        n = self.scaling.shape[0]
        args = tuple(jr.split(a, n) if a is not None else None for a in args)
        axes = tuple(0 if a is not None else None for a in args)
        return jax.vmap(wrapper, in_axes=(0, *axes))(self, *args)

    return wrapper


def conv_split(form: str, num_spatial: int) -> int:
    """How many leading spatial axes belong to `a` (the `out` side)."""
    return 0 if form == "peft" else num_spatial // 2


class LoraConvArray(AbstractAdapter):
    """Replaces a conv kernel `w` of shape `(out, in/groups, *kernel)` with `w + s·Δ`,
    `Δ` the composition of two thin conv kernels `a` (`rank -> out`) and `b`
    (`in -> rank`). See the module docstring for the two forms.

    The sum is never formed: a `lax.conv_general_dilated` with this value as its kernel
    computes `conv(x, w) + s·conv(conv(x, b), a)`, honouring strides, padding, input
    and kernel dilation and feature groups.
    """

    _w: Shaped[Array, "out in *kernel"]
    a: Float[Array, "out rank *ka"]
    b: Float[Array, "rank in *kb"]
    scaling: Float[Array, ""]
    form: str = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    conv_path: str = eqx.field(static=True, default="factored")

    trainable_fields = ("a", "b")

    def __init__(
        self,
        weight: Shaped[Array, "out in *kernel"],
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
        conv_form: ConvForm = "peft",
        conv_path: ConvPath = "factored",
    ):
        """**Arguments:**

        - `weight`: the conv kernel to wrap, `(out, in/groups, k_1, ..., k_n)` with
            `n >= 1` spatial dimensions (Equinox's layout).
        - `rank`: the rank of the adaptation (the channels between the two factor
            convs).
        - `scale`, `allow_materialise`, `stop_gradient`, `key`, `alpha`, `rslora`,
            `dtype`: as for [`lora_jax.LoraArray`][].
        - `init`: `"quax"` (`a ~ Normal(0, scale²)`, `b = 0`), `"peft"` (`a = 0`, `b`
            Kaiming-uniform with `b`'s fan-in, as PEFT's `lora_A`) or `"gaussian"`
            (`a = 0`, `b ~ Normal(0, 1/rank²)`). Each is a no-op at initialisation.
        - `conv_form`: `"peft"` (a conv with the kernel's size to `rank` channels, then
            a 1×1 conv) or `"balanced"` (ALF's reshape, two separable convs).
        - `conv_path`: `"factored"` (the default: the two thin convs beside the kernel's,
            `w + Δ` never formed) or `"merged"` (each step forms the kernel `w + s·Δ`,
            kernel-sized and never stored, and runs one conv; gradients reach the
            factors through it). On a GPU, where cuDNN runs thin convs slowly,
            `"merged"` can be much faster; see the how-to on convolutions.

        !!! Example

            ```python
            import jax.lax as lax
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            w = jr.normal(jr.key(0), (4, 3, 3, 3))
            lw = lora.LoraConvArray(w, rank=2, key=jr.key(1), conv_form="balanced")
            x = jnp.ones((1, 3, 8, 8))
            conv = lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME")
            assert jnp.allclose(quax.quaxify(conv)(lw), conv(w))
            ```
        """
        shape = check_conv_weight(weight)
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
        check_choice(conv_form, "conv_form", ("peft", "balanced"))
        check_choice(conv_path, "conv_path", CONV_PATHS)
        dtype = check_dtype(dtype, weight.dtype)
        out, inp, *kernel = shape
        m = conv_split(conv_form, len(kernel))
        a_shape = (out, rank, *kernel[:m], *(1,) * (len(kernel) - m))
        b_shape = (rank, inp, *(1,) * m, *kernel[m:])
        a, b = init_factors(
            key,
            a_shape,
            b_shape,
            init=init,
            rank=rank,
            scale=scale,
            fan_in=math.prod(b_shape[1:]),
            dtype=dtype,
        )
        self._w = weight
        self.a = a
        self.b = b
        self.scaling = as_scaling(lora_scaling(rank, alpha, rslora))
        self.form = conv_form
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise
        self.conv_path = conv_path

    @property
    def rank(self) -> int:
        return self.b.shape[self.scaling.ndim]

    @per_kernel
    def delta(self) -> Array:
        return conv_delta(self.a, self.b, self.form, lax.stop_gradient(self.scaling))


def conv_delta(a, b, form, scaling):
    """`Δ[o, i, *p] = Σ_r a[o, r, *p_a] b[r, i, *p_b]`, written as one einsum."""
    n = a.ndim - 2
    m = conv_split(form, n)
    sp = "defghjklmn"[:n]
    a2 = a.reshape(a.shape[: 2 + m])
    b2 = b.reshape(b.shape[:2] + b.shape[2 + m :])
    spec = f"or{sp[:m]},ri{sp[m:]}->oi{sp}"
    d = jnp.einsum(spec, a2, b2)
    return d * scaling.astype(d.dtype)


# ---------------------------------------------------------------------------------------
# The conv rule
# ---------------------------------------------------------------------------------------


def _identity_spec(spec) -> bool:
    return tuple(int(i) for i in spec) == tuple(range(len(spec)))


def _factor_params(params, axes: set[int], lhs_spec, rhs_spec, out_spec, groups):
    """The conv parameters for a factor that carries only the spatial `axes`: the
    others get stride 1, no padding, no dilation."""
    keep = lambda j, v, unit: v if j in axes else unit
    p = dict(params)
    p["window_strides"] = tuple(keep(j, s, 1) for j, s in enumerate(params["window_strides"]))
    p["padding"] = tuple(keep(j, tuple(q), (0, 0)) for j, q in enumerate(params["padding"]))
    p["lhs_dilation"] = tuple(keep(j, d, 1) for j, d in enumerate(params["lhs_dilation"]))
    p["rhs_dilation"] = tuple(keep(j, d, 1) for j, d in enumerate(params["rhs_dilation"]))
    p["dimension_numbers"] = lax.ConvDimensionNumbers(lhs_spec, rhs_spec, out_spec)
    p["feature_group_count"] = groups
    p["preferred_element_type"] = None
    return p


@quax.quaxify
def lora_conv(lhs, w, a, b, scaling, form, params, blocks=1):
    """`conv(x, w) + s·conv(conv(x, b), a)`. With `blocks > 1`, `b` is block-diagonal:
    each of the `blocks` equal slices of a group's input channels goes through `b` on
    its own (`b`'s input channels are one slice's), giving `blocks·rank` channels per
    group for `a`."""
    out = lax.conv_general_dilated_p.bind(lhs, w, **params)
    dn = params["dimension_numbers"]
    groups = params["feature_group_count"]
    n = a.ndim - 2
    m = conv_split(form, n)
    x = lhs.astype(b.dtype) if lhs.dtype != b.dtype else lhs
    slices = groups * blocks  # `b` sees each slice of the input channels on its own
    ident = tuple(range(n + 2))
    b_axes = set(range(m, n))

    def grouped(x, b):
        # One copy of `b` per slice, in a grouped conv.
        b = jnp.tile(b, (slices,) + (1,) * (b.ndim - 1))
        p = _factor_params(params, b_axes, dn.lhs_spec, ident, dn.out_spec, slices)
        return lax.conv_general_dilated_p.bind(x, b, **p)

    def folded(x, b):
        # Batch-major, channels next (Equinox's layout): the slices go into the batch
        # (reshapes, no copies) and `b` runs as one ungrouped conv.
        x = x.reshape(x.shape[0] * slices, x.shape[1] // slices, *x.shape[2:])
        p = _factor_params(params, b_axes, dn.lhs_spec, ident, dn.out_spec, 1)
        z = lax.conv_general_dilated_p.bind(x, b, **p)
        return z.reshape(lhs.shape[0], slices * z.shape[1], *z.shape[2:])

    def block_diagonal(x, b):
        # Each group's `blocks` slices through one kernel, block-diagonal in `b`: an
        # ordinary conv with the call's groups, its kernel `blocks·c` by `in/groups`.
        c, q = b.shape[:2]
        eye = jnp.eye(blocks, dtype=b.dtype)
        k = jnp.einsum("jl,cq...->jclq...", eye, b).reshape(blocks * c, blocks * q, *b.shape[2:])
        k = jnp.tile(k, (groups,) + (1,) * (k.ndim - 1))
        p = _factor_params(params, b_axes, dn.lhs_spec, ident, dn.out_spec, groups)
        return lax.conv_general_dilated_p.bind(x, k, **p)

    # cuDNN runs a conv grouped into slices of a few channels slowly. On an H100 the
    # block-diagonal kernel made LoKr conv steps 1.5 to 1.8 times faster where it was
    # a quarter of the weight's size or less (1.1 times where it was the weight's
    # size); it is used where it is at most half the weight's size.
    small = blocks > 1 and 2 * slices * b.shape[0] <= a.shape[0]
    gpu = block_diagonal if small else grouped
    if slices == 1:
        z = lax.conv_general_dilated_p.bind(
            x, b, **_factor_params(params, b_axes, dn.lhs_spec, ident, dn.out_spec, 1)
        )
    elif _identity_spec(dn.lhs_spec) and _identity_spec(dn.out_spec):
        # XLA's CPU runs the grouped conv some 30 times slower than the folded one.
        z = lax.platform_dependent(x, b, cpu=folded, default=gpu)
    else:
        z = gpu(x, b)
    p_a = _factor_params(params, set(range(m)), dn.out_spec, ident, dn.out_spec, groups)
    delta = lax.conv_general_dilated_p.bind(z, a * scaling.astype(a.dtype), **p_a)
    return out + delta.astype(out.dtype)


def check_conv_params(params) -> bool:
    """Whether a conv with an adapted kernel takes the factored rule: the kernel read
    in the adapter's layout `(out, in, *kernel)`. Refuses a `batch_group_count`."""
    if params["batch_group_count"] != 1:
        raise ValueError(
            "A LoRA conv kernel supports `batch_group_count=1` only, got "
            f"{params['batch_group_count']}."
        )
    return _identity_spec(params["dimension_numbers"].rhs_spec)


def step_kernel(v) -> Array:
    """`w + s·Δ` for a conv adapter with `conv_path="merged"`: `w` as the model sees
    it (gradient stopped), `Δ` with the adapter's dropout where it holds a key."""
    key = getattr(v, "dropout_key", None)
    delta = v.delta() if key is None else v.delta(key)
    return w_plus(v.w, delta)


def register_conv_rules(cls: type, product) -> None:
    """The `conv_general_dilated` rules of a conv adapter type `cls`: with the adapter
    as the kernel, one conv with `w + s·Δ` formed for the step when its `conv_path`
    is `"merged"`; else `product(lhs, adapter, params)` where the kernel is read in
    its layout `(out, in, *kernel)`, the materialised kernel otherwise (which refuses
    unless `allow_materialise`); with the adapter as the image, the materialised one
    (no factored rule)."""

    @quax.register(lax.conv_general_dilated_p)
    def _(lhs: ArrayLike | quax.ArrayValue, rhs: cls, **params):
        if rhs.conv_path == "merged":
            return dense_conv(lhs, step_kernel(rhs), params)
        if not check_conv_params(params):
            return dense_conv(lhs, rhs.materialise(), params)
        return product(lhs, rhs, params)

    @quax.register(lax.conv_general_dilated_p)
    def _(lhs: cls, rhs: ArrayLike | quax.ArrayValue, **params):
        return dense_conv(lhs.materialise(), rhs, params)


register_conv_rules(
    LoraConvArray,
    lambda x, v, params: lora_conv(x, v.w, v.a, v.b, lax.stop_gradient(v.scaling), v.form, params),
)


@quax.quaxify
def dense_conv(lhs, rhs, params):
    return lax.conv_general_dilated_p.bind(lhs, rhs, **params)
