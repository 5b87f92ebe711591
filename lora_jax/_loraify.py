"""`loraify`: walk an Equinox PyTree and swap the weights it targets for adapters;
`materialise` and `unloraify` undo it."""

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PRNGKeyArray, PyTree

from ._base import is_adapter
from ._conv import LoraConvArray
from ._dora import DoraArray
from ._dora_conv import DoraConvArray
from ._embedding import LoraEmbeddingArray
from ._loha import LohaArray
from ._loha_conv import LohaConvArray
from ._lokr import LokrArray
from ._lokr_conv import LokrConvArray
from ._lora import LoraArray
from ._quant import is_quantised
from ._sharding import follow_weight
from ._targets import (
    Where,
    describe_where,
    layer_index,
    lookup_pattern,
    make_matcher,
    name_matches,
    path_name,
    pattern_key_matches,
)
from ._validate import (
    check_bool,
    check_choice,
    check_key,
    check_names,
    check_rank,
    check_scalar,
)


@dataclass(frozen=True)
class LayerKind:
    """How `loraify` adapts one kind of Equinox layer: which field holds the weight
    and how a method wraps it."""

    type: type
    field: str = "weight"
    # Whether `where=None` adapts it. Only `Linear` does, as quax's `loraify`; other
    # kinds are adapted when `where` names them.
    default: bool = True


_CONVS = (
    eqx.nn.Conv,
    eqx.nn.Conv1d,
    eqx.nn.Conv2d,
    eqx.nn.Conv3d,
    eqx.nn.ConvTranspose,
    eqx.nn.ConvTranspose1d,
    eqx.nn.ConvTranspose2d,
    eqx.nn.ConvTranspose3d,
)

# The layers loraify can adapt, by type. Later layer kinds register here.
LAYERS: dict[type, LayerKind] = {
    eqx.nn.Linear: LayerKind(eqx.nn.Linear),
    **{c: LayerKind(c, default=False) for c in _CONVS},
    eqx.nn.Embedding: LayerKind(eqx.nn.Embedding, default=False),
}


