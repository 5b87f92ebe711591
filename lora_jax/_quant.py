"""Quantised base weights (QLoRA by composition): `Int8Array` and `NF4Array` hold a
frozen weight in 8 or 4 bits and dequantise it on the fly inside every product. A
`LoraArray` whose `w` is one of them is QLoRA; nothing in the adapter knows."""

import abc
import dataclasses
import numbers
from typing import Any, Literal

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import quax
from jaxtyping import Array, ArrayLike, Float, Int8, PyTree, Shaped, UInt8

from ._base import AbstractAdapter, is_adapter
from ._targets import Where, path_name
from ._validate import check_choice, check_weight


# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al. 2023, Appendix E): quantiles
# of N(0, 1), 8 on the positive side and 7 on the negative side (so that 0 is a level
# exactly), at evenly spaced probabilities from 1 - δ down to 1/2 with
# δ = (1/32 + 1/30) / 2, then normalised to [-1, 1]. `tests/test_quant.py` derives them
# again from that definition.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_LEVELS = np.asarray(NF4_LEVELS, np.float32)
_MIDPOINTS = (_LEVELS[:-1] + _LEVELS[1:]) / 2  # code = how many midpoints lie below

_ABSMAX_BLOCK = 256  # double quantisation: one 8-bit block per 256 absmax constants


class AbstractQuantArray(quax.ArrayValue):
    """A frozen weight of shape `(*batch, out, in)` held in a few bits. It behaves as
    its dequantised value: `materialise()` is `dequantise()`, and `dot_general`
    dequantises inside the rule, so no full-precision copy is ever a leaf.

    Every array leaf has the stacking dimensions `*batch` first (so `lax.scan` over
    stacked layers slices them). Integer codes never train; the float constants are
    frozen by the adapter that wraps the weight (or by [`lora_jax.partition`][]).
    """

    base_dtype: eqx.AbstractVar[Any]

    @abc.abstractmethod
    def dequantise(self) -> Array:
        """The weight as a plain array in its original dtype."""

    @abc.abstractmethod
    def _batch_shape(self) -> tuple[int, ...]:
        pass

    @abc.abstractmethod
    def _matrix_shape(self) -> tuple[int, int]:
        pass

    def aval(self):
        if not jtu.tree_leaves(self):
            raise ValueError(
                f"This `{type(self).__name__}` has no codes: it is part of the "
                "trainable half of `lora_jax.partition`. Recombine it with "
                "`eqx.combine(params, frozen)` before calling the model through "
                "`quax.quaxify`."
            )
        shape = (*self._batch_shape(), *self._matrix_shape())
        return jax.core.ShapedArray(shape, self.base_dtype)

    def materialise(self):
        return self.dequantise()

    @property
    def nbytes(self) -> int:
        """Bytes held by the quantised representation (codes and constants)."""
        leaves = [x for x in jtu.tree_leaves(self) if eqx.is_array(x)]
        return sum(x.size * x.dtype.itemsize for x in leaves)


def is_quantised(x) -> bool:
    """Whether `x` is a quantised weight ([`lora_jax.Int8Array`][] or
    [`lora_jax.NF4Array`][])."""
    return isinstance(x, AbstractQuantArray)


def _float_weight(weight, name: str = "weight"):
    if isinstance(weight, quax.ArrayValue):
        raise TypeError(f"`{name}` must be a plain array to quantise, got {type(weight).__name__}.")
    check_weight(weight, name)
    return jnp.asarray(weight)


# ---------------------------------------------------------------------------------------
# int8, symmetric, one scale per output channel
# ---------------------------------------------------------------------------------------


