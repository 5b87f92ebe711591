"""Shared dispatch plumbing: `dot_general` dimension bookkeeping for a matrix held as
`w + a @ b`, and the rules every adapter value gets (dot_general on either side,
transpose, dtype casts, `jax.checkpoint`).

Every adapter value stores a matrix-shaped weight of shape `(*batch, out, in)`. A
`lax.dot_general` that meets it may contract, batch or keep any of its dimensions; the
functions here work out, once per trace, how to compute the adapted product from the
factors so that the result comes out in exactly the layout `dot_general` promises --
no transposes beyond those the plain model has.
"""

import functools
import string
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.extend.core as jexc
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import quax
from jax._src.ad_checkpoint import remat_p
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import ArrayLike

from ._base import AbstractAdapter
from ._remat import OUTPUT_NAME, THIN_NAME


# ---------------------------------------------------------------------------------------
# Dimension bookkeeping
# ---------------------------------------------------------------------------------------


class Dims(NamedTuple):
    """A `dot_general`'s dimension numbers seen from the adapter's side."""

    adapter_contract: tuple[int, ...]
    other_contract: tuple[int, ...]
    adapter_batch: tuple[int, ...]
    other_batch: tuple[int, ...]
    adapter_lhs: bool


def split_dims(dimension_numbers, adapter_lhs: bool) -> Dims:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = map(lambda d: tuple(int(i) for i in d), (lc, rc, lb, rb))
    if adapter_lhs:
        return Dims(lc, rc, lb, rb, True)
    return Dims(rc, lc, rb, lb, False)


def join_dims(adapter_contract, other_contract, adapter_batch, other_batch, adapter_lhs):
    """The inverse of `split_dims`: dimension numbers in `dot_general`'s own order."""
    if adapter_lhs:
        return (
            (tuple(adapter_contract), tuple(other_contract)),
            (tuple(adapter_batch), tuple(other_batch)),
        )
    return (
        (tuple(other_contract), tuple(adapter_contract)),
        (tuple(other_batch), tuple(adapter_batch)),
    )


def free_dims(ndim: int, contract, batch) -> list[int]:
    return [d for d in range(ndim) if d not in contract and d not in batch]


def output_position(dims: Dims, adapter_ndim: int, other_ndim: int, d: int):
    """Where the adapter's dimension `d` lands in the `dot_general` output, or `None`
    if it is contracted."""
    if d in dims.adapter_contract:
        return None
    if d in dims.adapter_batch:
        return dims.adapter_batch.index(d)
    nb = len(dims.adapter_batch)
    a_free = free_dims(adapter_ndim, dims.adapter_contract, dims.adapter_batch)
    if dims.adapter_lhs:
        return nb + a_free.index(d)
    o_free = free_dims(other_ndim, dims.other_contract, dims.other_batch)
    return nb + len(o_free) + a_free.index(d)


# ---------------------------------------------------------------------------------------
# The factored product: dot_general(w + a @ b, x) = dot_general(w, x) + a·(b·x)
# ---------------------------------------------------------------------------------------


def result_order(dims: Dims, adapter_ndim: int, other_ndim: int, params) -> tuple[Dims, Any]:
    """The order in which to compute an adapted product: `(dims, perm)`, where `perm`
    (or `None`) is the transpose that brings the result to `dot_general`'s layout.

    Under `vmap`, JAX binds `W @ x` as `dot_general(W, X)` with the mapped axis free on
    `X`'s side, laid out after `W`'s free axis, and then moves it to the front: the
    consumer transposes. XLA folds that transpose into a plain `dot`, but not through
    the sum `w·x + s·a·(b·x)`, and the transposed read of a full activation is what
    made quax's example slow. So with the matrix on the left and free axes on both
    sides, the product is computed with the operands swapped, in the layout the
    consumer wants, and transposed once at the end: the consumer's transpose then
    cancels against it and XLA emits no copy.
    """
    n_free = adapter_ndim - len(dims.adapter_contract) - len(dims.adapter_batch)
    o_free = other_ndim - len(dims.other_contract) - len(dims.other_batch)
    if not dims.adapter_lhs or n_free != 1 or o_free == 0 or params.get("out_sharding") is not None:
        return dims, None
    nb = len(dims.adapter_batch)
    perm = (*range(nb), nb + o_free, *range(nb, nb + o_free))
    return dims._replace(adapter_lhs=False), perm


