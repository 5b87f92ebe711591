"""What trains: masks over an adapted model, and the (trainable, frozen) split."""

from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._base import is_adapter
from ._quant import is_quantised
from ._targets import name_matches, path_name
from ._validate import check_choice


TrainBias = Literal["none", "lora_only", "all"]


def _adapter_mask(adapter) -> PyTree:
    fields = set(type(adapter).trainable_fields)

    def field_mask(path, leaf):
        return (
            eqx.is_inexact_array(leaf)
            and isinstance(path[0], jtu.GetAttrKey)
            and path[0].name in fields
        )

    return jtu.tree_map_with_path(field_mask, adapter)


def trainable_mask(
    model: PyTree,
    *,
    train_bias: TrainBias = "none",
    trainable: Sequence[str] | None = None,
) -> PyTree:
    """A PyTree of bools, the structure of `model`: `True` exactly at the leaves that
    train. Plugs into `eqx.partition`, `eqx.filter` and `optax.masked`.

    **Arguments:**

    - `model`: an adapted model.
    - `train_bias`: `"none"` (the default), `"lora_only"` (the biases of adapted layers)
        or `"all"` (every leaf named `bias`), as tfimm's `lora_train_bias`.
    - `trainable`: names of modules that train in full (PEFT's `modules_to_save`,
        tfimm's `trainable_layers`): each matches a module's dotted name exactly or as a
        suffix at a dot, and must match something.

    **Returns:**

    The mask. The adapters' factors are `True`; base weights (quantised ones too),
    scalings and every other leaf `False`.

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import optax
        import lora_jax as lora

        mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jr.key(0))
        model = lora.loraify(mlp, rank=2, key=jr.key(1), where=["layers.0"])
        mask = lora.trainable_mask(
            model, train_bias="lora_only", trainable=["layers.1"]
        )
        assert mask.layers[0].weight.a and not mask.layers[0].weight.scaling
        assert mask.layers[0].bias and mask.layers[1].weight
        # Or keep one optimiser over the whole model, updating only what trains:
        optim = optax.masked(optax.adam(1e-3), mask)
        ```
    """
    check_choice(train_bias, "train_bias", ("none", "lora_only", "all"))
    if trainable is not None:
        if (
            isinstance(trainable, str)
            or not isinstance(trainable, (list, tuple))
            or not all(isinstance(t, str) for t in trainable)
        ):
            raise TypeError(f"`trainable` must be a list of module names, got {trainable!r}.")
        trainable = list(trainable)
    is_leaf = lambda x: is_adapter(x) or is_quantised(x)
    flat, treedef = jtu.tree_flatten_with_path(model, is_leaf=is_leaf)
    adapted_owners = {path_name(p[:-1]) for p, leaf in flat if is_adapter(leaf) and len(p) > 0}
    hits = {t: False for t in trainable or ()}
    out = []
    for path, leaf in flat:
        name = path_name(path)
        if is_adapter(leaf):
            # An adapter inside a fully trained module still trains only its factors.
            for t in hits:
                if any(name_matches(p, t) for p in _prefixes(path)):
                    hits[t] = True
            out.append(_adapter_mask(leaf))
            continue
        if is_quantised(leaf):
            # A quantised base weight is frozen, whatever `trainable` names.
            out.append(jtu.tree_map(lambda _: False, leaf))
            continue
        train = False
        if eqx.is_inexact_array(leaf):
            if name.split(".")[-1] == "bias":
                owner = path_name(path[:-1])
                train = train_bias == "all" or (
                    train_bias == "lora_only" and owner in adapted_owners
                )
            for t in hits:
                if any(name_matches(p, t) for p in _prefixes(path)):
                    hits[t] = True
                    train = True
        out.append(train)
    missing = [t for t, hit in hits.items() if not hit]
    if missing:
        raise ValueError(f"`trainable` entries {missing} match no module in the model.")
    return jtu.tree_unflatten(treedef, out)


def _prefixes(path) -> list[str]:
    return [path_name(path[:i]) for i in range(1, len(path))]


def partition(
    model: PyTree,
    *,
    train_bias: TrainBias = "none",
    trainable: Sequence[str] | None = None,
) -> tuple[PyTree, PyTree]:
    """Splits an adapted model into `(trainable, frozen)` for `eqx.combine`.

    **Arguments:**

    - `model`, `train_bias`, `trainable`: as for [`lora_jax.trainable_mask`][].

    **Returns:**

    `(trainable, frozen)`, each the structure of `model` with `None` where the other
    holds a leaf: `eqx.partition(model, trainable_mask(model, ...))`. Give only
    `trainable` to the optimiser, so that optimiser state exists only for what trains.

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import optax
        import lora_jax as lora

        model = lora.loraify(eqx.nn.Linear(4, 3, key=jr.key(0)), rank=2, key=jr.key(1))
        params, frozen = lora.partition(model)
        opt_state = optax.adam(1e-3).init(params)
        model = eqx.combine(params, frozen)
        ```
    """
    mask = trainable_mask(model, train_bias=train_bias, trainable=trainable)
    return eqx.partition(model, mask)
