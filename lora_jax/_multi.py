"""Several LoRA adapters on one model: `MultiLoraArray` holds them stacked, and an
array leaf of mixing weights says which act (one-hot: one adapter; zeros: the base
model; anything else: a weighted sum). Switching never changes a shape or a static
field, so a jitted step does not recompile."""

from collections.abc import Mapping, Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import quax
from jaxtyping import Array, Float, Int, PyTree, Shaped

from ._base import AbstractAdapter, is_adapter
from ._lora import LoraArray, _lora_dot
from ._rules import Dims
from ._targets import path_name
from ._validate import check_rank, check_scalar


class MultiLoraArray(AbstractAdapter):
    """`w + Σᵢ cᵢ·sᵢ·aᵢ @ bᵢ` for `n` LoRA adapters stacked on one frozen `w`, with
    mixing weights `c` (an array leaf).

    Ranks are padded to the largest with zero columns of `aᵢ` (rows of `bᵢ`); `ranks`
    keeps the true ones. Products are computed factored, as one LoRA of rank `n·r`.
    Build it with [`lora_jax.stack_adapters`][]; switch with
    [`lora_jax.set_adapter`][].

    !!! Example

        ```python
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        base = eqx.nn.Linear(4, 3, key=jr.key(0))
        model = lora.stack_adapters({
            "en": lora.loraify(base, rank=2, key=jr.key(1)),
            "fr": lora.loraify(base, rank=4, key=jr.key(2)),
        })
        assert isinstance(model.weight, lora.MultiLoraArray)
        assert model.weight.ranks == (2, 4)
        off = lora.set_adapter(model, None)  # every adapter off: the base model
        assert jnp.allclose(quax.quaxify(off)(jnp.ones(4)), base(jnp.ones(4)))
        ```
    """

    _w: Shaped[Array, "*batch out in"]
    a: Float[Array, "n *batch out rank"]
    b: Float[Array, "n *batch rank in"]
    scaling: Float[Array, " n"]
    weights: Float[Array, " n"]
    names: tuple[str, ...] = eqx.field(static=True)
    ranks: tuple[int, ...] = eqx.field(static=True)
    stop_gradient: bool = eqx.field(static=True)
    allow_materialise: bool = eqx.field(static=True)

    trainable_fields = ("a", "b")

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def _coefficients(self):
        return lax.stop_gradient(self.weights * self.scaling)

    def _concatenated(self):
        """`(a_cat, b_cat)` of shapes `(*batch, out, n·r)` and `(*batch, n·r, in)`,
        `a_cat`'s columns scaled by their adapter's coefficient."""
        n, r = self.a.shape[0], self.a.shape[-1]
        a = jnp.moveaxis(self.a, 0, -2)  # (*batch, out, n, r)
        coef = self._coefficients().astype(a.dtype).reshape((1,) * (a.ndim - 2) + (n, 1))
        a = a * coef
        a = a.reshape(*a.shape[:-2], n * r)
        b = jnp.moveaxis(self.b, 0, -3).reshape(*self.b.shape[1:-2], n * r, self.b.shape[-1])
        return a, b

    def delta(self) -> Array:
        a, b = self._concatenated()
        batch = tuple(range(a.ndim - 2))
        return lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch)))

    def dot_general(self, other, dims: Dims, params):
        a, b = self._concatenated()
        one = jnp.ones((), jnp.float32)
        return _lora_dot(self.w, a, b, one, other, dims, params)

    def transpose(self, permutation, *, swap):
        t = lambda x: lax.transpose(x, (0, *(p + 1 for p in permutation)))
        a, b = (t(self.b), t(self.a)) if swap else (t(self.a), t(self.b))
        w = quax.quaxify(lambda x: lax.transpose(x, permutation))(self._w)
        return eqx.tree_at(lambda v: (v._w, v.a, v.b), self, (w, a, b))


def _is_multi(x) -> bool:
    return isinstance(x, MultiLoraArray)


def _pad_rank(x, rank: int, axis: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, rank - x.shape[axis])
    return jnp.pad(x, pad)