def plain_product(w, other, dims: Dims, params):
    """`dot_general` of the stored matrix `w` with `other`, on the side `dims` says."""
    dn = join_dims(*dims)
    if dims.adapter_lhs:
        return lax.dot_general(w, other, dn, **params)
    return lax.dot_general(other, w, dn, **params)


def _dot(lhs, rhs, dimension_numbers, precision, preferred_element_type=None, **kw):
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kw,
    )


def rank_minor(f):
    """A factor matrix `f` of shape `(n, rank)`, unchanged, whose gradient a CPU
    computes as `(rank, n)` and then transposes.

    A factor's gradient contracts two activations over the tokens, `gᵀ·t`. XLA:CPU
    runs that product about 7× slower when the result's minor dimension is the rank
    than when it is the long one: 2.2 against 0.3 ms for a `(2048, 8)` result over 512
    tokens. In the benchmark's CPU step, LoRA's `a` gradients took 9 of its 12 ms over
    the floor. In the backward pass the cotangent is transposed, held by a barrier,
    and transposed back: XLA folds the first transpose into the product, which then
    writes the fast layout, and the second moves a rank-sized matrix. The forward pass
    is untouched (the identity with a custom JVP).

    It is the identity on other backends, whose matrix units take either layout. It
    is also the identity on a stack of matrices: with two stacking dimensions,
    XLA:CPU folded the transpose into a batched product's layout and then failed a
    check compiling it. It is the identity too where the rank is not the thin side."""
    if f.ndim != 2 or f.shape[0] <= f.shape[1]:
        return f
    return lax.platform_dependent(f, default=lambda f: f, cpu=_rank_major_grad)


@jax.custom_jvp
def _rank_major_grad(f):
    return f


@_rank_major_grad.defjvp
def _rank_major_grad_jvp(primals, tangents):
    (f,), (df,) = primals, tangents
    return f, lax.optimization_barrier(df.T).T


