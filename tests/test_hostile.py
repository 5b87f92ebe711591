"""Hostile input: every public function of lora_jax (the adapter-file functions have
their own tests) given wrong types, shapes, dtypes, ranks, missing keys, bad `where`
patterns, unknown method options and halves of a partitioned model. Each must raise a
ValueError or TypeError whose message names what is wrong (the argument in backticks),
before doing any work.

One table of cases; `test_every_public_name_is_covered` fails when a public name is
added to `lora_jax/__init__.py` without a row here (or a reason it needs none).
"""

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import lora_jax as lora


@dataclass(frozen=True)
class Case:
    id: str
    function: str  # the public name the case exercises
    call: Callable[[Any], Any]  # ctx -> result (should raise)
    error: type
    match: str  # a substring of the message, usually the argument in backticks


class Ctx:
    """Small models shared by the cases (built once)."""

    def __init__(self):
        k = jr.key(0)
        self.key = k
        self.w = jnp.ones((3, 4))
        self.mlp = eqx.nn.MLP(4, 2, width_size=8, depth=2, key=k)
        self.adapted = lora.loraify(self.mlp, rank=2, key=jr.key(1))
        self.params, self.frozen = lora.partition(self.adapted)
        self.stacked = lora.stack_adapters(
            {"a": self.adapted, "b": lora.loraify(self.mlp, rank=3, key=jr.key(2))}
        )
        self.single = lora.stack_adapters({"a": self.adapted})
        # 8 simulated CPU devices (conftest.py), also where the default backend is one
        # GPU: these cases only read the mesh's shape.
        cpu = jax.devices("cpu")
        self.mesh = jax.make_mesh((len(cpu),), ("fsdp",), devices=cpu)
        self.conv = [eqx.nn.Conv2d(2, 2, 3, key=k)]


@pytest.fixture(scope="module")
def ctx():
    return Ctx()


# ---------------------------------------------------------------------------------------
# Adapter constructors: one set of checks for every method.
# ---------------------------------------------------------------------------------------

# name -> (class, a valid weight, a weight of the wrong rank)
CONSTRUCTORS = {
    "LoraArray": (lora.LoraArray, (3, 4), (4,)),
    "DoraArray": (lora.DoraArray, (3, 4), (4,)),
    "LokrArray": (lora.LokrArray, (4, 6), (4,)),
    "LohaArray": (lora.LohaArray, (3, 4), (4,)),
    "LoraConvArray": (lora.LoraConvArray, (2, 3, 3), (2, 3)),
    "DoraConvArray": (lora.DoraConvArray, (2, 3, 3), (2, 3)),
    "LohaConvArray": (lora.LohaConvArray, (2, 3, 3), (2, 3)),
    "LokrConvArray": (lora.LokrConvArray, (4, 6, 3), (4, 6)),
    "LoraEmbeddingArray": (lora.LoraEmbeddingArray, (5, 4), (2, 5, 4)),
}


def _make(name, weight=None, **kwargs):
    cls, shape, _ = CONSTRUCTORS[name]
    weight = jnp.ones(shape) if weight is None else weight
    kwargs = dict(rank=2, key=jr.key(0)) | kwargs
    return lambda ctx: cls(weight, **kwargs)