class Int8Array(AbstractQuantArray):
    """A weight `(*batch, out, in)` quantised to int8 symmetrically, one scale per
    output channel (row): `w ≈ values · scale[..., None]` with
    `scale = max|row| / 127`. Half the bytes of bfloat16.

    Build one with [`lora_jax.Int8Array.from_array`][] (or [`lora_jax.quantise`][]).

    !!! Example

        ```python
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        w = jr.normal(jr.key(0), (16, 32))
        q = lora.Int8Array.from_array(w)
        # A LoraArray over it is QLoRA: the weight is dequantised inside each product.
        lw = lora.LoraArray(q, rank=2, key=jr.key(1))
        x = jnp.ones(32)
        y = quax.quaxify(jnp.matmul)(lw, x)
        assert jnp.allclose(y, q.dequantise() @ x, atol=1e-4)
        ```
    """

    values: Int8[Array, "*batch out in"]
    scale: Float[Array, "*batch out"]
    base_dtype: Any = eqx.field(static=True)

    @classmethod
    def from_array(cls, weight: Shaped[Array, "*batch out in"]) -> "Int8Array":
        """Quantises `weight`.

        **Arguments:**

        - `weight`: a floating array of shape `(*batch, out, in)`.

        **Returns:**

        The `Int8Array`, whose `dtype` is `weight`'s.

        !!! Example

            ```python
            import jax.numpy as jnp
            import jax.random as jr
            import lora_jax as lora

            w = jr.normal(jr.key(0), (3, 4))
            q = lora.Int8Array.from_array(w)
            assert jnp.all(jnp.abs(q.dequantise() - w) <= q.scale[:, None] / 2 + 1e-6)
            ```
        """
        weight = _float_weight(weight)
        values, scale = _int8_quantise(weight)
        return cls(values, scale, jnp.dtype(weight.dtype))

    def _batch_shape(self):
        return self.values.shape[:-2]

    def _matrix_shape(self):
        return self.values.shape[-2:]

    def dequantise(self) -> Array:
        """The weight as a plain array in its original dtype: `values · scale`."""
        return _int8_dequantise(self.values, self.scale, self.base_dtype)


def _int8_quantise(w):
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-1) / 127
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    values = jnp.clip(jnp.round(w / safe[..., None]), -127, 127).astype(jnp.int8)
    return values, scale


def _int8_dequantise(values, scale, dtype):
    return (values.astype(jnp.float32) * scale[..., None]).astype(dtype)


# ---------------------------------------------------------------------------------------
# NF4, blockwise absmax, optional double quantisation
# ---------------------------------------------------------------------------------------


class NF4Array(AbstractQuantArray):
    """A weight `(*batch, out, in)` in 4-bit NormalFloat (QLoRA): each matrix is
    flattened and cut in blocks of `block_size`; each value is stored as the index of
    the nearest of the 16 [NF4 levels](https://arxiv.org/abs/2305.14314) after
    dividing by its block's absolute maximum, two codes per byte (the first in the
    high nibble).

    With double quantisation the absmax constants are stored in 8 bits as well: their
    mean is subtracted, and each block of 256 is scaled symmetrically into int8 with
    one float32 scale (QLoRA uses an 8-bit float there; a linear int8 code is what
    this stores). About 4.13 bits per weight instead of 4.5.

    Build one with [`lora_jax.NF4Array.from_array`][] (or [`lora_jax.quantise`][]).

    !!! Example

        ```python
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        w = jr.normal(jr.key(0), (16, 32), jnp.bfloat16)
        q = lora.NF4Array.from_array(w, block_size=64, double_quant=True)
        print(q.nbytes, "bytes instead of", w.nbytes)
        lw = lora.LoraArray(q, rank=2, key=jr.key(1), dtype=jnp.float32)
        y = quax.quaxify(jnp.matmul)(lw, jnp.ones(32, jnp.bfloat16))
        ```
    """

    codes: UInt8[Array, "*batch half"]
    absmax: Shaped[Array, "*batch blocks"]  # float32, or int8 with double quantisation
    absmax_scale: Float[Array, "*batch blocks2"] | None
    absmax_offset: Float[Array, "*batch"] | None
    base_dtype: Any = eqx.field(static=True)
    matrix_shape: tuple[int, int] = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    @classmethod
    def from_array(
        cls,
        weight: Shaped[Array, "*batch out in"],
        *,
        block_size: int = 64,
        double_quant: bool = False,
    ) -> "NF4Array":
        """Quantises `weight`.

        **Arguments:**

        - `weight`: a floating array of shape `(*batch, out, in)`.
        - `block_size`: how many consecutive values (of each flattened matrix) share
            one absmax constant. Must be even and divide `out * in`.
        - `double_quant`: also quantise the absmax constants to 8 bits (blocks of 256).

        **Returns:**

        The `NF4Array`, whose `dtype` is `weight`'s.

        !!! Example

            ```python
            import jax.numpy as jnp
            import jax.random as jr
            import lora_jax as lora

            w = jr.normal(jr.key(0), (8, 16))
            q = lora.NF4Array.from_array(w, block_size=64)
            assert q.shape == w.shape and q.codes.dtype == jnp.uint8
            assert float(jnp.max(jnp.abs(q.dequantise() - w))) < 0.5
            ```
        """
        weight = _float_weight(weight)
        *_, out, inp = weight.shape
        check_block_size(block_size, out * inp)
        if not isinstance(double_quant, bool):
            raise TypeError(f"`double_quant` must be a bool, got {double_quant!r}.")
        codes, absmax = _nf4_quantise(weight, block_size)
        scale = offset = None
        if double_quant:
            absmax, scale, offset = _absmax_quantise(absmax)
        dtype = jnp.dtype(weight.dtype)
        return cls(codes, absmax, scale, offset, dtype, (out, inp), block_size)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax constants are themselves quantised to 8 bits."""
        return self.absmax_scale is not None

    def _batch_shape(self):
        return self.codes.shape[:-1]

    def _matrix_shape(self):
        return self.matrix_shape

    def block_absmax(self) -> Float[Array, "*batch blocks"]:
        """The absmax constant of every block, as float32 (dequantised if double
        quantised)."""
        if not self.double_quant:
            return self.absmax
        out, inp = self.matrix_shape
        n_blocks = out * inp // self.block_size
        return _absmax_dequantise(self.absmax, self.absmax_scale, self.absmax_offset, n_blocks)

    def dequantise(self) -> Array:
        """The weight as a plain array in its original dtype: each code's NF4 level
        times its block's absmax."""
        return _nf4_dequantise(
            self.codes,
            self.block_absmax(),
            self.matrix_shape,
            self.block_size,
            self.base_dtype,
        )


