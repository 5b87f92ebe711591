"""Adapters on a device mesh: factors that follow their weight's sharding, and rules
(FSDP, Megatron-style tensor parallelism) that lay out a whole adapted model.

A rule is a callable `rule(name, shape, spec, mesh) -> spec` taking the dotted name of
an array leaf (`blocks.0.mlp.up.weight`), its shape and the `PartitionSpec` entries
chosen so far (one per dimension, `None` for replicated) and returning updated entries.
Rules run in order, each filling what the ones before left replicated. Rules see base
weights, never factors: an adapter's factors follow its weight (`a`'s `out` axis is
`w`'s `out` axis, `b`'s `in` axis `w`'s `in` axis, the rank replicated).
"""

import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.core
import jax.tree_util as jtu
import quax
from jax._src.pjit import reshard_p, sharding_constraint_p
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from jaxtyping import PyTree

from ._base import AbstractAdapter, is_adapter
from ._filters import TrainBias, trainable_mask
from ._targets import name_matches, path_name


Rule = Callable[[str, tuple[int, ...], tuple, Mesh], tuple]


# ---------------------------------------------------------------------------------------
# Factors follow the weight (the post-pass `loraify` runs on every new adapter)
# ---------------------------------------------------------------------------------------


def _entries(spec, ndim: int) -> tuple:
    parts = tuple(spec)
    return parts + (None,) * (ndim - len(parts))