def _constructor_cases(name):
    cls, shape, bad_rank = CONSTRUCTORS[name]
    empty = (0,) + shape[1:]
    cases = [
        ("weight-list", dict(weight=np.ones(shape).tolist()), TypeError, "`weight`"),
        ("weight-int", dict(weight=jnp.ones(shape, jnp.int32)), TypeError, "`weight`"),
        ("weight-rank", dict(weight=jnp.ones(bad_rank)), ValueError, "`weight`"),
        ("weight-empty", dict(weight=jnp.ones(empty)), ValueError, "`weight`"),
        ("rank-zero", dict(rank=0), ValueError, "`rank`"),
        ("rank-float", dict(rank=2.5), TypeError, "`rank`"),
        ("rank-str", dict(rank="2"), TypeError, "`rank`"),
        ("key-none", dict(key=None), TypeError, "`key`"),
        ("key-int", dict(key=1), TypeError, "`key`"),
        ("key-numpy", dict(key=np.zeros(2, np.uint32)), TypeError, "`key`"),
        ("alpha-negative", dict(alpha=-1.0), ValueError, "`alpha`"),
        ("alpha-nan", dict(alpha=math.nan), ValueError, "`alpha`"),
        ("alpha-str", dict(alpha="4"), TypeError, "`alpha`"),
        ("dtype-int", dict(dtype=jnp.int32), TypeError, "`dtype`"),
        ("dtype-junk", dict(dtype="nonsense"), TypeError, "`dtype`"),
        ("stop_gradient-str", dict(stop_gradient="yes"), TypeError, "`stop_gradient`"),
        (
            "allow_materialise-int",
            dict(allow_materialise=1),
            TypeError,
            "`allow_materialise`",
        ),
        ("unknown-option", dict(foo=1), TypeError, "'foo'"),
    ]
    if name not in ("LokrArray", "LohaArray", "LohaConvArray", "LokrConvArray"):
        cases += [
            ("init-unknown", dict(init="xavier"), ValueError, "`init`"),
            ("scale-str", dict(scale="big"), TypeError, "`scale`"),
            ("scale-inf", dict(scale=math.inf), ValueError, "`scale`"),
            ("rslora-str", dict(rslora="y", alpha=2.0), TypeError, "`rslora`"),
            ("rslora-no-alpha", dict(rslora=True), ValueError, "`rslora=True`"),
        ]
    if name in ("LoraArray", "DoraArray"):
        cases += [
            ("dropout-one", dict(dropout=1.0), ValueError, "`dropout`"),
            ("dropout-nan", dict(dropout=math.nan), ValueError, "`dropout`"),
        ]
    if name in ("LokrArray", "LohaArray", "LohaConvArray", "LokrConvArray"):
        cases += [
            ("rank_dropout", dict(rank_dropout=1.5), ValueError, "`rank_dropout`"),
            (
                "module_dropout",
                dict(module_dropout=-0.1),
                ValueError,
                "`module_dropout`",
            ),
            (
                "init_weights",
                dict(init_weights="gaussian"),
                (TypeError, ValueError),
                "`init_weights`",
            ),
            (
                "use_effective_conv2d",
                dict(use_effective_conv2d=1),
                TypeError,
                "`use_effective_conv2d`",
            ),
        ]
    if name in ("LokrArray", "LokrConvArray"):
        cases += [
            (
                "decompose_factor-zero",
                dict(decompose_factor=0),
                ValueError,
                "`decompose_factor`",
            ),
            (
                "decompose_both-str",
                dict(decompose_both="y"),
                TypeError,
                "`decompose_both`",
            ),
        ]
    if name == "LoraConvArray":
        cases += [("conv_form", dict(conv_form="dense"), ValueError, "`conv_form`")]
    if name.endswith("ConvArray"):
        cases += [("conv_path", dict(conv_path="fused"), ValueError, "`conv_path`")]
    out = [Case(f"{name}-{id}", name, _make(name, **kw), e, m) for id, kw, e, m in cases]
    none = lambda ctx: cls(None, rank=2, key=jr.key(0))  # noqa: E731
    return out + [Case(f"{name}-weight-none", name, none, TypeError, "`weight`")]


# ---------------------------------------------------------------------------------------
# Everything else
# ---------------------------------------------------------------------------------------


def _loraify(**kwargs):
    return lambda ctx: lora.loraify(ctx.mlp, **(dict(rank=2, key=ctx.key) | kwargs))


def _bad_rule(name, shape, spec, mesh):
    return 3