def check_block_size(block_size, size: int, what: str = "the weight") -> int:
    name = "block_size"
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"`{name}` must be a positive even integer, got {block_size!r}.")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"`{name}` must be a positive even integer, got {block_size}.")
    if size % block_size:
        raise ValueError(
            f"`{name}`={block_size} does not divide the size of {what}, out*in={size}; "
            "choose a block size that divides it."
        )
    return int(block_size)


def _nf4_quantise(w, block_size: int):
    *batch, out, inp = w.shape
    x = w.astype(jnp.float32).reshape(*batch, -1, block_size)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    safe = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
    normed = x / safe[..., None]
    codes = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed, side="left")
    codes = codes.astype(jnp.uint8)
    pairs = codes.reshape(*batch, -1, 2)
    packed = (pairs[..., 0] << 4) | pairs[..., 1]
    return packed, absmax


def _nf4_dequantise(packed, absmax, matrix_shape, block_size: int, dtype):
    batch = packed.shape[:-1]
    codes = jnp.stack([packed >> 4, packed & 15], axis=-1)
    values = jnp.asarray(_LEVELS)[codes.reshape(*batch, -1, block_size)]
    w = values * absmax[..., None]
    return w.reshape(*batch, *matrix_shape).astype(dtype)


def _absmax_quantise(absmax):
    *batch, n = absmax.shape
    offset = jnp.mean(absmax, axis=-1)
    centred = absmax - offset[..., None]
    pad = -n % _ABSMAX_BLOCK
    centred = jnp.pad(centred, [(0, 0)] * len(batch) + [(0, pad)])
    blocks = centred.reshape(*batch, -1, _ABSMAX_BLOCK)
    scale = jnp.max(jnp.abs(blocks), axis=-1) / 127
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    q = jnp.clip(jnp.round(blocks / safe[..., None]), -127, 127).astype(jnp.int8)
    return q.reshape(*batch, -1), scale, offset


def _absmax_dequantise(q, scale, offset, n: int):
    batch = q.shape[:-1]
    blocks = q.reshape(*batch, -1, _ABSMAX_BLOCK).astype(jnp.float32) * scale[..., None]
    return blocks.reshape(*batch, -1)[..., :n] + offset[..., None]


# ---------------------------------------------------------------------------------------
# Rules: dequantise inside the rule, then dispatch again (the other operand may be a
# quax value too).
# ---------------------------------------------------------------------------------------


@quax.quaxify
def _dot_general(lhs, rhs, dimension_numbers, params):
    return lax.dot_general(lhs, rhs, dimension_numbers, **params)


@quax.register(lax.dot_general_p)
def _(
    lhs: AbstractQuantArray,
    rhs: ArrayLike | quax.ArrayValue,
    *,
    dimension_numbers,
    **params,
):
    return _dot_general(lhs.dequantise(), rhs, dimension_numbers, params)


@quax.register(lax.dot_general_p)
def _(
    lhs: ArrayLike | quax.ArrayValue,
    rhs: AbstractQuantArray,
    *,
    dimension_numbers,
    **params,
):
    return _dot_general(lhs, rhs.dequantise(), dimension_numbers, params)


@quax.register(lax.dot_general_p)
def _(lhs: AbstractQuantArray, rhs: AbstractQuantArray, *, dimension_numbers, **params):
    return _dot_general(lhs.dequantise(), rhs.dequantise(), dimension_numbers, params)