def _is_array(x) -> bool:
    """A concrete array or an abstract one (from `eqx.filter_eval_shape`)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _adapter_specs(adapter: AbstractAdapter, w_spec: tuple) -> AbstractAdapter:
    """The adapter with every array leaf replaced by its `PartitionSpec`: `_w` gets
    `w_spec`, the factors what `factor_specs` says, everything else replicated."""
    factors = adapter.factor_specs(w_spec)

    def leaf_spec(path, leaf):
        if not _is_array(leaf):
            return None
        field = path[0].name if isinstance(path[0], jtu.GetAttrKey) else None
        if field == "_w" and len(path) == 1:
            return PartitionSpec(*w_spec)
        return PartitionSpec(*factors.get(field, ()))

    return jtu.tree_map_with_path(leaf_spec, adapter)


def follow_weight(adapter: AbstractAdapter) -> AbstractAdapter:
    """Lays an adapter's factors out as its base weight is: on the weight's mesh, `a`
    along `w`'s `out` axis, `b` along its `in` axis, the rank replicated (for LoRA;
    each variant says how through `factor_specs`). Scalings are replicated.

    Concrete arrays are moved with `jax.device_put`; under `jax.jit` with a mesh of
    explicit axes the factors are `jax.sharding.reshard`ed. Under `jax.jit` with an
    auto mesh a weight's type carries no sharding, and the partitioner decides.
    A weight without a `NamedSharding` leaves the adapter as it is (a weight on one
    device puts the factors on that device).
    """
    w = adapter._w
    if not isinstance(w, jax.Array):
        return adapter  # a nested quax value
    if isinstance(w, jax.core.Tracer):
        sharding = jax.typeof(w).sharding
        if sharding.mesh.empty or not sharding.mesh.explicit_axes:
            return adapter
        mesh = sharding.mesh

        def put(x, spec):
            return jax.sharding.reshard(x, NamedSharding(mesh, spec))

    else:
        sharding = w.sharding
        if isinstance(sharding, SingleDeviceSharding):
            if not w.committed:
                # An unplaced weight: placing the factors would commit them and make
                # the first training step (mixing them with uncommitted optimiser
                # state) compile twice.
                return adapter
            return jtu.tree_map(
                lambda x: jax.device_put(x, sharding) if eqx.is_array(x) else x, adapter
            )
        if not isinstance(sharding, NamedSharding):
            return adapter
        mesh = sharding.mesh

        def put(x, spec):
            return jax.device_put(x, NamedSharding(mesh, spec))

    specs = _adapter_specs(adapter, _entries(sharding.spec, w.ndim))

    def place(path, x, spec):
        if spec is None or (isinstance(path[0], jtu.GetAttrKey) and path[0].name == "_w"):
            return x
        return put(x, spec)

    return jtu.tree_map_with_path(
        place, adapter, specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def _relayout(adapter: AbstractAdapter, spec: tuple, on_w, on_factor):
    """`on_w(w)` on the base weight, `on_factor(x, spec)` on every other array leaf
    with the spec it gets when the weight has the layout `spec`."""
    specs = _adapter_specs(adapter, _entries(spec, adapter._w.ndim))

    def leaf(path, x, s):
        if isinstance(path[0], jtu.GetAttrKey) and path[0].name == "_w":
            return x
        return x if s is None else on_factor(x, s)

    out = jtu.tree_map_with_path(
        leaf, adapter, specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    return eqx.tree_at(lambda v: v._w, out, on_w(adapter._w))


# `jax.sharding.reshard` and `jax.lax.with_sharding_constraint` of an adapter (an FSDP
# model gathering a weight before use, say): the weight moves as asked, the factors
# with it.


@quax.register(reshard_p)
def _(operand: AbstractAdapter, *, dst_sharding, concrete_mesh):
    def on_w(w):
        return quax.quaxify(
            lambda w: reshard_p.bind(w, dst_sharding=dst_sharding, concrete_mesh=concrete_mesh)
        )(w)

    def on_factor(x, spec):
        return jax.sharding.reshard(x, NamedSharding(dst_sharding.mesh, spec))

    return _relayout(operand, dst_sharding.spec, on_w, on_factor)


@quax.register(sharding_constraint_p)
def _(operand: AbstractAdapter, *, sharding, **params):
    def on_w(w):
        return quax.quaxify(lambda w: sharding_constraint_p.bind(w, sharding=sharding, **params))(w)

    if not isinstance(sharding, NamedSharding):
        return eqx.tree_at(lambda v: v._w, operand, on_w(operand._w))

    def on_factor(x, spec):
        return jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))

    return _relayout(operand, sharding.spec, on_w, on_factor)


# ---------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------


def _axis_size(mesh: Mesh, axis) -> int:
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    for n in names:
        if n not in mesh.shape:
            raise ValueError(
                f"A rule's `axis` {n!r} is not an axis of `mesh`, whose axes are "
                f"{tuple(mesh.axis_names)}."
            )
    return math.prod(mesh.shape[n] for n in names)


def _uses(entries: tuple, axis) -> bool:
    names = {axis} if isinstance(axis, str) else set(axis)
    for e in entries:
        if e is None or e is PartitionSpec.UNCONSTRAINED:
            continue
        if names & ({e} if isinstance(e, str) else set(e)):
            return True
    return False


def _check_axis(axis, argname: str):
    if isinstance(axis, str):
        return axis
    if isinstance(axis, Sequence) and axis and all(isinstance(a, str) for a in axis):
        return tuple(axis)
    raise TypeError(f"`{argname}` must be a mesh axis name or a tuple of names, got {axis!r}.")


def _check_names(names, argname: str) -> tuple[str, ...]:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"`{argname}` must be a list of module names, got {names!r}.")
    return tuple(names)


def fsdp(axis: str | Sequence[str] = "fsdp", *, min_size: int = 1024) -> Rule:
    """A rule for fully sharded data parallelism (ZeRO-3): every array of at least
    `min_size` elements is split along its largest matrix dimension (one of the last
    two; stacking dimensions are left whole, so a `jax.lax.scan` over layers gathers
    one layer at a time) whose size the mesh axis divides, and which no earlier rule
    sharded.

    **Arguments:**

    - `axis`: the mesh axis (or tuple of axes) to shard over: `"fsdp"`, or
        `("data", "fsdp")` to shard over every data-parallel device.
    - `min_size`: smaller arrays (biases, norms) stay replicated.

    **Returns:**

    A rule for [`lora_jax.shard_model`][].

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.random as jr
        from jax.sharding import PartitionSpec as P
        import lora_jax as lora

        mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
        linear = eqx.nn.Linear(64, 128, key=jr.key(0))
        linear = lora.loraify(linear, rank=4, key=jr.key(1))
        specs = lora.partition_specs(linear, mesh, lora.fsdp("fsdp", min_size=1024))
        assert specs.weight._w == P("fsdp", None)  # the larger dimension, `out`
        assert specs.weight.a == P("fsdp", None)   # `a` follows `w`'s `out` axis
        assert specs.bias == P(None)               # 128 < min_size: replicated
        ```
    """
    axis = _check_axis(axis, "axis")
    if isinstance(min_size, bool) or not isinstance(min_size, int):
        raise TypeError(f"`min_size` must be a non-negative integer, got {min_size!r}.")
    if min_size < 0:
        raise ValueError(f"`min_size` must be a non-negative integer, got {min_size}.")

    def rule(name, shape, spec, mesh):
        del name
        if math.prod(shape) < min_size or not shape or _uses(spec, axis):
            return spec
        size = _axis_size(mesh, axis)
        dims = range(max(len(shape) - 2, 0), len(shape))
        free = [d for d in dims if spec[d] is None and shape[d] % size == 0]
        if not free:
            return spec
        d = max(free, key=lambda d: (shape[d], -d))
        return spec[:d] + (axis,) + spec[d + 1 :]

    return rule


def tensor_parallel(
    *,
    column: Sequence[str] = (),
    row: Sequence[str] = (),
    axis: str = "tensor",
) -> Rule:
    """A rule for Megatron-style tensor parallelism of `eqx.nn.Linear` layers (weight
    `(out, in)`): a column-parallel layer splits its output features (weight along
    `out`, bias too), a row-parallel layer its input features (weight along `in`, bias
    replicated). Pair them: an up projection column-parallel feeding a row-parallel
    down projection needs one reduction per pair.

    **Arguments:**

    - `column`, `row`: module names, each matching a layer's dotted name exactly or as
        a suffix at a dot (`"mlp.up"`, `"query_proj"`), as `loraify`'s `where`.
    - `axis`: the mesh axis to split over.

    **Returns:**

    A rule for [`lora_jax.shard_model`][]. It raises a `ValueError` for a layer whose
    split dimension the axis does not divide.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.random as jr
        from jax.sharding import PartitionSpec as P
        import lora_jax as lora

        mesh = jax.make_mesh((len(jax.devices()),), ("tensor",))
        mlp = eqx.nn.MLP(8, 8, width_size=32, depth=1, key=jr.key(0))
        mlp = lora.loraify(mlp, rank=2, key=jr.key(1))
        rule = lora.tensor_parallel(column=["layers.0"], row=["layers.1"])
        specs = lora.partition_specs(mlp, mesh, rule)
        assert specs.layers[0].weight._w == P("tensor", None)
        assert specs.layers[0].bias == P("tensor")
        assert specs.layers[1].weight._w == P(None, "tensor")
        assert specs.layers[1].weight.b == P(None, "tensor")  # `b` follows `in`
        ```
    """
    column, row = _check_names(column, "column"), _check_names(row, "row")
    axis = _check_axis(axis, "axis")

    def rule(name, shape, spec, mesh):
        owner, _, leaf = name.rpartition(".")
        is_col = any(name_matches(owner, p) for p in column)
        is_row = any(name_matches(owner, p) for p in row)
        if not (is_col or is_row):
            return spec
        if is_col and is_row:
            raise ValueError(f"{owner!r} matches both `column` and `row`.")
        if leaf == "weight" and len(shape) >= 2:
            d = len(shape) - (2 if is_col else 1)
        elif leaf == "bias" and is_col and len(shape) >= 1:
            d = len(shape) - 1
        else:
            return spec
        size = _axis_size(mesh, axis)
        if shape[d] % size:
            raise ValueError(
                f"`tensor_parallel`: {name!r} has {shape[d]} "
                f"{'output' if is_col else 'input'} features, which mesh axis "
                f"{axis!r} of size {size} does not divide."
            )
        if spec[d] is not None:
            return spec
        return spec[:d] + (axis,) + spec[d + 1 :]

    return rule


# ---------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------


def _check_rules(rules) -> tuple[Rule, ...]:
    if callable(rules):
        return (rules,)
    if isinstance(rules, Sequence) and all(callable(r) for r in rules):
        return tuple(rules)
    raise TypeError(
        "`rules` must be a rule (a callable `(name, shape, spec, mesh) -> spec`, as "
        f"`lora_jax.fsdp()` or `lora_jax.tensor_parallel(...)` make) or a list of "
        f"them, got {rules!r}."
    )


def _check_mesh(mesh):
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a `jax.sharding.Mesh` (`jax.make_mesh(...)`), got "
            f"{type(mesh).__name__}."
        )


def _apply(rules, name, shape, mesh) -> tuple:
    spec = (None,) * len(shape)
    for rule in rules:
        out = rule(name, tuple(shape), spec, mesh)
        if not isinstance(out, (tuple, list)) or len(out) != len(shape):
            raise TypeError(
                f"`rules`: {rule!r} returned {out!r} for {name!r} of shape "
                f"{tuple(shape)}; a rule returns one PartitionSpec entry per dimension "
                f"({len(shape)} here)."
            )
        spec = tuple(out)
    return spec


def partition_specs(model: PyTree, mesh: Mesh, rules: Rule | Sequence[Rule]) -> PyTree:
    """The `PartitionSpec` of every array of an (adapted) model under `rules`.

    **Arguments:**

    - `model`: the model; arrays may be abstract (`jax.ShapeDtypeStruct`, from
        `eqx.filter_eval_shape`).
    - `mesh`: the device mesh the rules size their axes by.
    - `rules`: a rule or a list of rules ([`lora_jax.fsdp`][],
        [`lora_jax.tensor_parallel`][]), applied in order.

    **Returns:**

    A PyTree of the model's structure with a `PartitionSpec` at every array and `None`
    elsewhere: an adapter's factors follow its weight's spec. Usable as
    `jax.jit`'s `out_shardings` (through `NamedSharding`) or filtered with
    [`lora_jax.trainable_mask`][].

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.random as jr
        from jax.sharding import PartitionSpec as P
        import lora_jax as lora

        mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
        linear = eqx.nn.Linear(64, 128, key=jr.key(0))
        linear = lora.loraify(linear, rank=4, key=jr.key(1))
        specs = lora.partition_specs(linear, mesh, lora.fsdp("fsdp", min_size=64))
        assert specs.weight._w == P("fsdp", None)
        assert specs.weight.b == P(None, None)  # `b`'s `in` axis: `w`'s is whole
        ```
    """
    _check_mesh(mesh)
    rules = _check_rules(rules)

    def visit(path, x):
        name = path_name(path)
        if is_adapter(x):
            w = x._w
            if not _is_array(w):
                return jtu.tree_map(lambda y: PartitionSpec() if _is_array(y) else None, x)
            return _adapter_specs(x, _apply(rules, name, w.shape, mesh))
        if _is_array(x):
            return PartitionSpec(*_apply(rules, name, x.shape, mesh))
        return None

    return jtu.tree_map_with_path(visit, model, is_leaf=is_adapter)


def trainable_partition_specs(
    model: PyTree,
    mesh: Mesh,
    rules: Rule | Sequence[Rule],
    *,
    train_bias: TrainBias = "none",
    trainable: Sequence[str] | None = None,
) -> PyTree:
    """The `PartitionSpec`s of the trainable part of a model: the structure
    [`lora_jax.partition`][] gives its first half, a spec at every trainable array and
    `None` elsewhere. Optimiser state built from that part (`optax.adam(...).init`)
    has the same layout: shard it with these.

    **Arguments:**

    - `model`, `mesh`, `rules`: as for [`lora_jax.partition_specs`][].
    - `train_bias`, `trainable`: as for [`lora_jax.partition`][].

    **Returns:**

    A PyTree of the structure of `partition(model)[0]`.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.random as jr
        from jax.sharding import PartitionSpec as P
        import lora_jax as lora

        mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
        linear = eqx.nn.Linear(64, 128, key=jr.key(0))
        linear = lora.loraify(linear, rank=4, key=jr.key(1))
        specs = lora.trainable_partition_specs(linear, mesh, lora.fsdp(min_size=64))
        assert specs.weight.a == P("fsdp", None) and specs.weight._w is None
        assert specs.bias is None  # frozen
        ```
    """
    specs = partition_specs(model, mesh, rules)
    mask = trainable_mask(model, train_bias=train_bias, trainable=trainable)
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None
    return jtu.tree_map(lambda s, m: s if m else None, specs, mask, is_leaf=is_spec)


def shard_model(model: PyTree, mesh: Mesh, rules: Rule | Sequence[Rule]) -> PyTree:
    """Lays an adapted model out on a device mesh by `rules`; every adapter's factors
    follow its weight.

    **Arguments:**

    - `model`: the model (adapted or not).
    - `mesh`: a `jax.sharding.Mesh` with auto or explicit axes.
    - `rules`: a rule or a list of rules, as for [`lora_jax.partition_specs`][].

    **Returns:**

    The model with every array placed as its spec says: `jax.device_put` outside
    `jax.jit`; inside, `jax.sharding.reshard` on an explicit mesh and
    `jax.lax.with_sharding_constraint` on an auto one.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.random as jr
        import lora_jax as lora

        mesh = jax.make_mesh((len(jax.devices()),), ("fsdp",))
        mlp = eqx.nn.MLP(64, 64, width_size=64, depth=2, key=jr.key(0))
        mlp = lora.loraify(mlp, rank=4, key=jr.key(1))
        mlp = lora.shard_model(mlp, mesh, lora.fsdp("fsdp", min_size=64))
        ```
    """
    specs = partition_specs(model, mesh, rules)
    explicit = bool(mesh.explicit_axes)

    def place(x, spec):
        if spec is None or not eqx.is_array(x):
            return x
        sharding = NamedSharding(mesh, spec)
        if isinstance(x, jax.core.Tracer):
            if explicit:
                return jax.sharding.reshard(x, sharding)
            return jax.lax.with_sharding_constraint(x, sharding)
        return jax.device_put(x, sharding)

    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None
    return jtu.tree_map(lambda s, x: place(x, s), specs, model, is_leaf=is_spec)