def lowrank_product(a, b, other, dims: Dims, precision, out_sharding=None):
    """`dot_general(a @ b, other)` with the dimension numbers `dims`, computed as two
    thin products and never forming `a @ b`.

    `a` has shape `(*batch, out, rank)` and `b` `(*batch, rank, in)`. The result has the
    layout `dot_general` gives for the full matrix. `other` is cast to the factors'
    dtype; the result is in that dtype too.

    `out_sharding` (a `NamedSharding` or `None`) is the sharding of the result. The
    thin intermediate gets the same layout with the rank dimension replicated, so that
    a product whose contracting dimensions are sharded (which an explicit mesh refuses
    to resolve alone) is still well defined.
    """
    n = a.ndim
    out_d, in_d = n - 2, n - 1
    lead = range(n - 2)
    ac, oc, ab, ob = (
        dims.adapter_contract,
        dims.other_contract,
        dims.adapter_batch,
        (dims.other_batch),
    )
    if other.dtype != a.dtype:
        other = other.astype(a.dtype)
    a = rank_minor(a)
    simple = not any(d in ac for d in lead) and out_d not in ab and in_d not in ab
    if simple and in_d in ac:
        first, second, p_other = b, a, out_d  # rank sits at `out`'s place in `b`
        r_second, new_second = in_d, out_d
    elif simple and out_d in ac:
        first, second, p_other = a, b, in_d  # rank sits at `in`'s place in `a`
        r_second, new_second = out_d, in_d
    else:
        return _einsum_product(a, b, other, dims, precision, out_sharding)

    # Step one: `first` stands in for the matrix; its rank dimension must stay free.
    c_x = None
    ac1, oc1 = list(ac), list(oc)
    if p_other in ac1:
        c_x = oc1.pop(ac1.index(p_other))
        ac1.remove(p_other)
    dn1 = join_dims(ac1, oc1, ab, ob, dims.adapter_lhs)
    nb = len(ab)
    a_free = free_dims(n, ac1, ab)
    o_free = free_dims(other.ndim, oc1, ob)
    if dims.adapter_lhs:
        a_pos = {d: nb + i for i, d in enumerate(a_free)}
        o_pos = {d: nb + len(a_free) + i for i, d in enumerate(o_free)}
    else:
        o_pos = {d: nb + i for i, d in enumerate(o_free)}
        a_pos = {d: nb + len(o_free) + i for i, d in enumerate(a_free)}
    t_sharding = None
    if out_sharding is not None:
        # `t` is laid out as the result, except that the rank stands where `p_other`
        # would be (replicated), and, if `p_other` was contracted, `other`'s dimension
        # `c_x` is free (replicated too: it is contracted in step two).
        spec = _spec(out_sharding, _out_ndim(n, other.ndim, dims))
        t_spec = [None] * (nb + len(a_free) + len(o_free))
        for i in range(nb):
            t_spec[i] = spec[i]
        for d, i in a_pos.items():
            if d != p_other:
                t_spec[i] = spec[output_position(dims, n, other.ndim, d)]
        for e, i in o_pos.items():
            if e != c_x:
                t_spec[i] = spec[_other_position(dims, n, other.ndim, e)]
        t_sharding = _with_spec(out_sharding, t_spec)
    if dims.adapter_lhs:
        t = _dot(first, other, dn1, precision, out_sharding=t_sharding)
    else:
        t = _dot(other, first, dn1, precision, out_sharding=t_sharding)
    t = checkpoint_name(t, THIN_NAME)  # kept by `remat_policy`: rank-sized

    # Step two: contract `second`'s rank with `t`'s; every leading dimension of the
    # factors is a batch dimension of this product.
    lead_free = [d for d in lead if d not in ab]
    s_batch = list(ab) + lead_free
    t_batch = list(range(nb)) + [a_pos[d] for d in lead_free]
    s_contract = [r_second]
    t_contract = [a_pos[p_other]]
    if c_x is not None:
        s_contract.append(new_second)
        t_contract.append(o_pos[c_x])
    if dims.adapter_lhs:
        return _dot(
            second,
            t,
            ((s_contract, t_contract), (s_batch, t_batch)),
            precision,
            out_sharding=out_sharding,
        )
    k = len(lead_free)
    out_ndim = _out_ndim(n, other.ndim, dims)
    n_o = out_ndim - nb - k - (0 if c_x is not None else 1)
    # Rare: a stacked matrix on the right whose stacking dimensions are not batched.
    # `dot_general` puts those after the other operand's dimensions; so does the
    # result, so the product below is laid out with them first and moved after.
    src, dst = tuple(range(nb, nb + k)), tuple(range(nb + n_o, nb + n_o + k))
    dot_sharding = out_sharding
    if out_sharding is not None and k:
        spec = _spec(out_sharding, out_ndim)
        order = list(range(nb)) + list(dst) + list(range(nb, nb + n_o))
        order += list(range(nb + n_o + k, out_ndim))
        dot_sharding = _with_spec(out_sharding, [spec[i] for i in order])
    out = _dot(
        t,
        second,
        ((t_contract, s_contract), (t_batch, s_batch)),
        precision,
        out_sharding=dot_sharding,
    )
    if k:
        out = jnp.moveaxis(out, src, dst)
    return out


def _out_ndim(adapter_ndim: int, other_ndim: int, dims: Dims) -> int:
    return adapter_ndim + other_ndim - 2 * len(dims.adapter_contract) - len(dims.adapter_batch)


def _other_position(dims: Dims, adapter_ndim: int, other_ndim: int, e: int) -> int:
    """Where `other`'s free dimension `e` lands in the `dot_general` output."""
    nb = len(dims.adapter_batch)
    o_free = free_dims(other_ndim, dims.other_contract, dims.other_batch)
    if dims.adapter_lhs:
        n_a = len(free_dims(adapter_ndim, dims.adapter_contract, dims.adapter_batch))
        return nb + n_a + o_free.index(e)
    return nb + o_free.index(e)


def _spec(sharding, ndim: int) -> list:
    """A `NamedSharding`'s partitions, one entry per dimension."""
    parts = list(sharding.spec)
    return parts + [None] * (ndim - len(parts))


def _with_spec(sharding, parts):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*parts))


def product_sharding(out_sharding, out):
    """The sharding the low-rank term of a product must have: the caller's
    `out_sharding` if given; else, under a mesh with explicit axes, the sharding the
    main product `out` came out with (so that the two add); else `None`, leaving the
    choice to the partitioner."""
    if out_sharding is not None:
        return out_sharding
    if not isinstance(out, jax.Array):
        return None  # a nested quax value: its own rules decide
    sharding = getattr(jax.typeof(out), "sharding", None)
    if sharding is None or sharding.mesh.empty or not sharding.mesh.explicit_axes:
        return None
    return sharding


