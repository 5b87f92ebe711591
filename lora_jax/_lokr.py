"""LoKr: `w + s·(w1 ⊗ w2)`, computed as `w·x + s·(w1 ⊗ w2)·x` by reshaping `x`, never
forming the Kronecker product."""

import math
from typing import Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import quax
from jaxtyping import Array, Float, PRNGKeyArray, Shaped

from . import _mosaic
from ._base import AbstractAdapter, as_scaling, expand_scaling
from ._dropout import module_keep, unit_mask
from ._rules import Dims, join_dims, per_matrix, plain_product, rank_minor, result_order
from ._validate import (
    check_choice,
    check_dtype,
    check_key,
    check_probability,
    check_rank,
    check_scalar,
    check_weight,
)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (and LyCORIS') split of `dimension` into two factors `(p, q)`,
    `p * q == dimension`.

    With `factor > 0` dividing `dimension`: `(factor, dimension // factor)`. Otherwise
    the divisor pair closest to the square root, the smaller first, with the smaller
    one at most `factor` when `factor > 0` (so `(1, dimension)` if no divisor fits).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    best = 1
    d = 1
    while d * d <= dimension:
        if dimension % d == 0 and d <= limit:
            best = d
        d += 1
    # A pair (p, q) with p > sqrt is the same pair swapped, so the search stops at sqrt.
    return best, dimension // best


def _kaiming(key, shape, dtype):
    """PyTorch's `kaiming_uniform_(a=sqrt(5))`: `U(±1/sqrt(fan_in))`, `fan_in` the
    product of every dimension but the first."""
    bound = 1 / math.sqrt(math.prod(shape[1:]))
    return jr.uniform(key, shape, dtype, -bound, bound)


def check_lokr_options(
    *,
    rank,
    key,
    alpha,
    decompose_both,
    decompose_factor,
    init_weights,
    rank_dropout,
    module_dropout,
    rank_dropout_scale,
    use_effective_conv2d,
    allow_materialise,
    stop_gradient,
) -> int:
    """LoKr's options checked (for a matrix and a conv alike); the rank."""
    rank = check_rank(rank)
    check_key(key)
    if alpha is not None:
        check_scalar(alpha, "alpha", positive=True)
    for name, flag in (
        ("decompose_both", decompose_both),
        ("rank_dropout_scale", rank_dropout_scale),
        ("use_effective_conv2d", use_effective_conv2d),
        ("allow_materialise", allow_materialise),
        ("stop_gradient", stop_gradient),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {flag!r}.")
    if (
        isinstance(decompose_factor, bool)
        or not isinstance(decompose_factor, int)
        or not (decompose_factor == -1 or decompose_factor > 0)
    ):
        raise ValueError(
            f"`decompose_factor` must be -1 or a positive integer, got {decompose_factor!r}."
        )
    if not (init_weights is True or init_weights is False or init_weights == "lycoris"):
        raise ValueError(f"`init_weights` must be True, False or 'lycoris', got {init_weights!r}.")
    check_probability(rank_dropout, "rank_dropout")
    check_probability(module_dropout, "module_dropout")
    return rank


def lokr_factors(
    key, shape, rank, decompose_both, decompose_factor, init_weights, dtype, tucker=False
):
    """`(w1, w1_a, w1_b, w2, w2_a, w2_b, t2)` (the unused ones `None`) as PEFT builds and
    initialises them for a weight of shape `(out, in, *kernel)`: `out = l·k` and
    `in = p·q` split by `factorization`; `w1 (l, p)` held as `w1_a (l, r) @ w1_b (r, p)`
    when `decompose_both` and `r < max(l, p)/2`; `w2 (k, q, *kernel)` held as
    `w2_a (k, r) @ w2_b (r, q·kernel)` when `r < max(k, q)/2`, or with `tucker` (PEFT's
    `use_effective_conv2d` on a kernel larger than 1) as the Tucker core
    `t2 (r, r, *kernel)` with `w2_a (k, r)` and `w2_b (r, q)`. (PEFT holds `w2_a` of
    the Tucker form transposed, `(r, k)`; it is drawn in that shape here, so from the
    same distribution.)"""
    out, inp, *kernel = shape
    l, k = factorization(out, decompose_factor)
    p, q = factorization(inp, decompose_factor)
    full_w1 = not (decompose_both and rank < max(l, p) / 2)
    full_w2 = not (rank < max(k, q) / 2)
    k1, k2, k3, k4 = jr.split(key, 4)
    zero_w1 = init_weights is True
    zero_w2 = init_weights == "lycoris"
    zeros = lambda shape: jnp.zeros(shape, dtype)
    w1 = w1_a = w1_b = w2 = w2_a = w2_b = t2 = None
    if full_w1:
        w1 = zeros((l, p)) if zero_w1 else _kaiming(k1, (l, p), dtype)
    else:
        w1_a = zeros((l, rank)) if zero_w1 else _kaiming(k1, (l, rank), dtype)
        w1_b = _kaiming(k2, (rank, p), dtype)
    if full_w2:
        w2 = zeros((k, q, *kernel)) if zero_w2 else _kaiming(k3, (k, q, *kernel), dtype)
    elif tucker:
        w2_a = _kaiming(k3, (rank, k), dtype).T
        w2_b = zeros((rank, q)) if zero_w2 else _kaiming(k4, (rank, q), dtype)
        t2 = _kaiming(jr.fold_in(key, 4), (rank, rank, *kernel), dtype)
    else:
        fan_in = q * math.prod(kernel)
        w2_a = _kaiming(k3, (k, rank), dtype)
        w2_b = zeros((rank, fan_in)) if zero_w2 else _kaiming(k4, (rank, fan_in), dtype)
    return w1, w1_a, w1_b, w2, w2_a, w2_b, t2


class LokrArray(AbstractAdapter):
    """Low-rank Kronecker product adaptation (LoKr, PEFT's / LyCORIS') of a matrix
    `w ∈ R^{n×m}`: `w + s·(w1 ⊗ w2)`, with `w1 ∈ R^{l×p}`, `w2 ∈ R^{k×q}`, `n = l·k`,
    `m = p·q` split as PEFT's `factorization` splits them (each dimension into the
    divisor pair closest to its square root, or by `decompose_factor`), and
    `s = alpha / r`.

    `w1` is held as `w1_a @ w1_b` (rank `r`) when `decompose_both` and
    `r < max(l, p) / 2`; `w2` as `w2_a @ w2_b` when `r < max(k, q) / 2`; otherwise in
    full. The unused fields are `None`. Parameter counts and the merged update equal
    PEFT's for the same configuration.

    The Kronecker product is never formed: the contracted dimension of `x` is reshaped
    into `(p, q)` and contracted with `w2` and `w1` in turn, in an order that leaves the
    result in `dot_general`'s layout. Leading dimensions of `w` (stacked layers, for
    `lax.scan` or a mixture of experts) are carried by every factor and the scaling;
    a product with the whole stack runs one such product per matrix (`jax.vmap`).
    """

    _w: Shaped[Array, "*batch out in"]
    w1: Float[Array, "*batch l p"] | None
    w1_a: Float[Array, "*batch l rank"] | None
    w1_b: Float[Array, "*batch rank p"] | None
    w2: Float[Array, "*batch k q"] | None
    w2_a: Float[Array, "*batch k rank"] | None
    w2_b: Float[Array, "*batch rank q"] | None
    scaling: Float[Array, "*batch"]
    dropout_key: PRNGKeyArray | None
    r: int = eqx.field(static=True)
    rank_dropout: float = eqx.field(static=True)
    module_dropout: float = eqx.field(static=True)
    rank_dropout_scale: bool = eqx.field(static=True)
    # Whether the stored matrix is the transpose of the adapted one (the factors stay
    # in the adapted matrix's layout).
    transposed: bool = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)
    kernel: str = eqx.field(static=True, default="xla")

    trainable_fields = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")

    def __init__(
        self,
        weight: Shaped[Array, "*batch out in"],
        *,
        rank: int,
        key: PRNGKeyArray,
        alpha: float | None = None,
        decompose_both: bool = False,
        decompose_factor: int = -1,
        init_weights: bool | Literal["lycoris"] = True,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = False,
        use_effective_conv2d: bool = False,
        dtype=None,
        allow_materialise: bool = False,
        stop_gradient: bool = True,
        kernel: str = "xla",
    ):
        """**Arguments:**

        - `weight`: the original weight, of shape `(*batch, out, in)`: every matrix
            of a stack gets its own factors (drawn from `key` split per matrix).
        - `rank`: PEFT's `r`.
        - `key`: randomness for initialising the factors.
        - `alpha`: the scaling is `alpha / rank`. `None` (the default) means a scaling
            of `1` (PEFT's default `alpha == r`).
        - `decompose_both`: also hold `w1` as a rank-`r` product.
        - `decompose_factor`: `-1` (the default) splits each dimension near its square
            root; a positive integer splits it as `(factor, dim // factor)` when it
            divides, as PEFT does.
        - `init_weights`: PEFT's: `True` (`w1` or `w1_a` zero, the rest Kaiming-uniform:
            a no-op), `"lycoris"` (`w2` or `w2_b` zero: a no-op) or `False` (all
            Kaiming-uniform: not a no-op).
        - `rank_dropout`: PEFT's: the probability of zeroing each output row of the
            update (divided by the mean of the mask if `rank_dropout_scale`).
        - `module_dropout`: PEFT's: the probability of skipping the update entirely
            (per matrix of a stack).
        - `rank_dropout_scale`: see `rank_dropout`.

            Both dropouts act only while the adapter holds a key (see
            [`lora_jax.with_dropout_keys`][]); they are the identity otherwise.
        - `use_effective_conv2d`: accepted for PEFT's configuration surface; it only
            concerns convolutions and has no effect on a matrix.
        - `dtype`: the factors' dtype. Defaults to the weight's.
        - `allow_materialise`, `stop_gradient`: as for [`lora_jax.LoraArray`][].
        - `kernel`: `"xla"` (the default) or `"mosaic"`: as for
            [`lora_jax.LoraArray`][], the large product and the update's last factor
            in one Mosaic GPU kernel on a Hopper GPU, where `w2` is held at rank ≤ 64
            (as `w2_a @ w2_b`) and `w1` has at most 16 entries (`decompose_factor=4`,
            say), `out/l` and `in/p` are multiples of 128, and neither dropout is
            active; XLA's path otherwise.

        !!! Example

            ```python
            import jax.numpy as jnp
            import jax.random as jr
            import quax
            import lora_jax as lora

            w = jr.normal(jr.key(0), (8, 6))
            lw = lora.LokrArray(w, rank=2, key=jr.key(1))
            x = jnp.ones(6)
            assert jnp.allclose(quax.quaxify(jnp.matmul)(lw, x), w @ x)
            ```
        """
        check_weight(weight, "weight")
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
        check_choice(kernel, "kernel", ("xla", "mosaic"))
        dtype = check_dtype(dtype, weight.dtype)
        *batch, out, inp = weight.shape
        make = lambda k: lokr_factors(
            k, (out, inp), rank, decompose_both, decompose_factor, init_weights, dtype
        )
        if batch:  # one key per matrix of the stack
            keys = jr.split(key, math.prod(batch))
            factors = jax.tree.map(lambda x: x.reshape(*batch, *x.shape[1:]), jax.vmap(make)(keys))
        else:
            factors = make(key)
        self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, _ = factors
        self._w = weight
        self.scaling = as_scaling(1.0 if alpha is None else alpha / rank, tuple(batch))
        self.r = rank
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.rank_dropout_scale = rank_dropout_scale
        self.dropout_key = None
        self.transposed = False
        self.stop_gradient = stop_gradient
        self.allow_materialise = allow_materialise
        self.kernel = kernel

    @property
    def rank(self) -> int:
        return self.r

    def factors(self) -> tuple[Array, Array]:
        """`(w1, w2)` as matrices (small: each about the square root of `w`'s size)."""
        return _factors(self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b)

    def delta(self) -> Array:
        w1, w2 = self.factors()
        *batch, l, p = w1.shape
        k, q = w2.shape[-2:]
        d = jnp.einsum("...iu,...jv->...ijuv", w1, w2).reshape(*batch, l * k, p * q)
        d = d * expand_scaling(lax.stop_gradient(self.scaling), d)
        return jnp.swapaxes(d, -1, -2) if self.transposed else d

    def dot_general(self, other, dims: Dims, params):
        if self._w.ndim > 2:
            return per_matrix(self, other, dims, params)
        # A decomposed factor is applied as its two thin factors, never multiplied out:
        # `w2` is the large one (about `out/f × in/f`).
        w1 = self.w1 if self.w1 is not None else (self.w1_a, self.w1_b)
        w2 = self.w2 if self.w2 is not None else (self.w2_a, self.w2_b)
        rows = keep = None
        if self.dropout_key is not None:
            k_rank, k_module = jr.split(self.dropout_key)
            if self.rank_dropout > 0:
                n_rows = _shape(w1)[0] * _shape(w2)[0]
                rows = unit_mask(
                    k_rank,
                    self.rank_dropout,
                    (n_rows,),
                    _dtype(w1),
                    rescale=self.rank_dropout_scale,
                )
            if self.module_dropout > 0:
                keep = module_keep(k_module, self.module_dropout, (), _dtype(w1))
        # The kernel's gradient stops at `w`: a trained base takes XLA's path.
        if self.kernel == "mosaic" and self.stop_gradient and rows is None and keep is None:
            scaling = lax.stop_gradient(self.scaling)
            out = _kernel_product(self.w, w1, w2, scaling, self.transposed, other, dims, params)
            if out is not None:
                return out
        return _lokr_dot(
            self.w,
            w1,
            w2,
            lax.stop_gradient(self.scaling),
            self.transposed,
            other,
            dims,
            params,
            rows,
            keep,
        )

    def transpose(self, permutation, *, swap):
        w = quax.quaxify(lambda x: lax.transpose(x, permutation))(self._w)
        # The factors keep the adapted matrix's layout; a stack's order follows `w`'s.
        lead = tuple(permutation[:-2])
        nb = len(lead)
        order = lambda x: None if x is None else lax.transpose(x, lead + (nb, nb + 1))
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
        held = [f for f in names if getattr(self, f) is not None]
        new = eqx.tree_at(
            lambda v: (v._w, v.scaling, *(getattr(v, f) for f in held)),
            self,
            (w, lax.transpose(self.scaling, lead), *(order(getattr(self, f)) for f in held)),
        )
        # A static field: set on the fresh copy `tree_at` made.
        object.__setattr__(new, "transposed", self.transposed != swap)
        return new


def _factors(w1, w1_a, w1_b, w2, w2_a, w2_b):
    if w1 is None:
        w1 = w1_a @ w1_b
    if w2 is None:
        w2 = w2_a @ w2_b
    return w1, w2


@quax.quaxify
def _lokr_dot(w, w1, w2, scaling, transposed, other, dims: Dims, params, rows=None, keep=None):
    """`rows`: a rank-dropout mask over the adapted matrix's output rows; `keep`: the
    module-dropout scalar; `None` when off."""
    dims, perm = result_order(dims, w.ndim, other.ndim, params)
    out = _lokr_product(w, w1, w2, scaling, transposed, other, dims, params, rows, keep)
    return out if perm is None else lax.transpose(out, perm)


def _lokr_product(w, w1, w2, scaling, transposed, other, dims: Dims, params, rows, keep):
    dn = join_dims(*dims)
    out = plain_product(w, other, dims, params)
    factor = scaling.astype(_dtype(w1))
    if keep is not None:
        factor = factor * keep
    # (A decomposed factor's `_a` half has the rank as its minor dimension.)
    w1 = factor * w1 if not isinstance(w1, tuple) else (factor * rank_minor(w1[0]), w1[1])
    w2 = w2 if not isinstance(w2, tuple) else (rank_minor(w2[0]), w2[1])
    if other.dtype != _dtype(w1):
        other = other.astype(_dtype(w1))
    precision = params.get("precision")
    if len(dims.adapter_contract) == 1 and not dims.adapter_batch:
        # The stored dimension contracted, seen on the factors (their layout is the
        # adapted matrix's, the stored one may be its transpose).
        c = dims.adapter_contract[0] ^ int(transposed)
        e = dims.other_contract[0]
        if rows is not None and c == 0:
            # The masked rows are contracted: mask `x` along them instead.
            shape = [1] * other.ndim
            shape[e] = rows.shape[0]
            other = other * rows.reshape(shape)
        delta = _kron_apply(w1, w2, c, other, e, dims.adapter_lhs, precision)
        if rows is not None and c == 1:
            shape = [1] * delta.ndim
            shape[0 if dims.adapter_lhs else -1] = rows.shape[0]
            delta = delta * rows.reshape(shape)
    else:
        # Fallback, for products that contract both dimensions of the matrix or batch
        # over one: form the update `s·(w1 ⊗ w2)` alone (never `w + Δ`).
        d = jnp.kron(_full(w1), _full(w2))
        if rows is not None:
            d = d * rows[:, None]
        d = d.T if transposed else d
        delta = (
            lax.dot_general(d, other, dn, precision=precision)
            if dims.adapter_lhs
            else (lax.dot_general(other, d, dn, precision=precision))
        )
    return out + delta.astype(out.dtype)


def _kron_apply(w1, w2, c: int, x, e: int, adapter_lhs: bool, precision):
    """`dot_general(w1 ⊗ w2, x)` contracting the Kronecker product's dimension `c` with
    `x`'s dimension `e`, in `dot_general`'s layout: `(free, *x_free)` if `adapter_lhs`
    else `(*x_free, free)`. `x`'s dimension `e` is split in place, never moved."""
    f = 1 - c
    s1, s2 = _shape(w1), _shape(w2)
    p1, p2 = s1[c], s2[c]
    q1, q2 = s1[f], s2[f]
    if not adapter_lhs and e == x.ndim - 1:
        return _kron_apply_minor(w1, w2, c, x, precision)
    x = x.reshape(x.shape[:e] + (p1, p2) + x.shape[e + 1 :])
    dot = lambda l, r, lc, rc: lax.dot_general(
        l, r, (((lc,), (rc,)), ((), ())), precision=precision
    )

    def left(m, y, k):
        """`dot(m, y, c, k)`: `(m's free, *y without k)`."""
        if not isinstance(m, tuple):
            return dot(m, y, c, k)
        ma, mb = m  # m = ma @ mb
        return dot(ma, dot(mb, y, 1, k), 1, 0) if c == 1 else dot(mb, dot(ma, y, 0, k), 0, 0)

    if adapter_lhs:
        # (q2, *x with p2 gone) then (q1, q2, *x_free).
        t = left(w2, x, e + 1)
        u = left(w1, t, 1 + e)
        return u.reshape((q1 * q2,) + u.shape[2:])
    # (*x with p1 gone, q1) then (*x_free, q1, q2).
    t = _right(x, w1, e, c, precision)
    u = _right(t, w2, e, c, precision)
    return u.reshape(u.shape[:-2] + (q1 * q2,))


def _right(y, m, k: int, c: int, precision):
    """`y`'s dimension `k` contracted with the Kronecker factor `m`'s dimension `c`
    (`m` held in full or as `(m_a, m_b)`): `(*y without k, m's free)`."""

    def dot(l, r, lc, rc):
        return lax.dot_general(l, r, (((lc,), (rc,)), ((), ())), precision=precision)

    if not isinstance(m, tuple):
        return dot(y, m, k, c)
    ma, mb = m
    if c == 1:
        t = dot(y, mb, k, 1)
        return dot(t, ma, t.ndim - 1, 1)
    t = dot(y, ma, k, 0)
    return dot(t, mb, t.ndim - 1, 0)


def _kron_apply_minor(w1, w2, c: int, x, precision):
    """`_kron_apply` when `x`'s last dimension is contracted and the result is
    `(*x_free, q1·q2)` (a Linear layer under `vmap`, `x @ w.T`): every product in
    the canonical layout of a (batched) matrix product, so nothing is transposed.

    Per row `x_r` seen as a `(p1, p2)` matrix, the result is `w1 · x_r · w2ᵀ`: `w2`
    contracts the minor dimension as one large matrix product, and `w1` the middle one
    as a product batched over the rows (`w1` broadcast to each: it is small). A
    decomposed `w2` may instead put `w1` between its two thin factors, where the
    middle dimension meets a rank-sized tensor."""
    f = 1 - c
    s1, s2 = _shape(w1), _shape(w2)
    p1, p2, q1, q2 = s1[c], s2[c], s1[f], s2[f]
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x = x.reshape(rows, p1, p2)

    def batched_dot(l, r):  # (rows, m, k) · (rows, k, n) -> (rows, m, n)
        return lax.dot_general(l, r, (((2,), (1,)), ((0,), (0,))), precision=precision)

    def minor(y, m):
        """`y`'s last dimension (`p2`) contracted with `m`'s dimension `c`, on `y` seen
        as a matrix (so that `m`'s gradient, which contracts every other dimension, is
        one matrix product too, without a transpose)."""
        out = _right(y.reshape(-1, y.shape[-1]), m, 1, c, precision)
        return out.reshape(*y.shape[:-1], out.shape[-1])

    # `w1` as (q1, p1).
    m1 = _full(w1)
    m1 = m1 if c == 1 else m1.T

    def middle(y):  # (rows, p1, n) -> (rows, q1, n)
        batched = lambda y: batched_dot(jnp.broadcast_to(m1, (rows, q1, p1)), y)
        if q1 * p1 > _SMALL_W1:
            return batched(y)
        # A GPU runs a product batched over thousands of rows of a tiny `w1` far
        # below its memory bandwidth; there the `q1·p1` multiply-adds per element go
        # as one fused elementwise pass instead. A CPU is faster with the product.
        return _per_platform(y, default=batched, gpu=lambda y: _middle_elementwise(m1, y))

    # Multiply-adds per row of `x` for each order; take the cheapest.
    orders = {}
    if isinstance(w2, tuple):
        # `w2 = w2_a @ w2_b` of rank r: its two thin factors on either side of `w1`
        # (`w1 ⊗ w2_a·w2_b = (1 ⊗ w2_a)(w1 ⊗ 1)(1 ⊗ w2_b)`), so `w1` mixes a
        # `(rows, p1, r)` tensor, not an output-sized one.
        inner, outer = (w2[1], w2[0]) if c == 1 else w2
        r = inner.shape[1 - c]
        orders["rank"] = (
            p1 * p2 * r + q1 * p1 * r + q1 * r * q2,
            lambda x: minor(middle(minor(x, inner)), outer),
        )
    per_row = p2 * q2 if not isinstance(w2, tuple) else w2[0].shape[1] * (p2 + q2)
    # (rows, p1, q2) -> (rows, q1, q2), and (rows, q1, p2) -> (rows, q1, q2).
    orders["w2"] = (p1 * per_row + q1 * p1 * q2, lambda x: middle(minor(x, w2)))
    orders["w1"] = (q1 * p1 * p2 + q1 * per_row, lambda x: minor(middle(x), w2))
    _, apply = min(orders.values(), key=lambda order: order[0])
    return apply(x).reshape(*lead, q1 * q2)


# The largest `w1` (as `q1·p1` entries) contracted elementwise on a GPU. Measured on
# an H100 (benchmarks/step.py --preset gpu, the `lokr` row): a 4×4 `w1` (PEFT's
# `decompose_factor=4`) takes the step from 1.63× to 1.49× the floor; a 32×64 one is
# 3.6× slower than the batched product.
_SMALL_W1 = 16


def _per_platform(y, *, default, gpu):
    """`gpu(y)` when compiled for a GPU, else `default(y)` (chosen at lowering)."""
    return lax.platform_dependent(y, default=default, cuda=gpu, rocm=gpu)


def _middle_elementwise(m, y):
    """`m (q, p)` applied to the middle dimension of `y (rows, p, n)`, as a sum of
    `p` scaled slices, accumulated in float32 (as a matrix product of `y`'s dtype
    would)."""
    # (Not `promote_types`: under strict dtype promotion bf16 and f32 have no common type.)
    acc = y.dtype if jnp.finfo(y.dtype).bits >= 32 else jnp.dtype(jnp.float32)
    prod = m.astype(acc)[None, :, :, None] * y.astype(acc)[:, None, :, :]
    return jnp.sum(prod, axis=2).astype(y.dtype)


def _shape(m) -> tuple[int, int]:
    """The shape of a Kronecker factor held in full or as `(m_a, m_b)`."""
    return (m[0].shape[0], m[1].shape[1]) if isinstance(m, tuple) else m.shape


def _dtype(m):
    return m[0].dtype if isinstance(m, tuple) else m.dtype


def _full(m):
    return m[0] @ m[1] if isinstance(m, tuple) else m


def _kernel_product(w, w1, w2, scaling, transposed: bool, other, dims: Dims, params):
    """The adapted product by the fused kernel (`_mosaic`), in `dot_general`'s layout,
    or `None` where it does not apply: a plain `x·wᵀ` (an untransposed adapter), a
    small `w1`, `w2` held at rank ≤ `PAD`, and shapes that tile.

    `w1 ⊗ w2_a·w2_b = (1 ⊗ w2_a)(w1 ⊗ 1)(1 ⊗ w2_b)`: the thin `(rows, p1, r)` product
    with `w2_b` and `w1`'s mixing (to `(rows, q1, r)`) are XLA's, and the kernel adds
    `1 ⊗ w2_a` as a block-diagonal low-rank term, group `i` of the output's `q1`
    column groups from the rows' `i`-th rank block."""
    if transposed or not isinstance(w2, tuple) or jnp.ndim(scaling):
        return None
    w2_a, w2_b = w2
    (q1, p1), (q2, r), p2 = _shape(w1), w2_a.shape, w2_b.shape[1]
    if q1 * p1 > _SMALL_W1 or r > _mosaic.PAD:
        return None
    layout = _mosaic.kernel_layout(w, jax.tree.leaves((w1, w2)), other, dims, params)
    if layout is None or layout[0]:
        return None
    perm = layout[1]
    w1 = _full(w1)
    lead = other.shape[:-1]
    rows = math.prod(lead)
    if not _mosaic.tiles(rows, q1 * q2, p1 * p2, groups=q1):
        return None
    m1 = scaling.astype(w1.dtype) * w1
    y = _fused_lokr(other.reshape(rows, p1 * p2), w, m1, w2_a, w2_b)
    y = y.reshape(*lead, q1 * q2)
    return y if perm is None else lax.transpose(y, perm)


def _grouped(t):
    """`(rows, groups, r)` -> `(rows, groups·PAD)`, each group's rank zero-padded to
    the kernel's `PAD`."""
    rows, groups, r = t.shape
    t = jnp.pad(t, ((0, 0), (0, 0), (0, _mosaic.PAD - r)))
    return t.reshape(rows, groups * _mosaic.PAD)


def _dot(x, y):
    """`x·yᵀ` in x's dtype with float32 accumulation, with no transpose of either."""
    f32 = jnp.float32
    out = lax.dot_general(x, y, (((1,), (1,)), ((), ())), preferred_element_type=f32)
    return out.astype(x.dtype)


@jax.custom_vjp
def _fused_lokr(x, w, m1, w2_a, w2_b):
    """`x·(w + m1 ⊗ w2_a·w2_b)ᵀ` for x `(rows, p1·p2)`, w `(q1·q2, p1·p2)` (an array or
    a quantised one), `m1` `(q1, p1)` (the scaling folded in), `w2_a` `(q2, r)`, `w2_b`
    `(r, p2)`; no gradient reaches w."""
    return _fused_lokr_forward(x, w, m1, w2_a, w2_b)[0]


def _fused_lokr_forward(x, w, m1, w2_a, w2_b):
    rows = x.shape[0]
    (q1, p1), (r, p2) = m1.shape, w2_b.shape
    t = _dot(x.reshape(rows * p1, p2), w2_b).reshape(rows, p1, r)
    u = _middle_elementwise(m1, t)  # (rows, q1, r)
    y = _mosaic.lora_matmul(
        x, _mosaic.dense(w), _grouped(u), _mosaic.pad_rows(w2_a.T), w_transposed=True, groups=q1
    )
    return y, (x, w, m1, w2_a, w2_b, t, u)


def _fused_lokr_backward(res, g):
    x, w, m1, w2_a, w2_b, t, u = res
    rows = x.shape[0]
    (q1, p1), (q2, r), p2 = m1.shape, w2_a.shape, w2_b.shape[1]
    f32 = jnp.float32
    g_rows = g.reshape(rows * q1, q2)
    v = jnp.dot(g_rows, w2_a, preferred_element_type=f32).astype(g.dtype)  # (rows·q1, r)
    v = v.reshape(rows, q1, r)
    v1 = _middle_elementwise(m1.T, v)  # (rows, p1, r)
    gx = _mosaic.matmul_or_xla(
        g, _mosaic.dense(w), _grouped(v1), _mosaic.pad_rows(w2_b), w_transposed=False, groups=p1
    )
    g_w2_a = jnp.dot(g_rows.T, u.reshape(rows * q1, r), preferred_element_type=f32)
    g_w2_b = jnp.dot(
        v1.reshape(rows * p1, r).T, x.reshape(rows * p1, p2), preferred_element_type=f32
    )
    g_m1 = jnp.einsum("nor,nir->oi", v, t, preferred_element_type=f32)
    return (
        gx,
        None,
        g_m1.astype(m1.dtype),
        g_w2_a.astype(w2_a.dtype),
        g_w2_b.astype(w2_b.dtype),
    )


_fused_lokr.defvjp(_fused_lokr_forward, _fused_lokr_backward)