def _stack(w, parts: Sequence[tuple[str, LoraArray]], like):
    rank = max(v.rank for _, v in parts)
    a = jnp.stack([_pad_rank(v.a, rank, -1) for _, v in parts])
    b = jnp.stack([_pad_rank(v.b, rank, -2) for _, v in parts])
    n = len(parts)
    return MultiLoraArray(
        _w=w,
        a=a,
        b=b,
        scaling=jnp.stack([jnp.asarray(v.scaling, jnp.float32) for _, v in parts]),
        weights=jnp.zeros(n, jnp.float32).at[0].set(1.0),
        names=tuple(name for name, _ in parts),
        ranks=tuple(int(v.rank) for _, v in parts),
        stop_gradient=like.stop_gradient,
        allow_materialise=like.allow_materialise,
    )


def _unstack(value: MultiLoraArray) -> list[tuple[str, LoraArray]]:
    out = []
    for i, (name, r) in enumerate(zip(value.names, value.ranks)):
        out.append(
            (
                name,
                _lora(
                    value._w, value.a[i][..., :r], value.b[i][..., :r, :], value.scaling[i], value
                ),
            )
        )
    return out


def _lora(w, a, b, scaling, like) -> LoraArray:
    value = LoraArray(
        w,
        rank=a.shape[-1],
        key=jr.key(0),
        dtype=a.dtype,
        stop_gradient=like.stop_gradient,
        allow_materialise=like.allow_materialise,
    )
    return eqx.tree_at(
        lambda v: (v.a, v.b, v.scaling), value, (a, b, jnp.asarray(scaling, jnp.float32))
    )


def _adapter_paths(model) -> dict[str, AbstractAdapter]:
    return {
        path_name(p): leaf
        for p, leaf in jtu.tree_flatten_with_path(model, is_leaf=is_adapter)[0]
        if is_adapter(leaf)
    }