def _einsum_product(a, b, other, dims: Dims, precision, out_sharding=None):
    """Any other arrangement (a contracted stacking dimension, `out` or `in` as a batch
    dimension, nothing contracted): an einsum that contracts `b` with `other` first."""
    letters = iter(string.ascii_letters)
    n = a.ndim
    adapter = [next(letters) for _ in range(n)]
    rank = next(letters)
    other_sub = [None] * other.ndim
    for d, e in zip(dims.adapter_contract, dims.other_contract):
        other_sub[e] = adapter[d]
    for d, e in zip(dims.adapter_batch, dims.other_batch):
        other_sub[e] = adapter[d]
    other_sub = [s if s is not None else next(letters) for s in other_sub]
    batch = [adapter[d] for d in dims.adapter_batch]
    a_free = [adapter[d] for d in free_dims(n, dims.adapter_contract, dims.adapter_batch)]
    o_free = [other_sub[e] for e in free_dims(other.ndim, dims.other_contract, dims.other_batch)]
    out = batch + (a_free + o_free if dims.adapter_lhs else o_free + a_free)
    a_sub = adapter[:-1] + [rank]
    b_sub = adapter[:-2] + [rank, adapter[-1]]
    spec = f"{''.join(a_sub)},{''.join(b_sub)},{''.join(other_sub)}->{''.join(out)}"
    return jnp.einsum(
        spec,
        a,
        b,
        other,
        optimize=[(1, 2), (0, 1)],
        precision=precision,
        out_sharding=out_sharding,
    )


# ---------------------------------------------------------------------------------------
# Rules shared by every adapter
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("dims", "params"))
def _cached_dot(adapter, other, *, dims: Dims, params: tuple):
    return adapter.dot_general(other, dims, dict(params))


def _adapted_dot(adapter: AbstractAdapter, other, dims: Dims, params: dict):
    """`adapter.dot_general(other, dims, params)` under a `jax.jit` keyed on the
    shapes and static fields: quax inlines the rule at every layer it meets, so a deep
    model of identical layers would trace it once per layer; this way the rule is
    traced once per distinct layer and later layers reuse its jaxpr (and the caches of
    its JVP, partial evaluation and lowering). XLA inlines the call."""
    frozen = tuple(sorted(params.items()))
    try:
        hash(frozen)
    except TypeError:  # a parameter a future JAX makes unhashable: trace in place
        out = adapter.dot_general(other, dims, params)
    else:
        out = _cached_dot(adapter, other, dims=dims, params=frozen)
    # What `remat_policy` keeps (the product as a whole, whatever the method).
    return checkpoint_name(out, OUTPUT_NAME)


@quax.register(lax.dot_general_p)
def _(lhs: AbstractAdapter, rhs: ArrayLike | quax.ArrayValue, *, dimension_numbers, **params):
    return _adapted_dot(lhs, rhs, split_dims(dimension_numbers, True), params)


@quax.register(lax.dot_general_p)
def _(lhs: ArrayLike | quax.ArrayValue, rhs: AbstractAdapter, *, dimension_numbers, **params):
    return _adapted_dot(rhs, lhs, split_dims(dimension_numbers, False), params)


@quax.register(lax.dot_general_p)
def _(lhs: AbstractAdapter, rhs: AbstractAdapter, *, dimension_numbers, **params):
    # The right-hand adapter is met again, as an ordinary operand, inside the left's
    # rule: every product stays factored.
    return _adapted_dot(lhs, rhs, split_dims(dimension_numbers, True), params)


@quax.register(lax.transpose_p)
def _(operand: AbstractAdapter, *, permutation):
    permutation = tuple(int(p) for p in permutation)
    n = len(permutation)
    lead = permutation[:-2]
    if sorted(lead) == list(range(n - 2)):
        if permutation[-2:] == (n - 2, n - 1):
            return operand.transpose(permutation, swap=False)
        if permutation[-2:] == (n - 1, n - 2):
            return operand.transpose(permutation, swap=True)
    return _fallback(operand, lambda x: lax.transpose(x, permutation))


@quax.register(lax.convert_element_type_p)
def _(operand: AbstractAdapter, *, new_dtype, **params):
    del params
    return operand.astype_base(new_dtype)