# Against an adapter, the adapter's rule decides (it meets the quantised value again
# as an ordinary operand); these settle which of the two rules applies.
@quax.register(lax.dot_general_p)
def _(lhs: AbstractQuantArray, rhs: AbstractAdapter, *, dimension_numbers, **params):
    return _dot_general(lhs.dequantise(), rhs, dimension_numbers, params)


@quax.register(lax.dot_general_p)
def _(lhs: AbstractAdapter, rhs: AbstractQuantArray, *, dimension_numbers, **params):
    return _dot_general(lhs, rhs.dequantise(), dimension_numbers, params)


@quax.register(lax.convert_element_type_p)
def _(operand: AbstractQuantArray, *, new_dtype, **params):
    new_dtype = jnp.dtype(new_dtype)
    if new_dtype == operand.base_dtype:
        return operand
    if jnp.issubdtype(new_dtype, jnp.floating) and jnp.finfo(operand.base_dtype).bits >= 32:
        # Dequantising computes in float32, so with a float32 (or wider) base nothing
        # was rounded yet: the codes stay, and only the dtype they dequantise to changes.
        return dataclasses.replace(operand, base_dtype=new_dtype)
    # From a narrower base the value is the rounded one: round, then convert (widening
    # must not recover digits the weight's own dtype does not have).
    return lax.convert_element_type(operand.dequantise(), new_dtype)


# `transpose` and every other primitive materialise (= dequantise) by quax's default.


# ---------------------------------------------------------------------------------------
# quantise: swap targeted Linear weights for quantised values
# ---------------------------------------------------------------------------------------


def quantise(
    model: PyTree,
    *,
    method: Literal["nf4", "int8"] = "nf4",
    where: Where = None,
    block_size: int = 64,
    double_quant: bool = False,
) -> PyTree:
    """Replaces the weights of the targeted layers by quantised values, for QLoRA:
    `loraify` the result, and every adapter wraps a quantised base weight.

    **Arguments:**

    - `model`: an Equinox model (a PyTree).
    - `method`: `"nf4"` (4-bit NormalFloat, [`lora_jax.NF4Array`][]; the default) or
        `"int8"` (per-output-channel int8, [`lora_jax.Int8Array`][]).
    - `where`: which layers, exactly as for [`lora_jax.loraify`][]. `None` (the
        default): every supported layer.
    - `block_size`: NF4's block size (must divide each targeted weight's size). The
        int8 method uses one scale per output channel and ignores it.
    - `double_quant`: NF4 only: also quantise the absmax constants to 8 bits.

    **Returns:**

    A copy of `model` with the targeted weights quantised (biases stay as they are).
    Weights already quantised are left alone. Call the model through `quax.quaxify`.
    [`lora_jax.materialise`][] turns every quantised weight back into a plain array.

    !!! Example

        ```python
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        mlp = eqx.nn.MLP(64, 2, width_size=64, depth=2, key=jr.key(0))
        mlp = lora.quantise(mlp, method="nf4", where="all-linear")
        mlp = lora.loraify(mlp, rank=4, key=jr.key(1), where="all-linear")
        y = quax.quaxify(mlp)(jnp.ones(64))
        ```
    """
    # Imported here: `_loraify` imports this module's `is_quantised`.
    from ._loraify import LAYERS, _weight, find_targets

    check_choice(method, "method", ("nf4", "int8"))
    if not isinstance(double_quant, bool):
        raise TypeError(f"`double_quant` must be a bool, got {double_quant!r}.")
    if method == "int8" and double_quant:
        raise ValueError("`double_quant=True` applies to `method='nf4'` only.")
    if method == "nf4":
        check_block_size(block_size, 0)
    targets = find_targets(model, where=where)
    fresh = []
    for name, layer in targets:
        w = _weight(layer)
        if is_adapter(w):
            raise ValueError(
                f"Layer {name!r} is already adapted: quantise the model before "
                "`loraify` (or `lora_jax.materialise` it first)."
            )
        if is_quantised(w):
            continue
        _float_weight(w, f"{name}.weight")
        if method == "nf4":
            check_block_size(block_size, int(np.prod(w.shape[-2:])), f"layer {name!r}")
        fresh.append((name, layer))

    replacements = {}
    for name, layer in fresh:
        w = _weight(layer)
        if method == "nf4":
            q = NF4Array.from_array(w, block_size=block_size, double_quant=double_quant)
        else:
            q = Int8Array.from_array(w)
        field = LAYERS[type(layer)].field
        replacements[name] = eqx.tree_at(lambda l: getattr(l, field), layer, q)

    is_candidate = lambda x: type(x) in LAYERS

    def swap(path, node):
        if is_candidate(node):
            return replacements.get(path_name(path), node)
        return node

    return jtu.tree_map_with_path(swap, model, is_leaf=is_candidate)