def _build_lora(weight, *, rank, alpha, key, layer, options):
    options = dict(options)
    conv_form = options.pop("conv_form", "peft")
    if isinstance(layer, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
        return LoraConvArray(
            weight, rank=rank, alpha=alpha, key=key, conv_form=conv_form, **options
        )
    if isinstance(layer, eqx.nn.Embedding):
        return LoraEmbeddingArray(weight, rank=rank, alpha=alpha, key=key, **options)
    return LoraArray(weight, rank=rank, alpha=alpha, key=key, **options)


# method -> (its type for a Linear, its type for a Conv or `None`).
_METHOD_CLASSES: dict[str, tuple[type, type | None]] = {
    "dora": (DoraArray, DoraConvArray),
    "lokr": (LokrArray, LokrConvArray),
    "loha": (LohaArray, LohaConvArray),
}


def _method_class(method: str, layer) -> type:
    linear, conv = _METHOD_CLASSES[method]
    return conv if isinstance(layer, eqx.nn.Conv) and conv is not None else linear


def _check_layer_kind(method: str, name: str, layer) -> None:
    """LoRA adapts every layer kind; a method with a conv type, Linear and Conv layers
    (`eqx.nn.ConvTranspose` is not an `eqx.nn.Conv`); any other method, Linear layers."""
    if method == "lora":
        return
    conv = _METHOD_CLASSES.get(method, (None, None))[1]
    kinds = (eqx.nn.Linear,) if conv is None else (eqx.nn.Linear, eqx.nn.Conv)
    if not isinstance(layer, kinds):
        names = " and ".join(f"eqx.nn.{k.__name__}" for k in kinds)
        raise ValueError(
            f"`method={method!r}` adapts {names} layers, but `where` selects "
            f"{name!r}, an {type(layer).__name__}; {type(layer).__name__} "
            "layers take `method='lora'`. Leave them out of `where` or adapt them in a "
            "second `loraify` call with `method='lora'`."
        )


def _option_names(method: str, layer) -> set[str] | None:
    """The keyword options a built-in method's constructor takes for `layer` (beyond
    those `loraify` passes itself), or `None` for a method registered elsewhere."""
    if method == "lora":
        if isinstance(layer, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
            cls = LoraConvArray
        elif isinstance(layer, eqx.nn.Embedding):
            cls = LoraEmbeddingArray
        else:
            cls = LoraArray
    elif method in _METHOD_CLASSES:
        cls = _method_class(method, layer)
    else:
        return None
    names = set(inspect.signature(cls.__init__).parameters)
    names -= {"self", "weight", "rank", "alpha", "key"}
    return names | ({"conv_form"} if method == "lora" else set()) | {"conv_path"}


def _check_options(method: str, name: str, layer, options: dict) -> None:
    valid = _option_names(method, layer)
    if valid is None:
        return
    for option in options:
        if option not in valid:
            raise TypeError(
                f"`{option}` is not an option of `method={method!r}` for "
                f"{type(layer).__name__} layers ({name!r} is one); its options are "
                f"{', '.join(sorted(valid))}."
            )


def _build_dora(weight, *, rank, alpha, key, layer, options):
    cls = _method_class("dora", layer)
    return cls(weight, rank=rank, alpha=alpha, key=key, **options)


def _lycoris_options(method: str, options: dict) -> dict:
    """LoKr and LoHa take PEFT's `init_weights`; LoRA's `init`, `scale` and `rslora`
    do not apply to them."""
    options = dict(options)
    options.pop("scale", None)
    if options.pop("rslora", False):
        raise ValueError(f"`rslora=True` applies to 'lora' and 'dora', not {method!r}.")
    init = options.pop("init", "quax")
    if init != "quax":
        raise ValueError(
            f"`init` applies to 'lora' and 'dora'; {method!r} takes PEFT's "
            f"`init_weights=...` instead, got init={init!r}."
        )
    return options


def _build_lokr(weight, *, rank, alpha, key, layer, options):
    cls = _method_class("lokr", layer)
    return cls(weight, rank=rank, alpha=alpha, key=key, **_lycoris_options("lokr", options))


def _build_loha(weight, *, rank, alpha, key, layer, options):
    cls = _method_class("loha", layer)
    return cls(weight, rank=rank, alpha=alpha, key=key, **_lycoris_options("loha", options))


# method name -> builder(weight, *, rank, alpha, key, layer, options) -> adapter value.
METHODS: dict[str, Callable[..., Any]] = {
    "lora": _build_lora,
    "dora": _build_dora,
    "lokr": _build_lokr,
    "loha": _build_loha,
}


def _stacking_dims(layer, weight) -> int:
    """How many leading dimensions stack the kernels of a conv (a block built with
    `eqx.filter_vmap`, for `lax.scan`): the kernel is `(out, in, *kernel)` with the
    layer's spatial dimensions. Linear adapters carry stacking dimensions themselves."""
    if isinstance(layer, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
        return weight.ndim - 2 - layer.num_spatial_dims
    return 0


def _build_stacked(build, weight, lead: int, *, key, **kwargs):
    """One adapter per kernel of a stacked conv, built by `jax.vmap` over the stack with
    a key each: every leaf, the scaling included, gets the stacking dimensions in
    front (as a stacked Linear's adapter has), so `lax.scan` slices one kernel's
    adapter at each step."""
    keys = jr.split(key, weight.shape[:lead])
    make = lambda w, k: build(w, key=k, **kwargs)
    for _ in range(lead):
        make = jax.vmap(make)
    return make(weight, keys)


def _is_candidate(x) -> bool:
    return type(x) in LAYERS


def _weight(layer):
    return getattr(layer, LAYERS[type(layer)].field)


def find_targets(
    model,
    *,
    where: Where = None,
    exclude: Where = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> list[tuple[str, Any]]:
    """The `(name, layer)` pairs [`lora_jax.loraify`][] would adapt, in PyTree order.
    Nothing is adapted: use it to check a choice of layers.

    **Arguments:**

    - `model`: an Equinox model (a PyTree).
    - `where`, `exclude`, `layers_to_transform`, `layers_pattern`: as for
        [`lora_jax.loraify`][].

    **Returns:**

    A list of `(dotted name, layer)`. Layers already adapted are included (`loraify`
    skips them, or refuses if `where` names them).

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        mlp = eqx.nn.MLP(4, 2, width_size=8, depth=2, key=jr.key(0))
        names = [name for name, _ in lora.find_targets(mlp)]
        assert names == ["layers.0", "layers.1", "layers.2"]
        names = [name for name, _ in lora.find_targets(mlp, where="all-linear")]
        assert names == ["layers.0", "layers.1"]
        ```
    """
    candidates = [
        (path_name(p), node)
        for p, node in jtu.tree_flatten_with_path(model, is_leaf=_is_candidate)[0]
        if _is_candidate(node)
    ]
    names = [n for n, _ in candidates]
    if not candidates:
        raise ValueError(
            "`model` has no layer that can be adapted (an eqx.nn.Linear, Conv, "
            f"ConvTranspose or Embedding, anywhere in it); got a {type(model).__name__}."
        )
    if layers_to_transform is not None:
        layers_to_transform = _check_indices(layers_to_transform)
    if layers_pattern is not None:
        if layers_to_transform is None:
            raise ValueError(
                "`layers_pattern` says where `layers_to_transform` reads the layer index; "
                "give `layers_to_transform` too."
            )
        if isinstance(layers_pattern, str):
            layers_pattern = [layers_pattern]
        layers_pattern = check_names(layers_pattern, "layers_pattern")
    if where is None:
        match = lambda name, node: LAYERS[type(node)].default
        patterns = None
    elif isinstance(where, str) and where == "all-linear":
        linear = [n for n, node in candidates if isinstance(node, eqx.nn.Linear)]
        head = linear[-1:] if len(linear) > 1 else []
        match = lambda name, node: isinstance(node, eqx.nn.Linear) and name not in head
        patterns = None
    else:
        match, patterns = make_matcher(where, "where")
    if patterns is not None:
        for p in patterns:
            if not any(name_matches(n, p) for n in names):
                raise ValueError(
                    f"`where` entry {p!r} matches no layer in the model. Layers that can "
                    f"be adapted: {_preview(names)}."
                )
    if exclude is not None:
        if isinstance(exclude, str) and exclude == "all-linear":
            raise ValueError("`exclude` takes module names, a regex or a callable.")
        ex_match, _ = make_matcher(exclude, "exclude")
    else:
        ex_match = lambda name, node: False
    out = []
    for name, node in candidates:
        if not match(name, node) or ex_match(name, node):
            continue
        if layers_to_transform is not None:
            if layer_index(name, layers_pattern) not in layers_to_transform:
                continue
        out.append((name, node))
    if layers_to_transform is not None and not any(
        layer_index(n, layers_pattern) in layers_to_transform for n in names
    ):
        found = sorted({i for n in names if (i := layer_index(n, layers_pattern)) is not None})
        raise ValueError(
            f"`layers_to_transform={sorted(layers_to_transform)}` matches no layer index; "
            f"the indices in the model are {found}."
        )
    if where is not None and not out:
        raise ValueError(
            f"`where={describe_where(where)}` (with `exclude` and "
            f"`layers_to_transform`) matches no layer. Layers that can be adapted: "
            f"{_preview(names)}."
        )
    return out


def _check_indices(layers_to_transform) -> set[int]:
    items = layers_to_transform
    if isinstance(items, (int, np.integer)):
        items = [items]
    if isinstance(items, str) or not isinstance(items, (list, tuple, range)):
        raise TypeError(
            "`layers_to_transform` must be a layer index or a list of them, got "
            f"{layers_to_transform!r}."
        )
    for i in items:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"`layers_to_transform` must hold integer layer indices; got {i!r}.")
    return {int(i) for i in items}


def _preview(names: list[str]) -> str:
    if not names:
        return "none (the model has no eqx.nn.Linear, Conv, ConvTranspose or Embedding)"
    shown = ", ".join(repr(n) for n in names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def loraify(
    model: PyTree,
    *,
    rank: int,
    key: PRNGKeyArray,
    scale: float = 0.01,
    allow_materialise: bool = False,
    stop_gradient: bool = True,
    alpha: float | None = None,
    rslora: bool = False,
    init: str = "quax",
    dtype=None,
    method: str = "lora",
    where: Where = None,
    exclude: Where = None,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    **method_options,
) -> PyTree:
    """Converts an [Equinox](https://github.com/patrick-kidger/equinox) model into a
    low-rank adapted version. A drop-in replacement for `quax.examples.lora.loraify`,
    with PEFT's targeting on top.

    **Arguments:**

    - `model`: the model to convert, treated as a PyTree. By default every
        `eqx.nn.Linear` (those inside `eqx.nn.MultiheadAttention` too) has its weight
        replaced by a [`lora_jax.LoraArray`][]. `eqx.nn.Conv*`/`ConvTranspose*` (whose
        kernels become [`lora_jax.LoraConvArray`][]s) and `eqx.nn.Embedding` (a
        [`lora_jax.LoraEmbeddingArray`][]) are adapted when `where` selects them.
    - `rank`: the rank of the adaptation.
    - `key`: randomness for initialising the factors (split once per adapted layer).
    - `scale`, `allow_materialise`, `stop_gradient`, `alpha`, `rslora`, `init`,
        `dtype`: as for [`lora_jax.LoraArray`][].
    - `method`: the adapter type: `"lora"` (the default, [`lora_jax.LoraArray`][]),
        `"dora"` ([`lora_jax.DoraArray`][]; a [`lora_jax.DoraConvArray`][] for
        `eqx.nn.Conv1d/2d/3d`), `"lokr"` ([`lora_jax.LokrArray`][]; a
        [`lora_jax.LokrConvArray`][] for convs) or `"loha"`
        ([`lora_jax.LohaArray`][]; a [`lora_jax.LohaConvArray`][] for convs). LoRA
        adapts every layer kind above, DoRA, LoKr and LoHa Linear and Conv layers.
        LoKr and LoHa take PEFT's options as `method_options` (`init_weights=`,
        `decompose_both=`, ...) and ignore `scale`.
    - `conv_form`: for convolutions with `method="lora"`, `"peft"` (the default) or
        `"balanced"`, as for [`lora_jax.LoraConvArray`][].
    - `conv_path`: for convolutions, every method: `"factored"` (the default) or
        `"merged"` (each step forms the kernel and runs one conv: faster on a GPU),
        as for [`lora_jax.LoraConvArray`][]. Other layers ignore it.
    - `where`: which layers to adapt, by dotted name built from the PyTree path
        (`layers.0`, `blocks.3.attn.query_proj`): a list of names (each matches
        exactly, or as a suffix at a dot), a regex string (full match), `"all-linear"`
        (every `Linear` except the last, the output head), or a callable
        `(name, layer) -> bool`. `None` (the default) adapts every `Linear`.
    - `exclude`: layers not to adapt, in the same forms as `where`.
    - `rank_pattern`, `alpha_pattern`: per-layer overrides, `{regex: value}`, a key
        matching the end of a layer's name at a dot (PEFT's rule).
    - `layers_to_transform`: only layers whose index (the integer in the name, after
        `layers_pattern` if given) is in this list.
    - `layers_pattern`: the name of the list of layers (`"layers"`, `"blocks"`).
    - `**method_options`: passed on to the method's constructor (LoKr's
        `decompose_both`, say).

    **Returns:**

    A copy of `model` with the targeted weights replaced by adapters. The input is not
    modified, and a weight that is already an adapter is never wrapped again. A weight
    sharded over a device mesh gets factors sharded to match (`a` along its `out`
    axis, `b` along its `in` axis, the rank replicated).

    Call the result through `quax.quaxify`, which dispatches every operation on the
    adapters to their rules.

    !!! Example

        ```python
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        mlp = eqx.nn.MLP(4, 2, width_size=8, depth=2, key=jr.key(0))
        mlp = lora.loraify(mlp, rank=2, key=jr.key(1))
        y = quax.quaxify(mlp)(jnp.ones(4))
        ```
    """
    rank = check_rank(rank)
    check_key(key)
    check_scalar(scale, "scale")
    if alpha is not None:
        check_scalar(alpha, "alpha", positive=True)
    check_choice(method, "method", tuple(METHODS))
    if "conv_form" in method_options:
        check_choice(method_options["conv_form"], "conv_form", ("peft", "balanced"))
    if "conv_path" in method_options:
        check_choice(method_options["conv_path"], "conv_path", ("factored", "merged"))
    for name, flag in (
        ("allow_materialise", allow_materialise),
        ("stop_gradient", stop_gradient),
        ("rslora", rslora),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {flag!r}.")
    for argname, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if patterns is not None and not isinstance(patterns, dict):
            raise TypeError(
                f"`{argname}` must be a dict {{pattern: value}}, got {type(patterns).__name__}."
            )
    for argname, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for k in patterns or {}:
            if not isinstance(k, str):
                raise TypeError(f"`{argname}` keys must be regex strings, got {k!r}.")
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(
                    f"`{argname}` key {k!r} is not a valid regular expression: {e}"
                ) from None
    for k, v in (rank_pattern or {}).items():
        check_rank(v, f"rank_pattern[{k!r}]")
    for k, v in (alpha_pattern or {}).items():
        check_scalar(v, f"alpha_pattern[{k!r}]", positive=True)

    targets = find_targets(
        model,
        where=where,
        exclude=exclude,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    fresh = []
    for name, layer in targets:
        if is_adapter(_weight(layer)):
            if where is not None:
                raise ValueError(
                    f"`where` targets {name!r}, which is already adapted; adapters are "
                    "never nested. Call `lora_jax.materialise` first to adapt again."
                )
            continue
        fresh.append((name, layer))
    for argname, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for k in patterns or {}:
            if not any(pattern_key_matches(n, k) for n, _ in fresh):
                raise ValueError(
                    f"`{argname}` key {k!r} matches no adapted layer; adapted layers: "
                    f"{_preview([n for n, _ in fresh])}."
                )

    options = dict(
        scale=scale,
        allow_materialise=allow_materialise,
        stop_gradient=stop_gradient,
        rslora=rslora,
        init=init,
        dtype=dtype,
        **method_options,
    )
    for name, layer in fresh:
        _check_layer_kind(method, name, layer)
    for name, layer in fresh:
        _check_options(method, name, layer, method_options)
    build = METHODS[method]
    replacements = {}
    for name, layer in fresh:
        # Split as quax's loraify does, so the same key gives the same factors.
        key, k = jr.split(key)
        r = lookup_pattern(name, rank_pattern, rank)
        a = lookup_pattern(name, alpha_pattern, alpha)
        kept = options
        if not isinstance(layer, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
            kept = {o: v for o, v in options.items() if o != "conv_path"}  # convs' only
        weight = _weight(layer)
        lead = _stacking_dims(layer, weight)
        if lead:
            adapter = _build_stacked(
                build, weight, lead, rank=r, alpha=a, key=k, layer=layer, options=kept
            )
        else:
            adapter = build(weight, rank=r, alpha=a, key=k, layer=layer, options=kept)
        # On a mesh, the factors are laid out as the weight is.
        adapter = follow_weight(adapter)
        field = LAYERS[type(layer)].field
        replacements[name] = eqx.tree_at(lambda l: getattr(l, field), layer, adapter)

    def swap(path, node):
        if _is_candidate(node):
            return replacements.get(path_name(path), node)
        return node

    return jtu.tree_map_with_path(swap, model, is_leaf=_is_candidate)


def materialise(model: PyTree, *, safe_merge: bool = False) -> PyTree:
    """Merges every adapter into a plain array, `w + Δ` in the base weight's dtype
    (a quantised `w` is dequantised first), and dequantises every bare quantised weight.

    **Arguments:**

    - `model`: a PyTree holding adapters (anywhere: layers, or bare values).
    - `safe_merge`: check that every merged weight is finite, as PEFT's
        `merge(safe_merge=True)` does: one jitted reduction over all the merged weights,
        and a `ValueError` naming the first adapter whose merged weight holds a NaN or
        an infinity (nothing is returned then). Needs concrete arrays: outside
        `jax.jit`.

    **Returns:**

    The model as it would have been without LoRA: the original Equinox types holding
    plain arrays. A model without adapters comes back unchanged.

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        linear = eqx.nn.Linear(4, 3, key=jr.key(0))
        adapted = lora.loraify(linear, rank=2, key=jr.key(1))
        merged = lora.materialise(adapted, safe_merge=True)
        assert type(merged.weight) is type(linear.weight)
        ```
    """
    check_bool(safe_merge, "safe_merge")
    is_leaf = lambda x: is_adapter(x) or is_quantised(x)
    flat, treedef = jtu.tree_flatten_with_path(model, is_leaf=is_leaf)
    for path, x in flat:
        if is_adapter(x):
            _check_whole(x, path_name(path), "model")

    def merge(x):
        if is_adapter(x):
            return x.merge()
        return x.dequantise() if is_quantised(x) else x

    leaves = [merge(x) for _, x in flat]
    if safe_merge:
        merged = {path_name(path): leaf for (path, x), leaf in zip(flat, leaves) if is_adapter(x)}
        _check_finite(merged)
    return jtu.tree_unflatten(treedef, leaves)


@jax.jit
def _all_finite(weights: dict) -> dict:
    return {name: jnp.all(jnp.isfinite(w)) for name, w in weights.items()}


def _check_finite(merged: dict) -> None:
    if any(isinstance(w, jax.core.Tracer) for w in merged.values()):
        raise TypeError(
            "`safe_merge=True` checks the merged values, so `materialise` must run "
            "outside `jax.jit` (on concrete arrays)."
        )
    finite = jax.device_get(_all_finite(merged))
    for name in merged:
        if not finite[name]:
            raise ValueError(
                f"The merged weight of {name!r} is not finite (it holds NaN or "
                "infinity): `materialise(..., safe_merge=True)` refuses to merge it. "
                "Check the adapter's factors and scaling."
            )


def _check_whole(x, name: str, argname: str) -> None:
    """An adapter taken apart by `lora_jax.partition` cannot be merged."""
    if x._w is None:
        raise ValueError(
            f"`{argname}` holds an adapter without its base weight at {name!r}: the "
            "trainable half of `lora_jax.partition` (or the adapters of "
            "`lora_jax.unloraify`). Recombine it first: `eqx.combine(params, frozen)`."
        )
    if all(getattr(x, f, None) is None for f in type(x).trainable_fields):
        raise ValueError(
            f"`{argname}` holds an adapter without its factors at {name!r}: the frozen "
            "half of `lora_jax.partition`. Recombine it first: "
            "`eqx.combine(params, frozen)`."
        )


def unloraify(model: PyTree) -> tuple[PyTree, PyTree]:
    """Splits an adapted model into its base and its adapters (ALF's `detach`).

    **Arguments:**

    - `model`: an adapted model.

    **Returns:**

    `(base, adapters)`: `base` is the model with every adapter replaced by its original,
    unmerged weight; `adapters` has the model's structure with `None` everywhere except
    the adapters, which keep their factors and scalings but not the base weight.

    !!! Example

        ```python
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import lora_jax as lora

        linear = eqx.nn.Linear(4, 3, key=jr.key(0))
        base, adapters = lora.unloraify(lora.loraify(linear, rank=2, key=jr.key(1)))
        assert jnp.array_equal(base.weight, linear.weight)
        assert adapters.bias is None and adapters.weight.a.shape == (3, 2)
        ```
    """
    for path, x in jtu.tree_flatten_with_path(model, is_leaf=is_adapter)[0]:
        if is_adapter(x):
            _check_whole(x, path_name(path), "model")
    base = jtu.tree_map(lambda x: x._w if is_adapter(x) else x, model, is_leaf=is_adapter)
    adapters = jtu.tree_map(
        lambda x: eqx.tree_at(lambda v: v._w, x, None) if is_adapter(x) else None,
        model,
        is_leaf=is_adapter,
    )
    return base, adapters