# fmt: off
CASES = [
    *(case for name in CONSTRUCTORS for case in _constructor_cases(name)),
    Case("AbstractAdapter-abstract", "AbstractAdapter", lambda c: lora.AbstractAdapter(), TypeError, "abstract"),
    # loraify
    Case("loraify-no-layers", "loraify", lambda c: lora.loraify(3, rank=2, key=c.key), ValueError, "`model`"),
    Case("loraify-arrays-only", "loraify", lambda c: lora.loraify([c.w], rank=2, key=c.key), ValueError, "`model`"),
    Case("loraify-key", "loraify", _loraify(key=jnp.zeros(3)), TypeError, "`key`"),
    Case("loraify-scale-nan", "loraify", _loraify(scale=math.nan), ValueError, "`scale`"),
    Case("loraify-dtype", "loraify", _loraify(dtype="nonsense"), TypeError, "`dtype`"),
    Case("loraify-allow_materialise", "loraify", _loraify(allow_materialise="no"), TypeError, "`allow_materialise`"),
    Case("loraify-method-none", "loraify", _loraify(method=None), ValueError, "`method`"),
    Case("loraify-where-arity", "loraify", _loraify(where=lambda name: True), TypeError, "`where`"),
    Case("loraify-where-entry", "loraify", _loraify(where=["layers.0", 3]), TypeError, "`where`"),
    Case("loraify-where-empty", "loraify", _loraify(where=[]), ValueError, "`where=[]`"),
    Case("loraify-where-adapted", "loraify", lambda c: lora.loraify(c.adapted, rank=2, key=c.key, where=["layers.0"]), ValueError, "already adapted"),
    Case("loraify-exclude-type", "loraify", _loraify(exclude=3), TypeError, "`exclude`"),
    Case("loraify-exclude-regex", "loraify", _loraify(exclude="("), ValueError, "`exclude`"),
    Case("loraify-exclude-all-linear", "loraify", _loraify(exclude="all-linear"), ValueError, "`exclude`"),
    Case("loraify-rank_pattern-regex", "loraify", _loraify(rank_pattern={"(": 2}), ValueError, "`rank_pattern`"),
    Case("loraify-rank_pattern-key", "loraify", _loraify(rank_pattern={1: 2}), TypeError, "`rank_pattern`"),
    Case("loraify-alpha_pattern-value", "loraify", _loraify(alpha_pattern={"layers.0": 0.0}), ValueError, "`alpha_pattern"),
    Case("loraify-alpha_pattern-type", "loraify", _loraify(alpha_pattern="layers.0"), TypeError, "`alpha_pattern`"),
    Case("loraify-layers_to_transform-str", "loraify", _loraify(layers_to_transform="abc"), TypeError, "`layers_to_transform`"),
    Case("loraify-layers_to_transform-float", "loraify", _loraify(layers_to_transform=[1.5]), TypeError, "`layers_to_transform`"),
    Case("loraify-layers_to_transform-missing", "loraify", _loraify(layers_to_transform=[99]), ValueError, "`layers_to_transform"),
    Case("loraify-layers_pattern-type", "loraify", _loraify(layers_to_transform=[0], layers_pattern=3), TypeError, "`layers_pattern`"),
    Case("loraify-layers_pattern-alone", "loraify", _loraify(layers_pattern="layers"), ValueError, "`layers_pattern`"),
    Case("loraify-option-of-another-method", "loraify", _loraify(method="dora", decompose_both=True), TypeError, "`decompose_both`"),
    Case("loraify-option-lokr-dropout", "loraify", _loraify(method="lokr", dropout=0.1), TypeError, "`dropout`"),
    Case("loraify-option-embedding-dropout", "loraify", lambda c: lora.loraify(eqx.nn.Embedding(5, 3, key=c.key), rank=1, key=c.key, where=lambda n, l: True, dropout=0.1,), TypeError, "`dropout`"),
    Case("loraify-option-value", "loraify", _loraify(dropout=1.5), ValueError, "`dropout`"),
    Case("loraify-lokr-on-convtranspose", "loraify", lambda c: lora.loraify([eqx.nn.ConvTranspose2d(2, 2, 3, key=c.key)], rank=1, key=c.key, method="lokr", where=["0"]), ValueError, "`method='lokr'`"),
    Case("LokrConvArray-effective-conv", "LokrConvArray", lambda c: lora.LokrConvArray(jnp.ones((2, 3, 3)), rank=1, key=c.key, use_effective_conv2d=1), TypeError, "`use_effective_conv2d"),
    Case("loraify-dora-on-convtranspose", "loraify", lambda c: lora.loraify([eqx.nn.ConvTranspose2d(2, 2, 3, key=c.key)], rank=1, key=c.key, method="dora", where=["0"]), ValueError, "`method='dora'`"),
    Case("loraify-loha-on-convtranspose", "loraify", lambda c: lora.loraify([eqx.nn.ConvTranspose2d(2, 2, 3, key=c.key)], rank=1, key=c.key, method="loha", where=["0"]), ValueError, "`method='loha'`"),
    Case("LohaConvArray-effective-conv", "LohaConvArray", lambda c: lora.LohaConvArray(jnp.ones((2, 3, 3)), rank=1, key=c.key, use_effective_conv2d=1), TypeError, "`use_effective_conv2d"),
    Case("loraify-conv_path", "loraify", lambda c: lora.loraify(c.conv, rank=1, key=c.key, where=["0"], conv_path="fast"), ValueError, "`conv_path`"),
    Case("loraify-dora-conv-dropout", "loraify", lambda c: lora.loraify(c.conv, rank=1, key=c.key, method="dora", where=["0"], dropout=0.1), TypeError, "`dropout`"),
    # find_targets
    Case("find_targets-no-layers", "find_targets", lambda c: lora.find_targets({"x": c.w}), ValueError, "`model`"),
    Case("find_targets-where", "find_targets", lambda c: lora.find_targets(c.mlp, where=3), TypeError, "`where`"),
    Case("find_targets-layers_to_transform", "find_targets", lambda c: lora.find_targets(c.mlp, layers_to_transform="x"), TypeError, "`layers_to_transform`"),
    # materialise, unloraify
    Case("materialise-trainable-half", "materialise", lambda c: lora.materialise(c.params), ValueError, "without its base weight"),
    Case("materialise-frozen-half", "materialise", lambda c: lora.materialise(c.frozen), ValueError, "without its factors"),
    Case("materialise-safe_merge-type", "materialise", lambda c: lora.materialise(c.adapted, safe_merge="yes"), TypeError, "`safe_merge`"),
    Case("materialise-safe_merge-under-jit", "materialise", lambda c: eqx.filter_jit(lambda m: lora.materialise(m, safe_merge=True))(c.adapted), TypeError, "`safe_merge=True`"),
    Case("unloraify-trainable-half", "unloraify", lambda c: lora.unloraify(c.params), ValueError, "without its base weight"),
    # masks, summaries
    Case("partition-train_bias", "partition", lambda c: lora.partition(c.adapted, train_bias="some"), ValueError, "`train_bias`"),
    Case("partition-trainable-int", "partition", lambda c: lora.partition(c.adapted, trainable=3), TypeError, "`trainable`"),
    Case("trainable_mask-trainable-str", "trainable_mask", lambda c: lora.trainable_mask(c.adapted, trainable="layers.0"), TypeError, "`trainable`"),
    Case("trainable_mask-trainable-missing", "trainable_mask", lambda c: lora.trainable_mask(c.adapted, trainable=["head"]), ValueError, "`trainable`"),
    Case("summary-train_bias", "summary", lambda c: lora.summary(c.adapted, train_bias=1), ValueError, "`train_bias`"),
    Case("summary-trainable", "summary", lambda c: lora.summary(c.adapted, trainable=[1]), TypeError, "`trainable`"),
    Case("print_trainable_parameters-option", "print_trainable_parameters", lambda c: lora.print_trainable_parameters(c.adapted, trainable="x"), TypeError, "`trainable`"),
    Case("with_dropout_keys-int", "with_dropout_keys", lambda c: lora.with_dropout_keys(c.adapted, 3), TypeError, "`key`"),
    Case("with_dropout_keys-numpy", "with_dropout_keys", lambda c: lora.with_dropout_keys(c.adapted, np.zeros(2, np.uint32)), TypeError, "`key`"),
    # multiple adapters
    Case("stack_adapters-list", "stack_adapters", lambda c: lora.stack_adapters([c.adapted]), TypeError, "`models`"),
    Case("stack_adapters-empty", "stack_adapters", lambda c: lora.stack_adapters({}), TypeError, "`models`"),
    Case("stack_adapters-key", "stack_adapters", lambda c: lora.stack_adapters({1: c.adapted}), TypeError, "`models`"),
    Case("stack_adapters-unadapted", "stack_adapters", lambda c: lora.stack_adapters({"a": c.mlp}), ValueError, "`models['a']`"),
    Case("stack_adapters-places", "stack_adapters", lambda c: lora.stack_adapters({"a": c.adapted, "b": lora.loraify(c.mlp, rank=2, key=c.key, where=["layers.0"]),}), ValueError, "`models['b']`"),
    Case("stack_adapters-method", "stack_adapters", lambda c: lora.stack_adapters({"a": lora.loraify(c.mlp, rank=2, key=c.key, method="dora")}), TypeError, "`models['a']`"),
    Case("stack_adapters-shapes", "stack_adapters", lambda c: lora.stack_adapters({"a": c.adapted, "b": lora.loraify(eqx.nn.MLP(4, 2, 6, 2, key=c.key), rank=2, key=c.key),}), ValueError, "`models['b']`"),
    Case("adapter_names-plain", "adapter_names", lambda c: lora.adapter_names(c.adapted), ValueError, "`model`"),
    Case("set_adapter-name", "set_adapter", lambda c: lora.set_adapter(c.stacked, "c"), ValueError, "`which`"),
    Case("set_adapter-float", "set_adapter", lambda c: lora.set_adapter(c.stacked, 1.5), TypeError, "`which`"),
    Case("set_adapter-bool", "set_adapter", lambda c: lora.set_adapter(c.stacked, True), TypeError, "`which`"),
    Case("set_adapter-index", "set_adapter", lambda c: lora.set_adapter(c.stacked, 5), ValueError, "`which`"),
    Case("set_adapter-float-array", "set_adapter", lambda c: lora.set_adapter(c.stacked, jnp.asarray(1.0)), TypeError, "`which`"),
    Case("set_adapter-weight-str", "set_adapter", lambda c: lora.set_adapter(c.stacked, {"a": "x"}), TypeError, "`which['a']`"),
    Case("set_adapter-weight-nan", "set_adapter", lambda c: lora.set_adapter(c.stacked, {"a": math.nan}), ValueError, "`which['a']`"),
    Case("set_adapter-weight-name", "set_adapter", lambda c: lora.set_adapter(c.stacked, {"c": 1.0}), ValueError, "`which`"),
    Case("add_adapter-name-type", "add_adapter", lambda c: lora.add_adapter(c.stacked, 3, c.adapted), TypeError, "`name`"),
    Case("add_adapter-name-taken", "add_adapter", lambda c: lora.add_adapter(c.stacked, "a", c.adapted), ValueError, "`name`"),
    Case("add_adapter-places", "add_adapter", lambda c: lora.add_adapter(c.stacked, "c", c.mlp), ValueError, "`adapted`"),
    Case("delete_adapter-name", "delete_adapter", lambda c: lora.delete_adapter(c.stacked, "z"), ValueError, "`name`"),
    Case("delete_adapter-last", "delete_adapter", lambda c: lora.delete_adapter(c.single, "a"), ValueError, "`name`"),
    Case("combine_adapters-weights-type", "combine_adapters", lambda c: lora.combine_adapters(c.stacked, ["a"]), TypeError, "`weights`"),
    Case("combine_adapters-weights-name", "combine_adapters", lambda c: lora.combine_adapters(c.stacked, {"z": 1.0}), ValueError, "`weights`"),
    Case("combine_adapters-weights-value", "combine_adapters", lambda c: lora.combine_adapters(c.stacked, {"a": "x"}), TypeError, "`weights['a']`"),
    Case("combine_adapters-how", "combine_adapters", lambda c: lora.combine_adapters(c.stacked, {"a": 1.0}, how="mean"), ValueError, "`how`"),
    Case("combine_adapters-rank-type", "combine_adapters", lambda c: lora.combine_adapters(c.stacked, {"a": 1.0}, how="svd", rank="2"), TypeError, "`rank`"),
    Case("combine_adapters-rank-zero", "combine_adapters", lambda c: lora.combine_adapters(c.stacked, {"a": 1.0}, how="svd", rank=0), ValueError, "`rank`"),
    Case("combine_adapters-rank-cat", "combine_adapters", lambda c: lora.combine_adapters(c.stacked, {"a": 1.0}, rank=2), ValueError, "`rank`"),
    # quantisation
    Case("Int8Array-list", "Int8Array", lambda c: lora.Int8Array.from_array([[1.0]]), TypeError, "`weight`"),
    Case("Int8Array-int", "Int8Array", lambda c: lora.Int8Array.from_array(jnp.ones((2, 2), jnp.int32)), TypeError, "`weight`"),
    Case("Int8Array-rank", "Int8Array", lambda c: lora.Int8Array.from_array(jnp.ones(3)), ValueError, "`weight`"),
    Case("Int8Array-empty", "Int8Array", lambda c: lora.Int8Array.from_array(jnp.ones((0, 3))), ValueError, "`weight`"),
    Case("NF4Array-quax-value", "NF4Array", lambda c: lora.NF4Array.from_array(lora.Int8Array.from_array(c.w)), TypeError, "`weight`"),
    Case("NF4Array-block-odd", "NF4Array", lambda c: lora.NF4Array.from_array(jnp.ones((4, 4)), block_size=3), ValueError, "`block_size`"),
    Case("NF4Array-block-str", "NF4Array", lambda c: lora.NF4Array.from_array(jnp.ones((4, 4)), block_size="2"), TypeError, "`block_size`"),
    Case("NF4Array-block-divides", "NF4Array", lambda c: lora.NF4Array.from_array(jnp.ones((4, 4)), block_size=32), ValueError, "`block_size`"),
    Case("NF4Array-double_quant", "NF4Array", lambda c: lora.NF4Array.from_array(jnp.ones((4, 4)), block_size=2, double_quant=1), TypeError, "`double_quant`"),
    Case("quantise-no-layers", "quantise", lambda c: lora.quantise(3), ValueError, "`model`"),
    Case("quantise-method", "quantise", lambda c: lora.quantise(c.mlp, method="int4"), ValueError, "`method`"),
    Case("quantise-double_quant-int8", "quantise", lambda c: lora.quantise(c.mlp, method="int8", double_quant=True), ValueError, "`double_quant=True`"),
    Case("quantise-block-odd", "quantise", lambda c: lora.quantise(c.mlp, block_size=5), ValueError, "`block_size`"),
    Case("quantise-block-divides", "quantise", lambda c: lora.quantise(c.mlp, block_size=64), ValueError, "`block_size`"),
    Case("quantise-where", "quantise", lambda c: lora.quantise(c.mlp, where=3), TypeError, "`where`"),
    Case("quantise-adapted", "quantise", lambda c: lora.quantise(c.adapted), ValueError, "already adapted"),
    # sharding
    Case("fsdp-axis", "fsdp", lambda c: lora.fsdp(3), TypeError, "`axis`"),
    Case("fsdp-min_size-negative", "fsdp", lambda c: lora.fsdp(min_size=-1), ValueError, "`min_size`"),
    Case("fsdp-min_size-float", "fsdp", lambda c: lora.fsdp(min_size=1.5), TypeError, "`min_size`"),
    Case("tensor_parallel-column", "tensor_parallel", lambda c: lora.tensor_parallel(column="layers.0"), TypeError, "`column`"),
    Case("tensor_parallel-row", "tensor_parallel", lambda c: lora.tensor_parallel(row=[3]), TypeError, "`row`"),
    Case("tensor_parallel-axis", "tensor_parallel", lambda c: lora.tensor_parallel(axis=3), TypeError, "`axis`"),
    Case("tensor_parallel-both", "tensor_parallel", lambda c: lora.partition_specs(c.mlp, c.mesh, lora.tensor_parallel(column=["layers.0"], row=["layers.0"], axis="fsdp"),), ValueError, "`column` and `row`"),
    Case("tensor_parallel-divides", "tensor_parallel", lambda c: lora.partition_specs(c.mlp, c.mesh, lora.tensor_parallel(column=["layers.2"], axis="fsdp")), ValueError, "`tensor_parallel`"),
    Case("partition_specs-mesh", "partition_specs", lambda c: lora.partition_specs(c.adapted, 3, lora.fsdp()), TypeError, "`mesh`"),
    Case("partition_specs-rules", "partition_specs", lambda c: lora.partition_specs(c.adapted, c.mesh, 3), TypeError, "`rules`"),
    Case("partition_specs-axis", "partition_specs", lambda c: lora.partition_specs(c.adapted, c.mesh, lora.fsdp("model", min_size=1)), ValueError, "`axis`"),
    Case("partition_specs-rule-output", "partition_specs", lambda c: lora.partition_specs(c.adapted, c.mesh, _bad_rule), TypeError, "`rules`"),
    Case("shard_model-mesh", "shard_model", lambda c: lora.shard_model(c.adapted, "mesh", lora.fsdp()), TypeError, "`mesh`"),
    Case("shard_model-axis", "shard_model", lambda c: lora.shard_model(c.adapted, c.mesh, lora.tensor_parallel(column=["layers.0"], axis="model")), ValueError, "`axis`"),
    Case("trainable_partition_specs-train_bias", "trainable_partition_specs", lambda c: lora.trainable_partition_specs(c.adapted, c.mesh, lora.fsdp(), train_bias="x"), ValueError, "`train_bias`"),
    Case("trainable_partition_specs-rules", "trainable_partition_specs", lambda c: lora.trainable_partition_specs(c.adapted, c.mesh, [3]), TypeError, "`rules`"),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile(case, ctx):
    with pytest.raises(case.error, match=re.escape(case.match)):
        case.call(ctx)


# Public names that need no row, and why. Everything from the adapter-file modules
# (`_io`, `_peft`) is tested in tests/test_io.py and tests/test_peft.py.
FILE_MODULES = ("lora_jax._io", "lora_jax._peft")
EXEMPT = {
    "is_adapter": "a predicate: every input is valid (tested below)",
    "MultiLoraArray": "built by stack_adapters, whose inputs are checked",
    "Summary": "a result type, built by summary",
    "remat_policy": "a jax.checkpoint policy: JAX calls it with its own primitives",
}


def test_every_public_name_is_covered():
    public = {
        n
        for n in dir(lora)
        if not n.startswith("_")
        and not inspect.ismodule(getattr(lora, n))
        and getattr(getattr(lora, n), "__module__", None) not in FILE_MODULES
    }
    covered = {c.function for c in CASES} | set(EXEMPT)
    assert sorted(public - covered) == [], "public names without hostile-input cases"
    assert sorted(covered - public) == []


def test_is_adapter_takes_anything():
    for x in (
        None,
        3,
        "w",
        jnp.ones(2),
        lora.Int8Array.from_array(jnp.ones((2, 2))),
        [1],
    ):
        assert lora.is_adapter(x) is False


# ---------------------------------------------------------------------------------------
# Adapters used wrongly in a computation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_used_outside_quaxify(name):
    value = _make(name)(None)
    with pytest.raises(TypeError, match=re.escape("quax.quaxify")):
        value @ jnp.ones(value.shape[-1])
    with pytest.raises(TypeError, match=re.escape("quax.quaxify")):
        jnp.ones(value.shape[0]) @ value
    with pytest.raises(TypeError, match=re.escape("quax.quaxify")):
        value[0]


def test_layer_called_outside_quaxify(ctx):
    with pytest.raises(TypeError, match=re.escape("quax.quaxify(model)(x)")):
        ctx.adapted(jnp.ones(4))


@pytest.mark.parametrize("name", ["LoraArray", "DoraArray", "LokrArray", "LohaArray"])
def test_wrong_shape_in_a_product(name):
    """A product with mismatched sizes fails as it would on the plain weight: JAX's own
    shape error, before any factor is touched."""
    value = _make(name)(None)
    out, inp = value.shape
    x = jnp.ones(inp + 1)
    with pytest.raises(TypeError, match="contracting dimensions to have the same shape"):
        quax.quaxify(lambda w, x: w @ x)(value, x)
    with pytest.raises(TypeError, match="contracting dimensions to have the same shape"):
        quax.quaxify(lambda w, x: x @ w)(value, jnp.ones(out + 1))


def test_wrong_channels_in_a_conv():
    value = _make("LoraConvArray")(None)  # (out=2, in=3, k=3)
    x = jnp.ones((1, 4, 5))
    with pytest.raises(ValueError, match="feature"):
        quax.quaxify(lambda k, x: lax.conv_general_dilated(x, k, (1,), "SAME"))(value, x)


def test_operation_without_a_rule_names_the_way_out():
    value = _make("LoraArray")(None)
    with pytest.raises(RuntimeError, match=re.escape("allow_materialise=True")):
        quax.quaxify(jnp.sin)(value)
