"""Parameter counts: a Keras-style table and PEFT's one line."""

from collections.abc import Sequence
from dataclasses import dataclass

import equinox as eqx
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._base import is_adapter
from ._filters import TrainBias, trainable_mask
from ._quant import is_quantised
from ._targets import path_name


@dataclass(frozen=True)
class Summary:
    """Parameter counts of a model, as [`lora_jax.summary`][] returns them.
    `str(summary)` is a table, one row per module that holds parameters;
    `summary.peft_line` is PEFT's `print_trainable_parameters`.

    **Fields:**

    - `rows`: `(module, kind, params, trainable)` for each module holding parameters.
    - `total`: every parameter (a quantised weight counts as the weight it stands for).
    - `trainable`: the parameters that train.

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        linear = lora.loraify(eqx.nn.Linear(8, 4, key=jr.key(0)), rank=2, key=jr.key(1))
        s = lora.summary(linear)
        assert (s.total, s.trainable) == (8 * 4 + 4 + 2 * (8 + 4), 2 * (8 + 4))
        assert s.non_trainable == 36
        print(f"{s.trainable_percent:.2f}%")
        ```
    """

    rows: tuple[tuple[str, str, int, int], ...]  # (module, kind, params, trainable)
    total: int
    trainable: int

    @property
    def non_trainable(self) -> int:
        """`total - trainable`."""
        return self.total - self.trainable

    @property
    def trainable_percent(self) -> float:
        """`100 · trainable / total` (0 for an empty model)."""
        return 100 * self.trainable / self.total if self.total else 0.0

    @property
    def peft_line(self) -> str:
        """PEFT's line: `trainable params: … || all params: … || trainable%: …`."""
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )

    def __str__(self) -> str:
        head = ("Module", "Type", "Params", "Trainable")
        body = [(m or "(root)", k, f"{p:,}", f"{t:,}") for m, k, p, t in self.rows]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]

        def line(r):
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )

        rule = "=" * len(line(head))
        return "\n".join(
            [
                line(head),
                rule,
                *map(line, body),
                rule,
                f"Total params: {self.total:,}",
                f"Trainable params: {self.trainable:,}",
                f"Non-trainable params: {self.non_trainable:,}",
                "_" * len(rule),
            ]
        )


def summary(
    model: PyTree,
    *,
    train_bias: TrainBias = "none",
    trainable: Sequence[str] | None = None,
) -> Summary:
    """Counts total, trainable and non-trainable parameters.

    **Arguments:**

    - `model`: an adapted (or plain) model.
    - `train_bias`, `trainable`: what trains besides the adapters, as for
        [`lora_jax.partition`][].

    **Returns:**

    A [`lora_jax.Summary`][]: print it for the table; `.peft_line` for PEFT's line.
    An adapter's base weight counts as non-trainable; its scaling is a hyperparameter
    and not counted. A quantised weight counts as the number of elements of the
    weight it stands for (not its codes and constants).

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        mlp = eqx.nn.MLP(8, 2, width_size=16, depth=2, key=jr.key(0))
        s = lora.summary(lora.loraify(mlp, rank=2, key=jr.key(1)))
        print(s)
        print(s.peft_line)
        ```
    """
    mask = trainable_mask(model, train_bias=train_bias, trainable=trainable)
    is_leaf = lambda x: is_adapter(x) or is_quantised(x)
    model_flat = jtu.tree_flatten_with_path(model, is_leaf=is_leaf)[0]
    mask_flat = jtu.tree_leaves(mask, is_leaf=is_leaf)
    rows: dict[str, list] = {}
    for (path, leaf), m in zip(model_flat, mask_flat):
        if is_adapter(leaf):
            owner = path_name(path[:-1])
            kind = f"{type(leaf).__name__}"
            counted = set(type(leaf).trainable_fields) | set(type(leaf).frozen_fields)
            # A quantised base weight counts as the weight it stands for.
            for p, x in jtu.tree_flatten_with_path(leaf, is_leaf=is_quantised)[0]:
                field = p[0].name if isinstance(p[0], jtu.GetAttrKey) else None
                if field in counted and (eqx.is_array(x) or is_quantised(x)):
                    row = rows.setdefault(owner, [kind, 0, 0])
                    row[0] = kind
                    row[1] += int(np.prod(x.shape))
                    if field in type(leaf).trainable_fields:
                        row[2] += int(np.prod(x.shape))
            continue
        if not (eqx.is_array(leaf) or is_quantised(leaf)):
            continue
        owner = path_name(path[:-1])
        row = rows.setdefault(owner, ["", 0, 0])
        row[1] += int(np.prod(leaf.shape))
        if m and not is_quantised(leaf):  # a quantised weight never trains
            row[2] += int(np.prod(leaf.shape))
    owners = _owner_types(model)
    table = tuple(
        (name, _kind(owners.get(name, ""), kind), p, t) for name, (kind, p, t) in rows.items()
    )
    total = sum(r[2] for r in table)
    train = sum(r[3] for r in table)
    return Summary(table, total, train)


def _owner_types(model) -> dict[str, str]:
    """Dotted name -> class name, for every Equinox module in the model."""
    out = {}

    def walk(path, node):
        if is_adapter(node) or not isinstance(node, (eqx.Module, list, tuple, dict)):
            return
        if isinstance(node, eqx.Module):
            out[path_name(path)] = type(node).__name__
        children = jtu.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]
        for p, child in children:
            walk(path + p, child)

    walk((), model)
    return out


def _kind(owner: str, adapter: str) -> str:
    if owner and adapter:
        return f"{owner}[{adapter}]"
    return owner or adapter


def print_trainable_parameters(model: PyTree, **kwargs) -> None:
    """Prints PEFT's one line: `trainable params: … || all params: … || trainable%: …`.

    **Arguments:**

    - `model`: an adapted (or plain) model.
    - `**kwargs`: `train_bias`, `trainable`, as for [`lora_jax.summary`][].

    !!! Example

        ```python
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        mlp = eqx.nn.MLP(64, 10, width_size=128, depth=2, key=jr.key(0))
        lora.print_trainable_parameters(lora.loraify(mlp, rank=4, key=jr.key(1)))
        # trainable params: 2,344 || all params: 28,466 || trainable%: 8.2344
        ```
    """
    print(summary(model, **kwargs).peft_line)