def _fallback(value: AbstractAdapter, fn):
    """No factored rule applies: materialise (which refuses unless
    `allow_materialise=True`) and apply `fn` to the dense array."""
    return quax.quaxify(fn)(value.materialise())


# ---------------------------------------------------------------------------------------
# jax.checkpoint: re-trace the body under quax, keep the remat boundary.
# ---------------------------------------------------------------------------------------


@quax.register(remat_p)
def _(*args: ArrayLike | quax.ArrayValue, jaxpr, prevent_cse, differentiated, policy):
    del differentiated
    flat, treedef = jtu.tree_flatten(args)
    fn = jexc.jaxpr_as_fun(jexc.ClosedJaxpr(jaxpr, ()))
    out_tree: list[Any] = []

    def body(*leaves):
        out = quax.quaxify(fn)(*jtu.tree_unflatten(treedef, leaves))
        out_flat, tree = jtu.tree_flatten(out)
        out_tree.append(tree)
        return out_flat

    out_flat = jax.checkpoint(body, prevent_cse=prevent_cse, policy=policy)(*flat)
    return jtu.tree_unflatten(out_tree[-1], out_flat)


def per_matrix_keys(v) -> bool:
    """Whether a stacked adapter holds one dropout key per matrix (as
    [`lora_jax.with_dropout_keys`][] gives it), not one for the whole stack."""
    key = getattr(v, "dropout_key", None)
    if key is None or v.scaling.ndim == 0:
        return False
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim - (0 if typed else 1) == v.scaling.ndim


def per_matrix(v, other, dims: Dims, params):
    """A product with a stack of adapted matrices (leading dimensions on `w`, every
    factor and the scaling) as one product per matrix: `jax.vmap` over the stack's
    first dimension, paired with `other`'s where it is a batch dimension of the product
    and with `other` whole where it is free. Each matrix draws its own dropout: from
    its own key where the adapter holds one per matrix, else from a key split off the
    stack's. A product that sums over the stack forms the update alone (never
    `w + Δ`)."""
    if 0 in dims.adapter_contract:
        return _delta_dot(v.w, v.delta(), other, dims, params)
    n = v._w.shape[0]
    shift = lambda ds, d: tuple(x - (x > d) for x in ds)
    if 0 in dims.adapter_batch:
        j = dims.adapter_batch.index(0)
        o = dims.other_batch[j]
        inner = Dims(
            shift(dims.adapter_contract, 0),
            shift(dims.other_contract, o),
            shift(dims.adapter_batch[:j] + dims.adapter_batch[j + 1 :], 0),
            shift(dims.other_batch[:j] + dims.other_batch[j + 1 :], o),
            dims.adapter_lhs,
        )
        other_axis, out_axis = o, j
    else:
        inner = Dims(
            shift(dims.adapter_contract, 0),
            dims.other_contract,
            shift(dims.adapter_batch, 0),
            dims.other_batch,
            dims.adapter_lhs,
        )
        # The stack's dimension is the adapter's first free one: first of its free
        # dimensions in the output, after the batch ones (and `other`'s free ones when
        # the adapter is on the right).
        other_free = other.ndim - len(dims.other_contract) - len(dims.other_batch)
        other_axis = None
        out_axis = len(dims.adapter_batch) + (0 if dims.adapter_lhs else other_free)
    key = v.dropout_key
    keys = None if key is None else (key if per_matrix_keys(v) else jr.split(key, n))
    stack = eqx.tree_at(lambda x: x.dropout_key, v, None, is_leaf=lambda x: x is None)

    def one(vi, x, ki):
        if ki is not None:
            vi = eqx.tree_at(lambda x: x.dropout_key, vi, ki, is_leaf=lambda x: x is None)
        return vi.dot_general(x, inner, params)

    return jax.vmap(
        one, in_axes=(0, other_axis, 0 if keys is not None else None), out_axes=out_axis
    )(stack, other, keys)


@quax.quaxify
def _delta_dot(w, d, other, dims: Dims, params):
    """`w·x + Δ·x` with the update `Δ` formed alone (never `w + Δ`)."""
    out = plain_product(w, other, dims, params)
    dn, precision = join_dims(*dims), params.get("precision")
    x = other.astype(d.dtype)
    delta = (
        lax.dot_general(d, x, dn, precision=precision)
        if dims.adapter_lhs
        else lax.dot_general(x, d, dn, precision=precision)
    )
    return out + delta.astype(out.dtype)