def stack_adapters(models: Mapping[str, PyTree]) -> PyTree:
    """Puts several adapted copies of one base model together, as one model whose
    adapters are [`lora_jax.MultiLoraArray`][]s.

    **Arguments:**

    - `models`: `{name: model}`, each adapted by [`lora_jax.loraify`][] at the same
        places (ranks and scalings may differ). The base weights are taken from the
        first.

    **Returns:**

    The model, with the first adapter active.

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        base = eqx.nn.Linear(4, 3, key=jr.key(0))
        model = lora.stack_adapters({
            "en": lora.loraify(base, rank=2, key=jr.key(1)),
            "fr": lora.loraify(base, rank=4, key=jr.key(2)),
        })
        model = lora.set_adapter(model, "fr")
        ```
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError("`models` must be a non-empty dict {name: adapted model}.")
    names = list(models)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"`models` keys must be adapter names (str), got {name!r}.")
    first = models[names[0]]
    paths = _adapter_paths(first)
    if not paths:
        raise ValueError(
            f"`models[{names[0]!r}]` has no adapters; adapt it with `lora_jax.loraify`."
        )
    per_model = {}
    for name in names:
        found = _adapter_paths(models[name])
        if sorted(found) != sorted(paths):
            raise ValueError(
                f"`models[{name!r}]` is adapted at {sorted(found)}, but "
                f"`models[{names[0]!r}]` at {sorted(paths)}; all must be adapted at the same "
                "places."
            )
        for p, v in found.items():
            if type(v) is not LoraArray:
                raise TypeError(
                    f"`models[{name!r}]` has a {type(v).__name__} at {p!r}; only LoraArray "
                    "adapters stack."
                )
            if v._w.shape != paths[p]._w.shape:
                raise ValueError(
                    f"`models[{name!r}]`'s weight at {p!r} has shape {v._w.shape}, not "
                    f"{paths[p]._w.shape}."
                )
        per_model[name] = found

    def swap(path, leaf):
        if not is_adapter(leaf):
            return leaf
        p = path_name(path)
        return _stack(leaf._w, [(n, per_model[n][p]) for n in names], leaf)

    return jtu.tree_map_with_path(swap, first, is_leaf=is_adapter)


def _multis(model) -> list[MultiLoraArray]:
    found = [x for x in jtu.tree_leaves(model, is_leaf=_is_multi) if _is_multi(x)]
    if not found:
        raise ValueError("`model` has no MultiLoraArray; build one with `lora_jax.stack_adapters`.")
    return found


def adapter_names(model: PyTree) -> tuple[str, ...]:
    """The names of the adapters stacked in `model`, in order.

    **Arguments:**

    - `model`: a model from [`lora_jax.stack_adapters`][].

    **Returns:**

    A tuple of names.

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        base = eqx.nn.Linear(4, 3, key=jr.key(0))
        model = lora.stack_adapters({
            "en": lora.loraify(base, rank=2, key=jr.key(1)),
            "fr": lora.loraify(base, rank=2, key=jr.key(2)),
        })
        assert lora.adapter_names(model) == ("en", "fr")
        ```
    """
    return _multis(model)[0].names


def _index(names, name, argname) -> int:
    if name not in names:
        raise ValueError(
            f"`{argname}` {name!r} is not an adapter of `model`; adapters: {list(names)}."
        )
    return names.index(name)


def set_adapter(
    model: PyTree,
    which: str | int | Int[Array, ""] | Mapping[str, float] | None,
) -> PyTree:
    """Chooses which stacked adapters act, by setting the mixing weights (an array
    leaf: no recompile, since no shape or static field changes).

    **Arguments:**

    - `model`: a model from [`lora_jax.stack_adapters`][].
    - `which`: an adapter's name; its index, as an int or an integer array (traced
        too: `jax.vmap` over per-example indices selects an adapter per example);
        `None` to disable every adapter (the base model's output); or
        `{name: weight}`, the weighted sum `Σ weightᵢ·Δᵢ` of the named adapters
        (PEFT's linear combination, exact).

    **Returns:**

    The model with new mixing weights.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        base = eqx.nn.Linear(4, 3, key=jr.key(0))
        adapted = {
            name: lora.loraify(base, rank=2, key=jr.key(i), init="gaussian")
            for i, name in enumerate(["en", "fr"])
        }
        model = lora.stack_adapters(adapted)
        x = jnp.ones(4)
        fr = quax.quaxify(lora.set_adapter(model, "fr"))(x)
        half = quax.quaxify(lora.set_adapter(model, {"en": 0.5, "fr": 0.5}))(x)

        # One adapter per example, chosen by a traced index:
        def run(i, x):
            return quax.quaxify(lora.set_adapter(model, i))(x)

        ys = jax.vmap(run)(jnp.array([0, 1]), jnp.ones((2, 4)))
        assert jnp.allclose(ys[1], fr, atol=1e-6)
        ```
    """
    names = adapter_names(model)
    n = len(names)
    if which is None:
        weights = jnp.zeros(n, jnp.float32)
    elif isinstance(which, str):
        weights = jnp.zeros(n, jnp.float32).at[_index(names, which, "which")].set(1.0)
    elif isinstance(which, Mapping):
        weights = jnp.zeros(n, jnp.float32)
        for name, w in which.items():
            i = _index(names, name, "which")
            w = check_scalar(w, f"which[{name!r}]")
            weights = weights.at[i].set(jnp.asarray(w, jnp.float32))
    elif isinstance(which, (int, np.integer, jax.Array, np.ndarray)) and not isinstance(
        which, bool
    ):
        idx = jnp.asarray(which)
        if idx.shape != () or not jnp.issubdtype(idx.dtype, jnp.integer):
            raise TypeError(
                f"`which` as an index must be an integer scalar, got {idx.dtype}{list(idx.shape)}."
            )
        if not isinstance(which, jax.core.Tracer) and not 0 <= int(which) < n:
            raise ValueError(f"`which` index {int(which)} is out of range for {n} adapters.")
        weights = jax.nn.one_hot(idx, n, dtype=jnp.float32)
    else:
        raise TypeError(
            "`which` must be an adapter name, an index, None (disable) or a dict "
            f"{{name: weight}}; got {type(which).__name__}."
        )
    return jtu.tree_map(
        lambda x: eqx.tree_at(lambda v: v.weights, x, weights) if _is_multi(x) else x,
        model,
        is_leaf=_is_multi,
    )


def add_adapter(model: PyTree, name: str, adapted: PyTree) -> PyTree:
    """Adds the adapters of `adapted` (adapted at the same places as `model`'s stack)
    under `name`. The active selection is kept (the new adapter is off).

    **Arguments:**

    - `model`: a model from [`lora_jax.stack_adapters`][].
    - `name`: the new adapter's name (not already in the stack).
    - `adapted`: the same base model adapted by [`lora_jax.loraify`][] at the same
        places; its rank may differ.

    **Returns:**

    The model with one more adapter stacked.

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        base = eqx.nn.Linear(4, 3, key=jr.key(0))
        model = lora.stack_adapters({"en": lora.loraify(base, rank=2, key=jr.key(1))})
        model = lora.add_adapter(model, "de", lora.loraify(base, rank=4, key=jr.key(2)))
        assert lora.adapter_names(model) == ("en", "de")
        ```
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, got {name!r}.")
    names = adapter_names(model)
    if name in names:
        raise ValueError(f"`name` {name!r} is already an adapter of `model`.")
    new = _adapter_paths(adapted)
    have = _adapter_paths(model)
    if sorted(new) != sorted(have):
        raise ValueError(f"`adapted` is adapted at {sorted(new)}, but `model` at {sorted(have)}.")

    def swap(path, leaf):
        if not _is_multi(leaf):
            return leaf
        v = new[path_name(path)]
        if type(v) is not LoraArray or v._w.shape != leaf._w.shape:
            raise ValueError(
                f"`adapted` at {path_name(path)!r} is not a LoraArray of weight shape "
                f"{leaf._w.shape}."
            )
        out = _stack(leaf._w, [*_unstack(leaf), (name, v)], leaf)
        return eqx.tree_at(
            lambda x: x.weights, out, jnp.concatenate([leaf.weights, jnp.zeros(1, jnp.float32)])
        )

    return jtu.tree_map_with_path(swap, model, is_leaf=_is_multi)


def delete_adapter(model: PyTree, name: str) -> PyTree:
    """Removes the adapter `name` from the stack (at least one must remain).

    **Arguments:**

    - `model`: a model from [`lora_jax.stack_adapters`][].
    - `name`: the adapter to remove.

    **Returns:**

    The model without it; the other adapters keep their mixing weights.

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        base = eqx.nn.Linear(4, 3, key=jr.key(0))
        model = lora.stack_adapters({
            "en": lora.loraify(base, rank=2, key=jr.key(1)),
            "fr": lora.loraify(base, rank=2, key=jr.key(2)),
        })
        model = lora.delete_adapter(model, "fr")
        assert lora.adapter_names(model) == ("en",)
        ```
    """
    names = adapter_names(model)
    i = _index(names, name, "name")
    if len(names) == 1:
        raise ValueError(
            f"`name` {name!r} is the only adapter; use `lora_jax.materialise` or keep it."
        )

    def swap(leaf):
        if not _is_multi(leaf):
            return leaf
        parts = [p for p in _unstack(leaf) if p[0] != name]
        out = _stack(leaf._w, parts, leaf)
        return eqx.tree_at(lambda x: x.weights, out, jnp.delete(leaf.weights, i))

    return jtu.tree_map(swap, model, is_leaf=_is_multi)


def combine_adapters(
    model: PyTree,
    weights: Mapping[str, float],
    *,
    how: Literal["cat", "svd"] = "cat",
    rank: int | None = None,
) -> PyTree:
    """Bakes a weighted sum of the stacked adapters into one LoRA per layer.

    **Arguments:**

    - `model`: a model from [`lora_jax.stack_adapters`][].
    - `weights`: `{name: weight}`; the combined update is `Σ weightᵢ·sᵢ·aᵢ @ bᵢ`.
    - `how`: `"cat"` (exact: the factors side by side, rank the sum of the ranks) or
        `"svd"` (PEFT's `combination_type="svd"`: the best rank-`rank` approximation
        of the sum, from its SVD).
    - `rank`: for `"svd"`, the new rank (defaults to the largest of the combined).

    **Returns:**

    The model with a [`lora_jax.LoraArray`][] (scaling 1) at each stacked place.

    !!! Example

        ```python
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        base = eqx.nn.Linear(4, 3, key=jr.key(0))
        model = lora.stack_adapters({
            name: lora.loraify(base, rank=2, key=jr.key(i), init="gaussian")
            for i, name in enumerate(["en", "fr"])
        })
        mix = {"en": 0.3, "fr": 0.7}
        merged = lora.combine_adapters(model, mix)  # exact: rank 2 + 2
        assert merged.weight.rank == 4
        x = jnp.ones(4)
        expected = quax.quaxify(lora.set_adapter(model, mix))(x)
        assert jnp.allclose(quax.quaxify(merged)(x), expected, atol=1e-5)
        ```
    """
    names = adapter_names(model)
    if not isinstance(weights, Mapping) or not weights:
        raise TypeError("`weights` must be a non-empty dict {name: weight}.")
    for name, w in weights.items():
        _index(names, name, "weights")
        check_scalar(w, f"weights[{name!r}]")
    if how not in ("cat", "svd"):
        raise ValueError(f"`how` must be 'cat' or 'svd', got {how!r}.")
    if rank is not None:
        check_rank(rank)
        if how != "svd":
            raise ValueError("`rank` applies to `how='svd'`; `how='cat'` keeps every rank.")

    def combine(leaf):
        if not _is_multi(leaf):
            return leaf
        parts = dict(_unstack(leaf))
        chosen = [(parts[n], float(w)) for n, w in weights.items()]
        if how == "cat":
            a = jnp.concatenate(
                [v.a * (w * v.scaling).astype(v.a.dtype) for v, w in chosen], axis=-1
            )
            b = jnp.concatenate([v.b for v, _ in chosen], axis=-2)
        else:
            k = rank or max(v.rank for v, _ in chosen)
            delta = sum(w * v.delta().astype(jnp.float32) for v, w in chosen)
            u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
            k = min(k, s.shape[-1])
            dtype = chosen[0][0].a.dtype
            a = (u[..., :k] * s[..., None, :k]).astype(dtype)
            b = vt[..., :k, :].astype(dtype)
        return _lora(leaf._w, a, b, 1.0, leaf)

    return jtu.tree_map(combine, model, is_leaf=_is_multi)


def has_stacked_adapters(model: PyTree) -> bool:
    return any(_is_multi(x) for x in jtu.tree_leaves(model, is_leaf=_is_multi))


def select_adapter(model: PyTree, name: str) -> PyTree:
    """The model with every [`lora_jax.MultiLoraArray`][] replaced by the
    [`lora_jax.LoraArray`][] of the adapter `name` (its true rank, its scaling; the
    mixing weights are dropped). Used to save one adapter of a stack."""
    if not isinstance(name, str):
        raise TypeError(f"`adapter` must be an adapter's name (str), got {name!r}.")
    if not has_stacked_adapters(model):
        raise ValueError(
            f"`adapter={name!r}` selects one of several stacked adapters, but `model` "
            "has none (build them with `lora_jax.stack_adapters`); leave `adapter` out."
        )
    _index(adapter_names(model), name, "adapter")
    return jtu.tree_map(
        lambda x: dict(_unstack(x))[name] if _is_multi(x) else x, model, is_leaf=_is_multi
    )


def put_adapter(model: PyTree, name: str, adapted: PyTree) -> PyTree:
    """Puts the LoRA adapters of `adapted` (adapted at exactly the stacked places of
    `model`) into the stack under `name`: replacing the adapter of that name where it
    is (the mixing weights are kept), or adding it (off) if it is new."""
    names = adapter_names(model)
    if name not in names:
        return add_adapter(model, name, adapted)
    new = _adapter_paths(adapted)
    have = {p for p, v in _adapter_paths(model).items() if _is_multi(v)}
    if set(new) != have:
        raise ValueError(
            f"`adapted` is adapted at {sorted(new)}, but `model`'s stack is at {sorted(have)}."
        )

    def swap(path, leaf):
        if not _is_multi(leaf):
            return leaf
        v = new[path_name(path)]
        if type(v) is not LoraArray or v._w.shape != leaf._w.shape:
            raise ValueError(
                f"`adapted` at {path_name(path)!r} is not a LoraArray of weight shape "
                f"{leaf._w.shape}."
            )
        parts = [(n, v if n == name else p) for n, p in _unstack(leaf)]
        out = _stack(leaf._w, parts, leaf)
        return eqx.tree_at(lambda x: x.weights, out, leaf.weights)

    return jtu.tree_map_with_path(swap, model, is_leaf=_is_multi)
