"""PEFT's own adapter format: a directory with `adapter_config.json` and
`adapter_model.safetensors`, readable by `peft.PeftModel.from_pretrained`.

PEFT names a tensor `base_model.model.<module>.<suffix>`, where `<module>` is the
torch module's dotted name and `<suffix>` depends on the method (`lora_A.weight`,
`lora_B.weight` for LoRA; `lora_magnitude_vector` added for DoRA; `lokr_w1`... for
LoKr; `hada_w1_a`... for LoHa; `lora_embedding_A`... for an Embedding's LoRA). Each
method is a row of `PEFT_METHODS`: its PEFT type, the config flags that select it, and
per layer kind (Linear, Conv, Embedding) a `PeftKind`: our value type, which PEFT
suffix holds which field, and the shapes PEFT gives those tensors for a layer
(`layout`), so that a file is checked tensor by tensor before anything is built.

Stacked layers (a weight with a leading layer axis, run with `lax.scan`) are saved
as one PEFT module per layer: `name_map` sends the stacked module's name to a
template holding `{i}` (`"blocks.attn.q"` -> `"layers.{i}.attn.q"`), and loading
gathers `layers.0.attn.q`, `layers.1.attn.q`, ... back into the stack.
"""

import json
import math
import numbers
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._base import is_adapter
from ._conv import LoraConvArray
from ._dora import DoraArray
from ._dora_conv import DoraConvArray
from ._embedding import LoraEmbeddingArray
from ._filters import TrainBias
from ._io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMATS,
    _most_common,
    _to_device,
    adapter_entries,
    atomic_write,
    check_path,
    encode,
    read_adapter_file,
    read_safetensors,
    saved_fields,
    write_safetensors,
)
from ._loha import LohaArray
from ._loha_conv import LohaConvArray
from ._lokr import LokrArray, factorization
from ._lokr_conv import LokrConvArray
from ._lora import LoraArray
from ._loraify import LAYERS
from ._multi import (
    MultiLoraArray,
    adapter_names,
    has_stacked_adapters,
    put_adapter,
    select_adapter,
)
from ._quant import is_quantised
from ._targets import name_matches, path_name, pattern_key_matches
from ._validate import check_choice, check_dtype


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# In a name given by `name_map`, where the layer index of a stacked module goes.
INDEX = "{i}"

NameMap = dict[str, str] | Callable[[str], str] | None


def snap_alpha(scaling: float, rank: int, rslora: bool) -> float | int:
    """The shortest `alpha` whose PEFT scaling (`alpha/r`, or `alpha/sqrt(r)`) rounds to
    exactly this float32 `scaling`, so that the scaling leaf round-trips bitwise."""
    scaling = np.float32(scaling)
    denom = math.sqrt(rank) if rslora else rank
    exact = float(scaling) * denom
    for digits in range(0, 10):
        cand = round(exact, digits)
        if cand > 0 and np.float32(cand / denom) == scaling:
            return int(cand) if float(cand).is_integer() else cand
    return exact


def peft_scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


Shapes = dict[str, tuple[int, ...]]
Fields = dict[str, np.ndarray]


@dataclass(frozen=True)
class PeftKind:
    """How PEFT stores one method on one kind of layer (Linear, Conv, Embedding).

    - `name`: the kind, for messages (`"Linear"`).
    - `layer`: the Equinox layer type it adapts.
    - `adapter_type`: our value type for it.
    - `tensors`: `(PEFT suffix, our field)` pairs.
    - `layout`: `(batch, shape, rank, config) -> {field: shape}`, the tensors PEFT
        builds for a layer whose weight has Equinox's shape `shape` (`(out, in)`,
        `(out, in/groups, *kernel)`, `(num, dim)`), with the stacking dimensions
        `batch` in front.
    - `dims`: `fields -> shape`, the weight's shape from PEFT's tensors (for files
        without a model; a LoHa conv gives its kernel flattened, `(out, in·window)`).
    - `rank_of`: `fields -> rank`, where the tensors determine it (else `None`).
    - `new`: `(weight, rank, config, dtype, flags) -> value`, a value of the right
        structure (its arrays are then replaced by the file's).
    - `to_peft`, `from_peft`: one layer's tensors from our layout to PEFT's and back,
        where they differ (an embedding's factors are transposed; a conv's DoRA
        magnitudes are `(1, out, 1, ...)`; a Conv1d's Tucker core is 4-D).
        `from_peft` also takes the weight's shape (`dims`' where there is no model).
    - `refuse`: `layer -> reason or None`: why PEFT's module would not compute what
        our adapter of this layer computes (a grouped or dilated conv, ...).
    """

    name: str
    layer: type
    adapter_type: type
    tensors: tuple[tuple[str, str], ...]
    layout: Callable[..., Shapes]
    dims: Callable[[Fields], tuple[int, ...]]
    rank_of: Callable[[Fields], int | None]
    new: Callable[..., Any]
    to_peft: Callable[[Fields], Fields] = lambda fields: fields
    from_peft: Callable[[Fields, tuple[int, ...]], Fields] = lambda fields, shape: fields
    refuse: Callable[[Any], str | None] = lambda layer: None

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f in self.tensors)

    def split(self, layer, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A weight's shape as `(stacking dimensions, the layer's own shape)`."""
        n = 2 + layer.num_spatial_dims if isinstance(layer, eqx.nn.Conv) else 2
        return tuple(shape[:-n]), tuple(shape[-n:])


@dataclass(frozen=True)
class Layer:
    """One PEFT module's adapter: its tensors by our field name in PEFT's layout, its
    scaling and rank, the adapted weight's shape and its kind."""

    fields: Fields
    scaling: float
    rank: int
    shape: tuple[int, ...]
    kind: PeftKind


@dataclass(frozen=True)
class PeftMethod:
    """One adapter method as PEFT stores it.

    - `method`: our name (`"lora"`).
    - `peft_type`: PEFT's `peft_type` (`"LORA"`).
    - `flags`: config entries that select this method among those of one `peft_type`
        (`{"use_dora": False}`; DoRA is `{"use_dora": True}`), written on save.
    - `kinds`: how each layer kind is stored, Linear first.
    - `configure`: `(layers, values) -> config entries`, what this method's config
        says beyond rank and alpha (LoKr's `decompose_both`, dropouts).
    - `defaults`: PEFT's config entries as PEFT writes them.
    - `rank_key`, `alpha_key`: PEFT's names for the rank and alpha.
    - `rslora`, `bias`: whether the config has `use_rslora` and `bias`.
    - `unsupported`: PEFT suffixes of this method that lora_jax does not hold, with why.
    """

    method: str
    peft_type: str
    flags: dict[str, Any]
    kinds: tuple[PeftKind, ...]
    configure: Callable[[list[Layer], list[Any]], dict]
    defaults: dict[str, Any] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)
    rank_key: str = "r"
    alpha_key: str = "lora_alpha"
    rslora: bool = True
    bias: bool = True

    def matches(self, config: dict) -> bool:
        return config.get("peft_type") == self.peft_type and all(
            config.get(k, v if not v else None) == v for k, v in self.flags.items()
        )

    @property
    def suffixes(self) -> dict[str, str]:
        """PEFT suffix -> our field, over every kind."""
        return {s: f for kind in self.kinds for s, f in kind.tensors}

    def kind_of_layer(self, layer) -> PeftKind | None:
        return next((k for k in self.kinds if isinstance(layer, k.layer)), None)

    def kind_of_tensors(self, tensors: dict[str, np.ndarray]) -> PeftKind:
        """The kind of a module known only by its tensors (by PEFT suffix): the one
        whose suffixes it uses; between kinds with the same suffixes (Linear and Conv),
        Conv when a tensor has more than two dimensions. A LoHa conv's tensors are a
        Linear's (its kernel is flattened)."""
        fitting = [k for k in self.kinds if set(tensors) <= {s for s, _ in k.tensors}]
        fitting = fitting or list(self.kinds)
        if len(fitting) > 1:
            conv = any(np.ndim(a) > 2 for a in tensors.values())
            fitting = [k for k in fitting if (k.layer is eqx.nn.Conv) == conv] or fitting
        return fitting[0]


def _no_stacking(batch, what: str) -> None:
    if batch:
        raise ValueError(
            f"{what} adapters of a stack of layers have no PEFT form here (PEFT's "
            "modules of stacked Linears do); save them with `lora_jax.save_adapter`."
        )


def _transposed(fields: Fields, names: Sequence[str]) -> Fields:
    return {f: (np.swapaxes(a, -1, -2) if f in names else a) for f, a in fields.items()}


def _refuse_conv(layer, *, groups: bool, dilation: bool) -> str | None:
    """Why PEFT's conv module would compute something else than ours, if it would:
    PEFT pads its factor convs with zeros, and its conv LoRA's `lora_A` sees every
    input channel and ignores the kernel's dilation."""
    if not isinstance(layer, eqx.nn.Conv):
        return f"PEFT does not adapt an {type(layer).__name__}"
    if layer.padding_mode != "ZEROS":
        return (
            f"the conv pads with {layer.padding_mode!r}, but PEFT computes the adapter's "
            "conv with zero padding"
        )
    if groups and layer.groups != 1:
        return (
            f"the conv has groups={layer.groups}, but PEFT's conv `lora_A` is ungrouped "
            "(an update it cannot merge into the kernel); ours keeps the kernel's groups"
        )
    if dilation and any(d != 1 for d in layer.dilation):
        return (
            f"the conv has dilation {tuple(layer.dilation)}, which PEFT's conv `lora_A` "
            "does not apply"
        )
    return None


# --- LoRA and DoRA ----------------------------------------------------------------------


def _lora_layout(batch, shape, rank, config) -> Shapes:
    del config
    out, inp = shape
    return {"a": (*batch, out, rank), "b": (*batch, rank, inp)}


def _dora_layout(batch, shape, rank, config) -> Shapes:
    return {**_lora_layout(batch, shape, rank, config), "m": (*batch, shape[0])}


def _lora_dims(fields) -> tuple[int, ...]:
    return fields["a"].shape[-2], fields["b"].shape[-1]


def _lora_rank(fields) -> int | None:
    return fields["a"].shape[-1] if "a" in fields else None


def _conv_layout(batch, shape, rank, config) -> Shapes:
    """PEFT's conv LoRA: `lora_A` a conv with the kernel's size to `rank` channels,
    `lora_B` a 1×1 conv to `out`."""
    del config
    _no_stacking(batch, "Conv")
    out, inp, *kernel = shape
    return {"a": (out, rank, *(1 for _ in kernel)), "b": (rank, inp, *kernel)}


def _dora_conv_layout(batch, shape, rank, config) -> Shapes:
    return {
        **_conv_layout(batch, shape, rank, config),
        "m": (1, shape[0], *(1 for _ in shape[2:])),
    }


def _conv_dims(fields) -> tuple[int, ...]:
    return fields["a"].shape[0], *fields["b"].shape[1:]


def _dora_conv_to_peft(fields: Fields) -> Fields:
    ones = (1,) * (fields["b"].ndim - 2)
    return {**fields, "m": fields["m"].reshape(1, -1, *ones)}


def _dora_conv_from_peft(fields: Fields, shape) -> Fields:
    del shape
    return {**fields, "m": fields["m"].reshape(-1)}


def _embedding_layout(batch, shape, rank, config) -> Shapes:
    """PEFT's `lora_embedding_A` is `(rank, num)`, `lora_embedding_B` `(dim, rank)`."""
    del config
    _no_stacking(batch, "Embedding")
    num, dim = shape
    return {"a": (rank, num), "b": (dim, rank)}


def _lora_options(config, flags) -> dict:
    return {"dropout": float(config.get("lora_dropout") or 0.0), **flags}


def _configure_lora(layers, values) -> dict:
    del layers
    dropouts = [float(getattr(v, "dropout", 0.0)) for v in values]
    return {"lora_dropout": _most_common(dropouts) or 0.0}


_LORA_CONV = dict(
    name="Conv",
    layer=eqx.nn.Conv,
    tensors=(("lora_A.weight", "b"), ("lora_B.weight", "a")),
    dims=_conv_dims,
    rank_of=lambda fields: fields["b"].shape[0] if "b" in fields else None,
    refuse=lambda layer: _refuse_conv(layer, groups=True, dilation=True),
)
_LORA_LINEAR = dict(
    name="Linear",
    layer=eqx.nn.Linear,
    tensors=(("lora_A.weight", "b"), ("lora_B.weight", "a")),
    dims=_lora_dims,
    rank_of=_lora_rank,
)


def _new_lora(weight, rank, config, dtype, flags):
    return LoraArray(weight, rank=rank, key=jr.key(0), dtype=dtype, **_lora_options(config, flags))


def _new_dora(weight, rank, config, dtype, flags):
    return DoraArray(weight, rank=rank, key=jr.key(0), dtype=dtype, **_lora_options(config, flags))


_LORA_KINDS = (
    PeftKind(adapter_type=LoraArray, layout=_lora_layout, new=_new_lora, **_LORA_LINEAR),
    PeftKind(
        adapter_type=LoraConvArray,
        layout=_conv_layout,
        new=lambda w, rank, config, dtype, flags: LoraConvArray(
            w, rank=rank, key=jr.key(0), dtype=dtype, **flags
        ),
        **_LORA_CONV,
    ),
    PeftKind(
        name="Embedding",
        layer=eqx.nn.Embedding,
        adapter_type=LoraEmbeddingArray,
        tensors=(("lora_embedding_A", "a"), ("lora_embedding_B", "b")),
        layout=_embedding_layout,
        dims=lambda fields: (fields["a"].shape[1], fields["b"].shape[0]),
        rank_of=lambda fields: fields["a"].shape[0] if "a" in fields else None,
        new=lambda w, rank, config, dtype, flags: LoraEmbeddingArray(
            w, rank=rank, key=jr.key(0), dtype=dtype, **flags
        ),
        to_peft=lambda fields: _transposed(fields, ("a", "b")),
        from_peft=lambda fields, shape: _transposed(fields, ("a", "b")),
    ),
)
# PEFT's magnitude is the norm of `w + s·B@A` per output unit, as our `m`.
_DORA_KINDS = (
    PeftKind(
        adapter_type=DoraArray,
        layout=_dora_layout,
        new=_new_dora,
        **{**_LORA_LINEAR, "tensors": (*_LORA_LINEAR["tensors"], ("lora_magnitude_vector", "m"))},
    ),
    PeftKind(
        adapter_type=DoraConvArray,
        layout=_dora_conv_layout,
        new=lambda w, rank, config, dtype, flags: DoraConvArray(
            w, rank=rank, key=jr.key(0), dtype=dtype, **flags
        ),
        to_peft=_dora_conv_to_peft,
        from_peft=_dora_conv_from_peft,
        **{**_LORA_CONV, "tensors": (*_LORA_CONV["tensors"], ("lora_magnitude_vector", "m"))},
    ),
)
# PEFT's LoraConfig entries, as PEFT writes them, with the values lora_jax uses.
_LORA_DEFAULTS: dict[str, Any] = {
    "alpha_pattern": {},
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_dora": False,
    "use_rslora": False,
}


def _lokr_layout(batch, shape, rank, config) -> Shapes:
    """PEFT's rule (`LoKrLayer.update_layer` for a Linear): `out = l·k`, `in = p·q`
    split by `factorization(·, decompose_factor)`; `w1 (l, p)` is held as
    `w1_a (l, r) @ w1_b (r, p)` when `decompose_both` and `r < max(l, p)/2`, `w2 (k, q)`
    as `w2_a @ w2_b` when `r < max(k, q)/2`. A stack's matrices each get these, with
    the stacking dimensions `batch` in front."""
    out, inp = shape
    factor = config.get("decompose_factor", -1)
    l, k = factorization(out, factor)
    p, q = factorization(inp, factor)
    shapes: Shapes = {}
    if config.get("decompose_both", False) and rank < max(l, p) / 2:
        shapes.update(w1_a=(l, rank), w1_b=(rank, p))
    else:
        shapes["w1"] = (l, p)
    if rank < max(k, q) / 2:
        shapes.update(w2_a=(k, rank), w2_b=(rank, q))
    else:
        shapes["w2"] = (k, q)
    return {f: (*batch, *s) for f, s in shapes.items()}


def _lokr_conv_layout(batch, shape, rank, config) -> Shapes:
    """PEFT's LoKr for a conv (`LoKrLayer.update_layer` for Conv1d/2d): `w1` as for a
    Linear over `(out, in/groups)`; `w2` whole as `(k, q, *kernel)` or, below half of
    `max(k, q)`, as `w2_a (k, r) @ w2_b (r, q·window)`; with `use_effective_conv2d` and
    a kernel larger than 1, as the Tucker core `t2 (r, r, *kernel)` (a Conv1d's
    `(r, r, k, 1)`) with `w2_a (r, k)` and `w2_b (r, q)`."""
    _no_stacking(batch, "LoKr")
    out, inp, *kernel = shape
    if len(kernel) > 2:
        raise ValueError("PEFT's LoKr adapts Conv1d and Conv2d, not Conv3d")
    shapes = _lokr_layout((), (out, inp), rank, config)
    if "w2" in shapes:
        if len(kernel) == 1 and math.prod(kernel) > 1:
            raise ValueError(
                "PEFT's LoKr Conv1d with a whole `w2` (rank at least half its size) "
                "takes torch.kron of a matrix and a 3-D tensor, which is not the "
                "Kronecker update its Conv2d (and lora_jax) computes; use a rank below "
                f"{max(shapes['w2']) / 2:g} for this layer"
            )
        shapes["w2"] = (*shapes["w2"], *kernel)
    elif config.get("use_effective_conv2d", False) and math.prod(kernel) > 1:
        (k, r), (_, q) = shapes["w2_a"], shapes["w2_b"]
        shapes.update(w2_a=(r, k), w2_b=(r, q), t2=(r, r, *_peft_window(kernel)))
    else:
        k, r = shapes["w2_a"]
        shapes["w2_b"] = (r, shapes["w2_b"][1] * math.prod(kernel))
    return shapes


def _peft_window(kernel) -> tuple[int, ...]:
    """A Tucker core's spatial shape in PEFT: a Conv1d's is `(k, 1)`."""
    return (*kernel, 1) if len(kernel) == 1 else tuple(kernel)


def _tucker_to_peft(fields: Fields, cores: Sequence[str], outer: Sequence[str]) -> Fields:
    """Our Tucker-form tensors in PEFT's layout: the `outer` factors `(out, r)` as
    PEFT's `(r, out)`, a Conv1d's cores `(r, r, k)` as `(r, r, k, 1)`."""
    if cores[0] not in fields:
        return fields
    out = _transposed(fields, outer)
    for c in cores:
        out[c] = out[c].reshape(*out[c].shape[:2], *_peft_window(out[c].shape[2:]))
    return out


def _tucker_from_peft(fields: Fields, shape, cores: Sequence[str], outer: Sequence[str]):
    """PEFT's Tucker-form tensors in our layout, the cores shaped by the kernel's
    spatial dimensions (a Conv1d's lose PEFT's trailing 1)."""
    if cores[0] not in fields:
        return fields
    out = _transposed(fields, outer)
    for c in cores:
        out[c] = out[c].reshape(*out[c].shape[:2], *shape[2:])
    return out


def _tucker_config(layers: list[Layer], core: str, method: str) -> dict:
    """PEFT's one `use_effective_conv2d` for every layer: whether the conv adapters it
    concerns (a kernel larger than 1 and, for LoKr, a decomposed `w2`) hold the Tucker
    core `core`. A mix of both has no PEFT config."""
    held = {
        core in layer.fields
        for layer in layers
        if layer.kind.layer is eqx.nn.Conv
        and math.prod(layer.shape[2:]) > 1
        and "w2" not in layer.fields
    }
    if len(held) > 1:
        raise ValueError(
            f"Some {method} conv adapters are in PEFT's Tucker form "
            "(`use_effective_conv2d=True`) and others are not, but a PEFT config has one "
            "`use_effective_conv2d` for every layer; adapt every conv the same way."
        )
    return {"use_effective_conv2d": held == {True}}


def _lokr_pairs(fields) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`((l, p), (k, q, ...))`: the shapes of `w1` and `w2`, held whole or as products
    (a conv's whole `w2` and a Tucker core give the kernel's spatial dimensions too).
    `fields` in PEFT's layout."""

    def pair(full, a, b):
        if full in fields:
            return tuple(fields[full].shape)
        return fields[a].shape[0], fields[b].shape[1]

    if "t2" in fields:  # PEFT's Tucker `w2_a` is (r, k)
        w2 = (fields["w2_a"].shape[1], fields["w2_b"].shape[1], *fields["t2"].shape[2:])
    else:
        w2 = pair("w2", "w2_a", "w2_b")
    return pair("w1", "w1_a", "w1_b"), w2


def _lokr_dims(fields) -> tuple[int, ...]:
    (l, p), (k, q, *_) = _lokr_pairs(fields)
    return l * k, p * q


def _lokr_conv_dims(fields) -> tuple[int, ...]:
    """A conv's kernel shape, where a whole `w2` or a Tucker core gives it (a PEFT
    Conv1d's core gives `(k, 1)`); with `w2_b`, the window is folded into `in` (as
    LoHa's)."""
    (l, p), (k, q, *kernel) = _lokr_pairs(fields)
    return l * k, p * q, *kernel


def _lokr_rank(fields) -> int | None:
    if "t2" in fields:
        return fields["t2"].shape[0]
    for f in ("w1_a", "w2_a"):
        if f in fields:
            return fields[f].shape[-1]
    return None


_LOKR_TENSORS = tuple((f"lokr_{f}", f) for f in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"))
_LOKR_CONV_TENSORS = (*_LOKR_TENSORS, ("lokr_t2", "t2"))


def _refuse_lokr_conv(layer) -> str | None:
    if isinstance(layer, eqx.nn.Conv) and layer.num_spatial_dims == 3:
        return "PEFT's LoKr adapts Conv1d and Conv2d, not Conv3d"
    return _refuse_conv(layer, groups=False, dilation=False)


def _new_lokr(weight, rank, config, dtype, flags, cls=LokrArray):
    return cls(
        weight,
        rank=rank,
        key=jr.key(0),
        decompose_both=bool(config.get("decompose_both", False)),
        decompose_factor=int(config.get("decompose_factor", -1)),
        rank_dropout=float(config.get("rank_dropout") or 0.0),
        module_dropout=float(config.get("module_dropout") or 0.0),
        rank_dropout_scale=bool(config.get("rank_dropout_scale", False)),
        use_effective_conv2d=bool(config.get("use_effective_conv2d", False)),
        dtype=dtype,
        **flags,
    )


def _lokr_fits(layer: Layer, config: dict) -> bool:
    try:
        return _shapes(layer.fields) == layer.kind.layout((), layer.shape, layer.rank, config)
    except ValueError:
        return False


def _lokr_structure(layers: list[Layer]) -> dict:
    """The `decompose_both`, `decompose_factor` and `use_effective_conv2d` under which
    PEFT builds every layer with the factors it holds. Tried in order: PEFT's defaults,
    then every factor that could give another split: one that divides a dimension (so
    it is some layer's `l` or `p`) or one below a dimension's square root (any other
    factor splits as `-1` does)."""
    tucker = _tucker_config(layers, "t2", "LoKr")
    factors = [-1]
    for layer in layers:
        (l, p), _ = _lokr_pairs(layer.fields)
        factors.extend((int(l), int(p)))
    largest = max(max(layer.shape[:2]) for layer in layers)
    factors.extend(range(1, math.isqrt(largest) + 1))
    factors = list(dict.fromkeys(factors))
    for both in (False, True):
        for f in factors:
            config = {"decompose_both": both, "decompose_factor": f, **tucker}
            if all(_lokr_fits(layer, config) for layer in layers):
                return config
    for layer in layers:  # a layer PEFT cannot hold at all says why
        try:
            layer.kind.layout((), layer.shape, layer.rank, tucker)
        except ValueError as e:
            raise ValueError(f"A LoKr adapter of a {layer.shape} weight has no PEFT form: {e}.")
    first = layers[0]
    raise ValueError(
        "The LoKr adapters cannot be described by one PEFT LoKrConfig: no "
        "`decompose_both`/`decompose_factor` gives every layer the factors it holds "
        f"(one layer holds {_shapes(first.fields)} for a {first.shape} "
        f"weight at rank {first.rank}). Adapt every layer with the same LoKr options."
    )


def _configure_lokr(layers, values) -> dict:
    return {
        **_lokr_structure(layers),
        "rank_dropout": _most_common([float(v.rank_dropout) for v in values]) or 0.0,
        "module_dropout": _most_common([float(v.module_dropout) for v in values]) or 0.0,
        "rank_dropout_scale": bool(_most_common([v.rank_dropout_scale for v in values]) or False),
    }


# --- LoHa -------------------------------------------------------------------------------


def _loha_layout(batch, shape, rank, config) -> Shapes:
    del config
    out, inp = shape
    return {
        "w1a": (*batch, out, rank),
        "w1b": (*batch, rank, inp),
        "w2a": (*batch, out, rank),
        "w2b": (*batch, rank, inp),
    }


def _loha_conv_layout(batch, shape, rank, config) -> Shapes:
    """PEFT's LoHa conv: without `use_effective_conv2d` (or for a 1×1 kernel, where
    PEFT turns it off) the kernel as the matrix `(out, in/groups·window)`; with it,
    PEFT's Tucker form, per factor `hada_w?_a (r, out)`, `hada_w?_b (r, in/groups)`
    and the core `hada_t? (r, r, *kernel)` (a Conv1d's `(r, r, k, 1)`)."""
    _no_stacking(batch, "LoHa conv")
    out, *rest = shape
    kernel = rest[1:]
    if len(kernel) > 2:
        raise ValueError("PEFT's LoHa adapts Conv1d and Conv2d, not Conv3d")
    if config.get("use_effective_conv2d", False) and math.prod(kernel) > 1:
        inp, core = rest[0], (rank, rank, *_peft_window(kernel))
        pair = {"a": (rank, out), "b": (rank, inp)}
        return {f"w{i}{x}": s for i in "12" for x, s in pair.items()} | {"t1": core, "t2": core}
    return _loha_layout((), (out, math.prod(rest)), rank, config)


def _loha_conv_dims(fields) -> tuple[int, ...]:
    """A LoHa conv's kernel shape where Tucker cores give it (a PEFT Conv1d's core
    gives `(k, 1)`), else the kernel flattened, `(out, in·window)`."""
    if "t1" in fields:
        return fields["w1a"].shape[1], fields["w1b"].shape[1], *fields["t1"].shape[2:]
    return fields["w1a"].shape[-2], fields["w1b"].shape[-1]


def _loha_options(config, flags) -> dict:
    return {
        "rank_dropout": float(config.get("rank_dropout") or 0.0),
        "module_dropout": float(config.get("module_dropout") or 0.0),
        "use_effective_conv2d": bool(config.get("use_effective_conv2d", False)),
        **flags,
    }


_LOHA_LINEAR = dict(
    name="Linear",
    layer=eqx.nn.Linear,
    tensors=(
        ("hada_w1_a", "w1a"),
        ("hada_w1_b", "w1b"),
        ("hada_w2_a", "w2a"),
        ("hada_w2_b", "w2b"),
    ),
    dims=lambda fields: (fields["w1a"].shape[-2], fields["w1b"].shape[-1]),
    rank_of=lambda fields: fields["w1a"].shape[-1] if "w1a" in fields else None,
)


def _refuse_loha_conv(layer) -> str | None:
    if isinstance(layer, eqx.nn.Conv) and layer.num_spatial_dims == 3:
        return "PEFT's LoHa adapts Conv1d and Conv2d, not Conv3d"
    return _refuse_conv(layer, groups=False, dilation=False)


def _configure_loha(layers, values) -> dict:
    return {
        **_tucker_config(layers, "t1", "LoHa"),
        "rank_dropout": _most_common([float(v.rank_dropout) for v in values]) or 0.0,
        "module_dropout": _most_common([float(v.module_dropout) for v in values]) or 0.0,
    }


# PEFT's LycorisConfig entries shared by LoKrConfig and LoHaConfig.
_LYCORIS_DEFAULTS: dict[str, Any] = {
    "alpha": 8,
    "alpha_pattern": {},
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "exclude_modules": None,
    "inference_mode": True,
    "init_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "module_dropout": 0.0,
    "modules_to_save": None,
    "r": 8,
    "rank_dropout": 0.0,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "task_type": None,
    "use_effective_conv2d": False,
}

_LOKR_DEFAULTS = {
    **_LYCORIS_DEFAULTS,
    "peft_type": "LOKR",
    "decompose_both": False,
    "decompose_factor": -1,
    "rank_dropout_scale": False,
}
_LOHA_DEFAULTS = {**_LYCORIS_DEFAULTS, "peft_type": "LOHA"}


# method name -> how PEFT stores it. A new method adds a row; a new layer kind, a
# `PeftKind` in its method's row.
PEFT_METHODS: dict[str, PeftMethod] = {
    "lora": PeftMethod(
        method="lora",
        peft_type="LORA",
        flags={"use_dora": False},
        kinds=_LORA_KINDS,
        configure=_configure_lora,
        defaults=_LORA_DEFAULTS,
    ),
    "dora": PeftMethod(
        method="dora",
        peft_type="LORA",
        flags={"use_dora": True},
        kinds=_DORA_KINDS,
        configure=_configure_lora,
        defaults=_LORA_DEFAULTS,
        unsupported={
            s: "part of a DoRA adapter of an Embedding, which lora_jax does not have "
            "(it adapts Embeddings with LoRA)"
            for s in ("lora_embedding_A", "lora_embedding_B")
        },
    ),
    "lokr": PeftMethod(
        method="lokr",
        peft_type="LOKR",
        flags={},
        kinds=(
            PeftKind(
                name="Linear",
                layer=eqx.nn.Linear,
                adapter_type=LokrArray,
                tensors=_LOKR_TENSORS,
                layout=_lokr_layout,
                dims=_lokr_dims,
                rank_of=_lokr_rank,
                new=_new_lokr,
            ),
            PeftKind(
                name="Conv",
                layer=eqx.nn.Conv,
                adapter_type=LokrConvArray,
                tensors=_LOKR_CONV_TENSORS,
                layout=_lokr_conv_layout,
                dims=_lokr_conv_dims,
                rank_of=_lokr_rank,
                new=lambda w, rank, config, dtype, flags: _new_lokr(
                    w, rank, config, dtype, flags, LokrConvArray
                ),
                to_peft=lambda fields: _tucker_to_peft(fields, ("t2",), ("w2_a",)),
                from_peft=lambda fields, shape: _tucker_from_peft(
                    fields, shape, ("t2",), ("w2_a",)
                ),
                refuse=_refuse_lokr_conv,
            ),
        ),
        configure=_configure_lokr,
        defaults=_LOKR_DEFAULTS,
        alpha_key="alpha",
        rslora=False,
        bias=False,
    ),
    "loha": PeftMethod(
        method="loha",
        peft_type="LOHA",
        flags={},
        kinds=(
            PeftKind(
                adapter_type=LohaArray,
                layout=_loha_layout,
                new=lambda w, rank, config, dtype, flags: LohaArray(
                    w, rank=rank, key=jr.key(0), dtype=dtype, **_loha_options(config, flags)
                ),
                **_LOHA_LINEAR,
            ),
            PeftKind(
                adapter_type=LohaConvArray,
                layout=_loha_conv_layout,
                new=lambda w, rank, config, dtype, flags: LohaConvArray(
                    w, rank=rank, key=jr.key(0), dtype=dtype, **_loha_options(config, flags)
                ),
                refuse=_refuse_loha_conv,
                to_peft=lambda fields: _tucker_to_peft(fields, ("t1", "t2"), ("w1a", "w2a")),
                from_peft=lambda fields, shape: _tucker_from_peft(
                    fields, shape, ("t1", "t2"), ("w1a", "w2a")
                ),
                **{
                    **_LOHA_LINEAR,
                    "name": "Conv",
                    "layer": eqx.nn.Conv,
                    "tensors": (*_LOHA_LINEAR["tensors"], ("hada_t1", "t1"), ("hada_t2", "t2")),
                    "dims": _loha_conv_dims,
                    "rank_of": lambda fields: (
                        fields["t1"].shape[0] if "t1" in fields else _LOHA_LINEAR["rank_of"](fields)
                    ),
                },
            ),
        ),
        configure=_configure_loha,
        defaults=_LOHA_DEFAULTS,
        alpha_key="alpha",
        rslora=False,
        bias=False,
    ),
}


def _shapes(fields: dict) -> Shapes:
    return {f: tuple(int(s) for s in a.shape) for f, a in fields.items()}


# ---------------------------------------------------------------------------------------
# Reading a config: which keys exist, which values lora_jax honours
# ---------------------------------------------------------------------------------------

# The config keys PEFT 0.21 defines, by peft_type. A key outside these with a value
# that is not empty is refused: lora_jax cannot know what it would change.
_COMMON_KEYS = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "r",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
}
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "LORA": frozenset(
        _COMMON_KEYS
        | {
            "lora_alpha",
            "lora_dropout",
            "fan_in_fan_out",
            "bias",
            "use_rslora",
            "init_lora_weights",
            "megatron_config",
            "megatron_core",
            "trainable_token_indices",
            "loftq_config",
            "eva_config",
            "corda_config",
            "lora_ga_config",
            "use_dora",
            "velora_config",
            "alora_invocation_tokens",
            "use_qalora",
            "qalora_group_size",
            "monteclora_config",
            "layer_replication",
            "runtime_config",
            "lora_bias",
            "target_parameters",
            "use_bdlora",
            "arrow_config",
            "kasa_config",
            "ensure_weight_tying",
        }
    ),
    "LOKR": frozenset(
        _COMMON_KEYS
        | {
            "alpha",
            "rank_dropout",
            "module_dropout",
            "use_effective_conv2d",
            "decompose_both",
            "decompose_factor",
            "rank_dropout_scale",
            "init_weights",
        }
    ),
    "LOHA": frozenset(
        _COMMON_KEYS
        | {
            "alpha",
            "rank_dropout",
            "module_dropout",
            "use_effective_conv2d",
            "init_weights",
        }
    ),
}

# Keys whose values change what the adapter computes in ways lora_jax does not
# reproduce: key -> (is the value fine, what is).
_INITS_KEEPING_BASE = (True, False, "gaussian", "eva", "orthogonal")
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lora_bias": (lambda v: not v, "false"),
    "layer_replication": (lambda v: not v, "null"),
    "target_parameters": (lambda v: not v, "null"),
    "trainable_token_indices": (lambda v: not v, "null"),
    "use_qalora": (lambda v: not v, "false"),
    "alora_invocation_tokens": (lambda v: not v, "null"),
    "use_bdlora": (lambda v: not v, "null"),
    "velora_config": (lambda v: not v, "null"),
    "monteclora_config": (lambda v: not v, "null"),
    "arrow_config": (lambda v: not v, "null"),
    "kasa_config": (lambda v: not v, "null"),
    # These initialisations change the base weights when PEFT loads the adapter
    # (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, MiCA); lora_jax keeps the base as it is.
    "init_lora_weights": (
        lambda v: any(v is ok or (isinstance(ok, str) and v == ok) for ok in _INITS_KEEPING_BASE),
        ", ".join(repr(v) for v in _INITS_KEEPING_BASE),
    ),
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_pattern_map(check):
    def ok(v):
        if v is None:
            return True
        if not isinstance(v, dict):
            return False
        for k, x in v.items():
            try:
                re.compile(k)
            except re.error:
                return False
            if not check(x):
                return False
        return True

    return ok


_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_is_real, "a finite number"),
    "alpha": (_is_real, "a finite number"),
    "rank_pattern": (
        _is_pattern_map(lambda x: _is_int(x) and x > 0),
        "a map from regexes to positive integers",
    ),
    "alpha_pattern": (_is_pattern_map(_is_real), "a map from regexes to numbers"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "lora_dropout": (lambda v: v is None or (_is_real(v) and 0 <= v < 1), "a number in [0, 1)"),
    "rank_dropout": (lambda v: v is None or (_is_real(v) and 0 <= v < 1), "a number in [0, 1)"),
    "module_dropout": (lambda v: v is None or (_is_real(v) and 0 <= v < 1), "a number in [0, 1)"),
    "decompose_both": (lambda v: isinstance(v, bool), "true or false"),
    "decompose_factor": (lambda v: _is_int(v) and (v == -1 or v > 0), "-1 or a positive integer"),
    "rank_dropout_scale": (lambda v: isinstance(v, bool), "true or false"),
    "modules_to_save": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "null or a list of module names",
    ),
}


def _method_for_type(adapter_type: type) -> tuple[PeftMethod, PeftKind]:
    for m in PEFT_METHODS.values():
        for kind in m.kinds:
            if adapter_type is kind.adapter_type:
                return m, kind
    held = ", ".join(
        f"{m.method} ({', '.join(k.name for k in m.kinds)})" for m in PEFT_METHODS.values()
    )
    raise TypeError(
        f"Adapters of type {adapter_type.__name__} have no PEFT format in lora_jax "
        f"(PEFT directories hold {held}); save them with `lora_jax.save_adapter`."
    )


def method_for_config(config: dict, where: str) -> PeftMethod:
    """The method a PEFT config describes, after checking every key and value: an
    unsupported peft_type or variant, an unknown key with a value, or a malformed
    value is a ValueError naming the key and what is valid."""
    peft_type = config.get("peft_type")
    types = sorted({m.peft_type for m in PEFT_METHODS.values()})
    if peft_type not in types:
        raise ValueError(
            f"{where!r} has peft_type {peft_type!r}, which lora_jax does not support; "
            f"supported: {', '.join(types)}."
        )
    for key, (ok, valid) in UNSUPPORTED.items():
        if key in config and not ok(config[key]):
            raise ValueError(
                f"{where!r} sets `{key}={config[key]!r}`, which lora_jax does not "
                f"support (only {valid})."
            )
    for m in PEFT_METHODS.values():
        if m.matches(config):
            break
    else:
        flags = sorted(
            {k for m in PEFT_METHODS.values() if m.peft_type == peft_type for k in m.flags}
        )
        given = ", ".join(f"{k}={config.get(k)!r}" for k in flags)
        raise ValueError(
            f"{where!r} asks for a {peft_type} variant ({given}) that lora_jax does not support."
        )
    known = KNOWN_KEYS[peft_type]
    for key, value in config.items():
        if key not in known and value not in (None, False, {}, [], ""):
            raise ValueError(
                f"{where!r} sets `{key}={value!r}`, a key PEFT's {peft_type} config does "
                "not have (as of PEFT 0.21) and lora_jax does not know; refusing to guess "
                "what it changes. Remove it if it is harmless."
            )
    for key in (m.rank_key, m.alpha_key):
        if key not in config:
            raise ValueError(f"{where!r} lacks `{key}`.")
    for key, (ok, valid) in _VALUES.items():
        if key in config and key in known and not ok(config[key]):
            raise ValueError(f"{where!r} has `{key}={config[key]!r}`; it must be {valid}.")
    return m


# ---------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------


def _check_name_map(name_map) -> Callable[[str], str]:
    if name_map is None:
        return lambda name: name
    if isinstance(name_map, dict):
        for k, v in name_map.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"`name_map` must map str to str, got {k!r}: {v!r}.")
        return lambda name: name_map.get(name, name)
    if callable(name_map):

        def mapped(name):
            out = name_map(name)
            if not isinstance(out, str):
                raise TypeError(f"`name_map({name!r})` must return a str, got {out!r}.")
            return out

        return mapped
    raise TypeError(
        f"`name_map` must be a dict, a callable or None; got {type(name_map).__name__}."
    )


def _split_key(key: str, suffixes, path: str):
    """`base_model.model.<module>.<suffix>` -> (name without the prefix, module,
    suffix), with module and suffix `None` when no adapter suffix matches."""
    if not key.startswith(PREFIX):
        raise ValueError(
            f"Tensor {key!r} in {path!r} does not start with {PREFIX!r}, as PEFT's names do."
        )
    rest = key[len(PREFIX) :]
    suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
    module = rest[: -len(suffix) - 1] if suffix is not None else None
    return rest, module, suffix


def _refuse_suffix(key: str, rest: str, method: PeftMethod, where: str) -> None:
    for suffix, why in method.unsupported.items():
        if rest.endswith("." + suffix):
            raise ValueError(f"Tensor {key!r} in {where!r} is {why}.")


def _other_method_suffix(rest: str, method: PeftMethod) -> PeftMethod | None:
    for m in PEFT_METHODS.values():
        if m is not method and any(rest.endswith("." + s) for s in m.suffixes):
            return m
    return None


def _is_weight(x) -> bool:
    """Adapters and quantised weights are leaves here (one weight each)."""
    return is_adapter(x) or is_quantised(x)


def _module_names(model) -> list[str]:
    """Every module (non-leaf node) name in `model`, parents first."""
    names: dict[str, None] = {}
    for path, _ in jtu.tree_flatten_with_path(model, is_leaf=_is_weight)[0]:
        for i in range(1, len(path)):
            names[path_name(path[:i])] = None
    return list(names)


def _torch_leaf(mapped: Callable[[str], str], name: str) -> str:
    module, _, leaf = name.rpartition(".")
    return f"{mapped(module)}.{leaf}" if module else leaf


def _layers_by_name(model) -> dict[str, Any]:
    is_layer = lambda x: type(x) in LAYERS
    return {
        path_name(p): node
        for p, node in jtu.tree_flatten_with_path(model, is_leaf=is_layer)[0]
        if is_layer(node)
    }


def _pattern_key(name: str, others: Sequence[str]) -> str:
    key = re.escape(name)
    if any(o != name and o.endswith("." + name) for o in others):
        key = "^" + key
    return key


def _expand(name: str, n: int) -> list[str]:
    return [name.replace(INDEX, str(i)) for i in range(n)] if INDEX in name else [name]


class _Resolver:
    """Torch names -> ours: exact names, and templates holding `{i}` for stacked
    modules (`layers.{i}.attn.q` matches `layers.3.attn.q` as index 3)."""

    def __init__(self, pairs: dict[str, str]):
        self.exact: dict[str, str] = {}
        self.templates: list[tuple[re.Pattern, str]] = []
        for torch_name, ours in pairs.items():
            if torch_name.count(INDEX) > 1:
                raise ValueError(
                    f"`name_map` gives {torch_name!r} for {ours!r}; a name holds at most "
                    f"one {INDEX} (one stacking dimension)."
                )
            if INDEX in torch_name:
                regex = re.escape(torch_name).replace(re.escape(INDEX), r"(0|[1-9][0-9]*)")
                self.templates.append((re.compile(regex), ours))
            else:
                self.exact[torch_name] = ours

    def __call__(self, torch_name: str) -> tuple[str, int | None] | None:
        if torch_name in self.exact:
            return self.exact[torch_name], None
        for regex, ours in self.templates:
            m = regex.fullmatch(torch_name)
            if m:
                return ours, int(m.group(1))
        return None


def _inverse(model, mapped) -> _Resolver:
    inverse: dict[str, str] = {}
    for name in _module_names(model):
        torch_name = mapped(name)
        if torch_name in inverse and inverse[torch_name] != name:
            raise ValueError(
                f"`name_map` sends both {inverse[torch_name]!r} and {name!r} to "
                f"{torch_name!r}; it must be one-to-one."
            )
        inverse[torch_name] = name
    return _Resolver(inverse)


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def peft_contents(
    method: PeftMethod,
    layers: dict[str, Layer],
    extra: dict[str, np.ndarray],
    *,
    all_modules: Sequence[str],
    rslora: bool,
    train_bias: str,
    modules_to_save: list[str] | None,
    values: Sequence[Any] = (),
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """PEFT's tensors and config from `{torch module: Layer}` and the extra (bias,
    modules_to_save) tensors by torch name. Checks that PEFT, reading the config,
    builds every layer with exactly the tensors it has."""
    if rslora and not method.rslora:
        raise ValueError(f"`rslora=True` applies to LoRA and DoRA, not {method.method!r}.")
    if train_bias != "none" and not method.bias:
        raise ValueError(
            f"PEFT's {method.peft_type} config has no `bias` option, so `train_bias` must "
            f"be 'none' for {method.method!r} adapters (got {train_bias!r}); a fully "
            "trained module can be saved with `trainable` (PEFT's modules_to_save)."
        )
    tensors: dict[str, np.ndarray] = {}
    entries = {}  # torch module name -> (rank, alpha)
    for module, layer in layers.items():
        suffix_of = {f: s for s, f in layer.kind.tensors}
        for f, arr in layer.fields.items():
            tensors[f"{PREFIX}{module}.{suffix_of[f]}"] = arr
        entries[module] = (layer.rank, snap_alpha(layer.scaling, layer.rank, rslora))
    for key, arr in extra.items():
        tensors[PREFIX + key] = arr
    r = _most_common([rank for rank, _ in entries.values()])
    alpha = _most_common([a for _, a in entries.values()])
    targets = list(entries)
    rank_pattern = {_pattern_key(n, all_modules): rk for n, (rk, _) in entries.items() if rk != r}
    alpha_pattern = {_pattern_key(n, all_modules): a for n, (_, a) in entries.items() if a != alpha}
    if any(o not in targets and any(name_matches(o, t) for t in targets) for o in all_modules):
        # A listed name would also pick up another module as a suffix: use a regex.
        target_modules: Any = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    else:
        target_modules = targets
    config = dict(method.defaults)
    config.update(method.flags)
    config.update(method.configure(list(layers.values()), list(values)))
    config.update(
        {
            "peft_type": method.peft_type,
            method.rank_key: r,
            method.alpha_key: alpha,
            "target_modules": target_modules,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "modules_to_save": modules_to_save,
            "base_model_name_or_path": base_model_name_or_path,
            "task_type": task_type,
            "inference_mode": True,
        }
    )
    if method.rslora:
        config["use_rslora"] = rslora
    if method.bias:
        config["bias"] = train_bias
    for module, layer in layers.items():
        want = layer.kind.layout((), layer.shape, layer.rank, config)
        if _shapes(layer.fields) != want:
            raise ValueError(
                f"PEFT would build module {module!r} with tensors {want}, but the adapter "
                f"holds {_shapes(layer.fields)}; it cannot be saved in PEFT's format."
            )
    return tensors, config


def _layers_of(path: str, value, layer, kind: PeftKind, torch_name: str) -> dict[str, Layer]:
    """`{torch module: Layer}` for one adapter value of `layer`: one entry, or one per
    layer of a stacked value (whose torch name must hold `{i}`)."""
    fields = {f: np.asarray(getattr(value, f)) for f in saved_fields(value) if f in kind.fields}
    scaling = np.asarray(value.scaling, np.float32)
    batch, shape = kind.split(layer, tuple(value._w.shape))
    rank = int(value.rank)
    if not batch:
        if INDEX in torch_name:
            raise ValueError(
                f"`name_map` gives {torch_name!r} for the adapter at {path!r}, but that "
                f"adapter is not stacked; {INDEX} is only for stacked layers."
            )
        return {torch_name: Layer(kind.to_peft(fields), float(scaling), rank, shape, kind)}
    kind.layout(batch, shape, rank, {})  # a kind that cannot be stacked says so
    if len(batch) != 1 or INDEX not in torch_name:
        raise ValueError(
            f"The adapter at {path!r} is stacked (weight shape {tuple(value._w.shape)}); "
            "PEFT stores one matrix per module. Give its module a name with "
            f"{INDEX} in `name_map` (for example {{{path.rpartition('.')[0]!r}: "
            f"'layers.{INDEX}.{path.rpartition('.')[0].rpartition('.')[2]}'}}) to save "
            "one PEFT module per layer"
            + (" (one stacking dimension only)" if len(batch) != 1 else "")
            + ", or save it with `lora_jax.save_adapter`."
        )
    return {
        torch_name.replace(INDEX, str(i)): Layer(
            kind.to_peft({f: a[i] for f, a in fields.items()}), float(scaling[i]), rank, shape, kind
        )
        for i in range(batch[0])
    }


def save_peft(
    directory: str | os.PathLike,
    model: PyTree,
    *,
    name_map: NameMap = None,
    base_model_name_or_path: str | None = None,
    train_bias: TrainBias = "none",
    trainable: Sequence[str] | None = None,
    rslora: bool = False,
    task_type: str | None = None,
    adapter: str | None = None,
) -> None:
    """Saves a model's adapters in PEFT's format, for `peft.PeftModel.from_pretrained`.

    **Arguments:**

    - `directory`: where to write `adapter_config.json` and
        `adapter_model.safetensors` (created if missing; each file written atomically).
    - `model`: a model adapted with one method: LoRA (rsLoRA), DoRA, LoKr or LoHa,
        on any of the layers PEFT adapts with it (LoRA: Linear, Conv1d/2d/3d and
        Embedding; DoRA: Linear and Conv1d/2d/3d; LoHa: Linear, Conv1d/2d; LoKr:
        Linear).
    - `name_map`: maps our module names (`layers.0`, from the PyTree path) to the torch
        model's (`model.layers.0.mlp.up_proj`): a dict (names not in it are kept) or a
        callable. A stacked module (weights with a leading layer axis) maps to a name
        holding `{i}` (`{"blocks.mlp.up": "model.layers.{i}.mlp.up_proj"}`) and is
        saved as one PEFT module per layer.
    - `base_model_name_or_path`, `task_type`: written to the config as they are.
    - `train_bias`: PEFT's `bias` (`"none"`, `"lora_only"`, `"all"`); those biases are
        saved too. LoRA and DoRA only (PEFT's LoKr and LoHa have no `bias`).
    - `trainable`: module names trained in full, saved as PEFT's `modules_to_save`.
    - `rslora`: write `use_rslora=True` (`lora_alpha = scaling·sqrt(r)`). Either way
        PEFT computes the same scaling as the model's.
    - `adapter`: for a model with several stacked adapters
        ([`lora_jax.stack_adapters`][]), the name of the one to save. PEFT keeps one
        directory per adapter: save each to its own.

    Our `a` (`out × r`) is PEFT's `lora_B.weight`, our `b` (`r × in`) its
    `lora_A.weight`; DoRA's `m` is `lora_magnitude_vector`; LoKr's `w1`, `w1_a`, ...
    are `lokr_w1`, `lokr_w1_a`, ... and LoHa's `w1a`, ... are `hada_w1_a`, .... A conv
    adapter's tensors are PEFT's as they are (DoRA's `m` is reshaped to `(1, out, 1,
    ...)`, a conv's bias to `(out,)`); an embedding's `a` and `b` are PEFT's
    `lora_embedding_A` and `lora_embedding_B` transposed. A layer whose PEFT module
    would compute something else (a grouped or dilated conv for LoRA and DoRA, padding
    other than zeros, the `"balanced"` conv form, a `ConvTranspose`) is a ValueError
    naming it. `lora_alpha` (`alpha`) is chosen so that PEFT's scaling equals each layer's scaling
    (quax's scaling of 1 gives `lora_alpha = r`); layers whose rank or alpha differ
    from the most common go to `rank_pattern` / `alpha_pattern`. For LoKr,
    `decompose_both` and `decompose_factor` are those under which PEFT builds each
    layer with the factors it holds.

    !!! Example

        ```python
        import json, os, tempfile
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jr.key(0))
        model = lora.loraify(mlp, rank=2, alpha=4.0, key=jr.key(1))
        directory = tempfile.mkdtemp()
        lora.save_peft(directory, model, name_map=lambda n: "model." + n)
        with open(os.path.join(directory, "adapter_config.json")) as f:
            config = json.load(f)
        assert config["r"] == 2 and config["lora_alpha"] == 4
        ```
    """
    check_path(directory, "directory")
    check_choice(train_bias, "train_bias", ("none", "lora_only", "all"))
    if not isinstance(rslora, bool):
        raise TypeError(f"`rslora` must be a bool, got {rslora!r}.")
    mapped = _check_name_map(name_map)
    if adapter is not None:
        model = select_adapter(model, adapter)
    elif has_stacked_adapters(model):
        raise ValueError(
            f"`model` holds several stacked adapters {list(adapter_names(model))}; a PEFT "
            "directory holds one. Pass `adapter=` to choose which (one directory each)."
        )
    adapters, biases = adapter_entries(model, train_bias=train_bias)
    if not adapters:
        raise ValueError("`model` has no adapters to save; adapt it first with `lora_jax.loraify`.")
    _, saved = adapter_entries(model, trainable=trainable) if trainable else ({}, {})
    layers = _layers_by_name(model)

    method = None
    layers_out: dict[str, Layer] = {}
    stacks: dict[str, int] = {}  # our module -> number of stacked layers
    for path, value in adapters.items():
        module, _, fieldname = path.rpartition(".")
        layer = layers.get(module)
        if layer is None or LAYERS[type(layer)].field != fieldname:
            raise ValueError(
                f"The adapter at {path!r} is not the weight of a layer PEFT knows "
                f"({', '.join(t.__name__ for t in LAYERS)}); PEFT cannot name it."
            )
        m, kind = _method_for_type(type(value))
        if method is not None and m is not method:
            raise ValueError(
                f"`model` mixes {method.method!r} and {m.method!r} adapters; a PEFT "
                "adapter directory holds one method."
            )
        method = m
        why = kind.refuse(layer)
        if why is None and getattr(value, "form", "peft") != "peft":
            why = f"its conv_form is {value.form!r}, but PEFT's conv LoRA is the 'peft' form"
        if why is not None:
            raise ValueError(
                f"The adapter at {path!r} has no PEFT form: {why}. Save it with "
                "`lora_jax.save_adapter`."
            )
        batch, _ = kind.split(layer, tuple(value._w.shape))
        if batch:
            stacks[module] = batch[0]
        for name, one in _layers_of(path, value, layer, kind, mapped(module)).items():
            if name in layers_out:
                raise ValueError(
                    f"Two adapters of `model` would be saved as PEFT module {name!r}; check "
                    "`name_map`."
                )
            layers_out[name] = one
    assert method is not None
    lengths = set(stacks.values()) or {1}
    all_modules = [t for n in _module_names(model) for k in lengths for t in _expand(mapped(n), k)]
    extra: dict[str, np.ndarray] = {}

    def add_extra(name: str, key: str, leaf) -> None:
        arr = _torch_bias(layers, name, np.asarray(leaf))
        if INDEX in key:
            module = name.rpartition(".")[0]
            n = stacks.get(module)
            if n is None or arr.ndim == 0 or arr.shape[0] != n:
                raise ValueError(
                    f"`name_map` gives {key!r} for {name!r}, which is not stacked along "
                    f"its first axis (shape {arr.shape})."
                )
            extra.update({key.replace(INDEX, str(i)): arr[i] for i in range(n)})
        else:
            extra[key] = arr

    adapted_modules = {path.rpartition(".")[0] for path in adapters}
    for name, leaf in biases.items():
        module = name.rpartition(".")[0]
        key = (
            f"{mapped(module)}.base_layer.bias"
            if module in adapted_modules
            else _torch_leaf(mapped, name)
        )
        add_extra(name, key, leaf)
    modules_to_save = []
    for t in trainable or ():
        hits = [n for n in _module_names(model) if name_matches(n, t)]
        for n in hits:
            for k in lengths:
                for torch_name in _expand(mapped(n), k):
                    if torch_name not in modules_to_save:
                        modules_to_save.append(torch_name)
    for name, leaf in saved.items():
        add_extra(name, _torch_leaf(mapped, name), leaf)
    tensors, config = peft_contents(
        method,
        layers_out,
        extra,
        all_modules=all_modules,
        rslora=rslora,
        train_bias=train_bias,
        modules_to_save=modules_to_save or None,
        values=list(adapters.values()),
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    write_peft_dir(directory, tensors, config)


def _torch_bias(layers: dict[str, Any], name: str, arr: np.ndarray) -> np.ndarray:
    """A conv's bias as torch holds it: Equinox's `(out, 1, ...)` is torch's `(out,)`."""
    owner, _, leaf = name.rpartition(".")
    layer = layers.get(owner)
    if leaf == "bias" and isinstance(layer, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
        return arr.reshape(arr.shape[: arr.ndim - layer.num_spatial_dims])
    return arr


def write_peft_dir(directory, tensors: dict[str, np.ndarray], config: dict) -> None:
    """Writes both files, each atomically. Both are encoded before either is
    written, so an error in either leaves the directory as it was."""
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory!r} is a file; a PEFT adapter is a directory.")
    weights = encode(tensors, {"format": "pt"})
    text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), weights)
    atomic_write(os.path.join(directory, CONFIG_NAME), text)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def read_peft_dir(directory) -> tuple[dict, dict[str, np.ndarray]]:
    """`(config, tensors)` of a PEFT adapter directory, with clear errors."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise ValueError(
                f"{directory!r} is a file; a PEFT adapter is a directory holding {CONFIG_NAME} "
                f"and {WEIGHTS_NAME}."
            )
        raise FileNotFoundError(f"No PEFT adapter directory at {directory!r}.")
    cpath = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(cpath):
        raise FileNotFoundError(
            f"{directory!r} has no {CONFIG_NAME}; is it a PEFT adapter directory?"
        )
    try:
        with open(cpath, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cpath!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cpath!r} does not hold a JSON object.")
    wpath = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.exists(wpath):
        if os.path.exists(os.path.join(directory, "adapter_model.bin")):
            raise ValueError(
                f"{directory!r} holds adapter_model.bin (a pickle), which lora_jax never "
                "loads; convert it to adapter_model.safetensors with PEFT first."
            )
        raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME}.")
    tensors, _ = read_safetensors(wpath)
    return config, tensors


def _lookup(name: str, patterns: dict, default):
    for key, value in patterns.items():
        if pattern_key_matches(name, key):
            return value
    return default


def _rank_alpha(config: dict, method: PeftMethod, module: str) -> tuple[int, float]:
    r = _lookup(module, config.get("rank_pattern") or {}, config[method.rank_key])
    alpha = _lookup(module, config.get("alpha_pattern") or {}, config[method.alpha_key])
    return int(r), float(alpha)


def check_layer(
    method: PeftMethod,
    kind: PeftKind,
    config: dict,
    module: str,
    fields: dict,
    shape: tuple[int, ...] | None,
    where: str,
) -> tuple[int, float]:
    """Checks one PEFT module's tensors (by our field names, in PEFT's layout) against
    the config and (when known) the weight's shape: `(rank, scaling)`."""
    rank, alpha = _rank_alpha(config, method, module)
    suffix_of = {f: s for s, f in kind.tensors}
    got = kind.rank_of(fields)
    if got is not None and got != rank:
        raise ValueError(
            f"{where!r}: module {module!r} has rank {got}, but {CONFIG_NAME} says {rank}."
        )
    if shape is None:
        try:
            shape = kind.dims(fields)
        except (KeyError, IndexError):
            missing = [suffix_of[f] for f in kind.fields if f not in fields]
            raise ValueError(
                f"{where!r}: module {module!r} lacks tensors ({', '.join(missing)} among them)."
            ) from None
    try:
        want = kind.layout((), shape, rank, config)
    except ValueError as e:
        raise ValueError(f"{where!r}: module {module!r}: {e}") from None
    weight = f"{kind.name} weight {tuple(shape)}"
    for f in want:
        if f not in fields:
            raise ValueError(f"{where!r} lacks {PREFIX}{module}.{suffix_of[f]}.")
    for f, arr in fields.items():
        if f not in want:
            raise ValueError(
                f"{where!r} has {PREFIX}{module}.{suffix_of[f]}, which PEFT does not build "
                f"for a {weight} at rank {rank} with this {CONFIG_NAME} "
                f"(it builds {', '.join(suffix_of[x] for x in want)})."
            )
        if tuple(arr.shape) != want[f]:
            raise ValueError(
                f"{where!r}: {PREFIX}{module}.{suffix_of[f]} has shape {tuple(arr.shape)}, "
                f"but a {weight} at rank {rank} needs {want[f]}."
            )
    rslora = bool(config.get("use_rslora", False)) and method.rslora
    return rank, peft_scaling(alpha, rank, rslora)


def _gather(parts: dict[int | None, Any], n: int | None, what: str, where: str) -> list:
    """The entries of one (maybe stacked) place in index order: `parts[None]` alone
    for an unstacked one, `parts[0..n-1]` for a stack of `n`."""
    if n is None:
        if set(parts) != {None}:
            raise ValueError(f"{where!r} has {what} both for one matrix and for stacked layers.")
        return [parts[None]]
    if set(parts) != set(range(n)):
        have = sorted(i for i in parts if i is not None)
        raise ValueError(
            f"{where!r} has {what} for layers {have} of a stack of {n}; loading into "
            "stacked weights needs every layer."
        )
    return [parts[i] for i in range(n)]


def load_peft(
    directory: str | os.PathLike,
    model: PyTree,
    *,
    name_map: NameMap = None,
    dtype=None,
    adapter: str | None = None,
) -> PyTree:
    """Loads a PEFT adapter directory (`save_pretrained`'s output) into a model.

    **Arguments:**

    - `directory`: holds `adapter_config.json` and `adapter_model.safetensors`.
    - `model`: the base model (or one already adapted at the same places: its
        adapters' factors are replaced, their other settings kept).
    - `name_map`: as for [`lora_jax.save_peft`][]: maps our module names to the torch
        model's; a stacked module maps to a name holding `{i}`, and PEFT's modules for
        layers `0, 1, ...` are stacked into it.
    - `dtype`: the factors' dtype; defaults to the file's.
    - `adapter`: for a model with stacked adapters ([`lora_jax.stack_adapters`][]),
        the name under which to put this (LoRA) adapter: it replaces the adapter of
        that name, or is added (inactive) if there is none.

    **Returns:**

    The adapted model. Each adapted layer's weight becomes the method's value for its
    layer: a [`lora_jax.LoraArray`][] (`a = lora_B`, `b = lora_A`), a
    `lora_jax.DoraArray` (`m = lora_magnitude_vector`), a `lora_jax.LokrArray`
    or a `lora_jax.LohaArray` for a Linear; a `lora_jax.LoraConvArray`,
    `lora_jax.DoraConvArray` or `lora_jax.LohaConvArray` for a Conv; a
    `lora_jax.LoraEmbeddingArray` for an Embedding; with PEFT's scaling (`alpha/r`,
    or `/sqrt(r)` with `use_rslora`; `rank_pattern`/`alpha_pattern` honoured). Saved biases and
    `modules_to_save` leaves replace the model's. Everything (the config's keys and
    values, every tensor's name and shape) is checked before the new model is built:
    an unsupported `peft_type`, an unknown config key, or a tensor for a module the
    model lacks raises a ValueError naming it.

    !!! Example

        ```python
        import tempfile
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        mlp = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jr.key(0))
        tuned = lora.loraify(mlp, rank=2, key=jr.key(1), init="gaussian")
        directory = tempfile.mkdtemp()
        lora.save_peft(directory, tuned)
        loaded = lora.load_peft(directory, mlp)  # the plain base model
        x = jnp.ones(4)
        assert jnp.allclose(quax.quaxify(loaded)(x), quax.quaxify(tuned)(x), atol=1e-6)
        ```
    """
    directory = check_path(directory, "directory")
    config, tensors = read_peft_dir(directory)
    cpath = os.path.join(directory, CONFIG_NAME)
    method = method_for_config(config, cpath)
    if dtype is not None:
        dtype = check_dtype(dtype, None)
    if adapter is not None:
        if not isinstance(adapter, str):
            raise TypeError(f"`adapter` must be an adapter's name (str), got {adapter!r}.")
        if not has_stacked_adapters(model):
            raise ValueError(
                f"`adapter={adapter!r}` puts the adapter into a stack of adapters, but "
                "`model` has none (build one with `lora_jax.stack_adapters`)."
            )
        if method.method != "lora":
            raise ValueError(
                f"{cpath!r} holds a {method.method!r} adapter; stacked adapters are LoRA only."
            )
        stacked = model
        model = jtu.tree_map(
            lambda x: x._w if isinstance(x, MultiLoraArray) else x, model, is_leaf=is_adapter
        )
    elif has_stacked_adapters(model):
        raise ValueError(
            f"`model` holds stacked adapters {list(adapter_names(model))}; pass `adapter=` "
            "to say which one this directory replaces or adds."
        )
    mapped = _check_name_map(name_map)
    modules = _inverse(model, mapped)
    layers = _layers_by_name(model)
    leaves = {
        path_name(p): leaf for p, leaf in jtu.tree_flatten_with_path(model, is_leaf=_is_weight)[0]
    }
    leaf_names = _Resolver({_torch_leaf(mapped, n): n for n in leaves})
    wpath = os.path.join(directory, WEIGHTS_NAME)
    after_map = " (after `name_map`)" if name_map is not None else ""

    suffixes = method.suffixes
    factors: dict[
        str, dict[int | None, tuple[str, dict]]
    ] = {}  # ours -> index -> (torch module, {PEFT suffix: array})
    plain: dict[str, dict[int | None, np.ndarray]] = {}  # our leaf -> index -> array
    for key, arr in tensors.items():
        rest, module, suffix = _split_key(key, suffixes, wpath)
        if suffix is not None:
            hit = modules(module)
            if hit is None or hit[0] not in layers:
                raise ValueError(
                    f"{wpath!r} has a {method.method} adapter for module {module!r}, which "
                    f"`model` does not have{after_map}. Layers that can be adapted: "
                    f"{', '.join(repr(mapped(n)) for n in list(layers)[:8])}."
                )
            ours, i = hit
            factors.setdefault(ours, {}).setdefault(i, (module, {}))[1][suffix] = arr
            continue
        _refuse_suffix(key, rest, method, wpath)
        other = _other_method_suffix(rest, method)
        if other is not None:
            raise ValueError(
                f"Tensor {key!r} in {wpath!r} belongs to a {other.method} adapter, but "
                f"{CONFIG_NAME} describes a {method.method} adapter."
            )
        if rest.endswith(".base_layer.bias"):
            rest = rest[: -len(".base_layer.bias")] + ".bias"
        hit = leaf_names(rest)
        if hit is None:
            raise ValueError(
                f"Tensor {key!r} in {wpath!r} is for {rest!r}, which `model` does not "
                "have" + (" (after `name_map`)." if name_map is not None else "; pass `name_map`?")
            )
        ours, i = hit
        like = leaves[ours]
        want = tuple(like.shape) if i is None else tuple(like.shape[1:])
        if i is not None and (len(like.shape) == 0 or i >= like.shape[0]):
            raise ValueError(
                f"Tensor {key!r} in {wpath!r} is layer {i} of {ours!r}, which has "
                f"{like.shape[0] if like.shape else 0}."
            )
        if tuple(arr.shape) == _torch_bias(layers, ours, np.broadcast_to(0, want)).shape:
            arr = arr.reshape(want)  # a conv's bias, `(out,)` in torch
        if tuple(arr.shape) != want:
            raise ValueError(
                f"Tensor {key!r} in {wpath!r} has shape {tuple(arr.shape)}, but `model`'s "
                f"{ours!r} has {want}."
            )
        plain.setdefault(ours, {})[i] = arr
    if not factors:
        raise ValueError(f"{wpath!r} holds no {method.method} tensors.")

    # Every check, before anything is built.
    plans = []
    for ours, parts in factors.items():
        layer = layers[ours]
        weight_field = LAYERS[type(layer)].field
        current = getattr(layer, weight_field)
        base = current._w if is_adapter(current) else current
        kind = method.kind_of_layer(layer)
        why = (
            f"PEFT's {method.method} adapters in lora_jax are for "
            f"{', '.join(k.name for k in method.kinds)} layers"
            if kind is None
            else kind.refuse(layer)
        )
        if why is not None:
            raise ValueError(
                f"{wpath!r} has an adapter for {ours!r}, an {type(layer).__name__}, which "
                f"lora_jax cannot load: {why}."
            )
        batch, shape = kind.split(layer, tuple(base.shape))
        stacked_parts = any(i is not None for i in parts)
        if stacked_parts and len(batch) != 1:
            raise ValueError(
                f"`name_map` maps {ours!r} to a name with {INDEX}, but its weight has shape "
                f"{tuple(base.shape)}, not one stack of matrices."
            )
        if not stacked_parts and batch:
            raise ValueError(
                f"{wpath!r} has one matrix for module {parts[None][0]!r}, but `model`'s "
                f"{ours!r} is stacked (weight shape {tuple(base.shape)}); map it to a name "
                f"with {INDEX} in `name_map` (`{{{ours!r}: 'layers.{INDEX}...'}}`)."
            )
        per_layer = _gather(parts, batch[0] if stacked_parts else None, "adapter tensors", wpath)
        own = dict(kind.tensors)
        ranks, scalings, converted = [], [], []
        for module, by_suffix in per_layer:
            for suffix in by_suffix:
                if suffix not in own:
                    raise ValueError(
                        f"{wpath!r} has {PREFIX}{module}.{suffix}, which PEFT does not build "
                        f"for {ours!r}, a {kind.name} layer."
                    )
            fields = {own[suffix]: arr for suffix, arr in by_suffix.items()}
            rank, scaling = check_layer(method, kind, config, module, fields, shape, wpath)
            ranks.append(rank)
            scalings.append(scaling)
            converted.append(kind.from_peft(fields, shape))
        if len(set(ranks)) > 1:
            raise ValueError(
                f"{wpath!r} has ranks {ranks} for the layers stacked in {ours!r}; a stack "
                "holds one rank."
            )
        if batch:
            try:
                kind.layout(batch, shape, ranks[0], config)
            except ValueError as e:
                raise ValueError(
                    f"{wpath!r} cannot be loaded into the stacked {ours!r}: {e}"
                ) from None
        arrays = {
            f: np.stack([fields[f] for fields in converted]) if stacked_parts else converted[0][f]
            for f in converted[0]
        }
        scaling = np.asarray(scalings if stacked_parts else scalings[0], np.float32)
        plans.append((ours, weight_field, current, base, kind, ranks[0], arrays, scaling))
    if adapter is not None:
        places = {f"{ours}.{field}" for ours, field, *_ in plans}
        stack_places = {
            path_name(p)
            for p, x in jtu.tree_flatten_with_path(stacked, is_leaf=is_adapter)[0]
            if isinstance(x, MultiLoraArray)
        }
        if places != stack_places:
            raise ValueError(
                f"{wpath!r} adapts {sorted(p.rpartition('.')[0] for p in places)}, but "
                "`model`'s stacked adapters are at "
                f"{sorted(p.rpartition('.')[0] for p in stack_places)}; "
                "an adapter put into the stack must adapt the same places."
            )
        if plain:
            raise ValueError(
                f"{wpath!r} also holds {sorted(plain)} (biases or modules_to_save), which "
                "stacked adapters cannot hold per adapter; load it without `adapter=`."
            )
    plain_arrays = {}
    for ours, parts in plain.items():
        like = leaves[ours]
        stacked_parts = any(i is not None for i in parts)
        got = _gather(
            parts, like.shape[0] if stacked_parts else None, f"tensors of {ours!r}", wpath
        )
        plain_arrays[ours] = (np.stack(got) if stacked_parts else got[0]).astype(like.dtype)

    # Building.
    replacements: dict[str, Any] = {}
    for ours, weight_field, current, base, kind, rank, arrays, scaling in plans:
        replacements[f"{ours}.{weight_field}"] = _build(
            kind, current, base, rank, arrays, scaling, config, dtype
        )

    def swap(path, leaf):
        name = path_name(path)
        if name in replacements:
            return replacements[name]
        if name in plain_arrays:
            return _to_device(plain_arrays[name], leaf)
        return leaf

    out = jtu.tree_map_with_path(swap, model, is_leaf=_is_weight)
    if adapter is not None:
        out = put_adapter(stacked, adapter, out)
    return out


def _build(
    kind: PeftKind,
    current,
    base,
    rank: int,
    arrays: dict,
    scaling: np.ndarray,
    config: dict,
    dtype,
):
    """The adapter value for one place: `current` (the model's adapter there) with its
    arrays replaced when it has the same structure, else a new value of the method
    (keeping `current`'s `stop_gradient`/`allow_materialise`)."""
    dtype = dtype if dtype is not None else next(iter(arrays.values())).dtype
    arrays = {f: np.asarray(a).astype(dtype) for f, a in arrays.items()}
    same = (
        type(current) is kind.adapter_type
        and set(saved_fields(current)) - {"scaling"} == set(arrays)
        and all(getattr(current, f).shape == a.shape for f, a in arrays.items())
        and not getattr(current, "transposed", False)
        and getattr(current, "axis", -2) == -2
    )
    if same:
        value = current
        new = {f: _to_device(a, getattr(current, f)) for f, a in arrays.items()}
    else:
        flags = {}
        if is_adapter(current):
            flags = {
                "stop_gradient": current.stop_gradient,
                "allow_materialise": current.allow_materialise,
            }
            if hasattr(current, "conv_path"):  # a conv adapter of another structure
                flags["conv_path"] = current.conv_path
        value = kind.new(base, rank, config, dtype, flags)
        new = {f: jnp.asarray(a) for f, a in arrays.items()}
    names = list(new)
    return eqx.tree_at(
        lambda v: (v._w, v.scaling, *(getattr(v, f) for f in names)),
        value,
        (base, jnp.asarray(scaling), *(new[f] for f in names)),
    )


# ---------------------------------------------------------------------------------------
# Converting files without a model
# ---------------------------------------------------------------------------------------


def lora_jax_file_to_peft(src, dst, *, rslora: bool = False, adapter: str | None = None) -> None:
    """Rewrites a [`lora_jax.save_adapter`][] file as a PEFT adapter directory. An
    adapter saved at `<module>.weight` becomes PEFT's module `<module>`. From a file of
    stacked adapters, `adapter` names the one to write."""
    tensors, metadata, info, extras = read_adapter_file(src)
    where = os.fspath(src)
    trainable = json.loads(metadata.get("trainable", "null"))
    train_bias = metadata.get("train_bias", "none")
    methods = {e["method"] for e in info.values()}
    if methods == {"multi_lora"}:
        names = json.loads(metadata.get("adapter_names", "[]"))
        if adapter is None:
            raise ValueError(
                f"{where!r} holds stacked adapters {names}; a PEFT directory holds one. "
                "Choose one (`--adapter NAME`)."
            )
        if adapter not in names:
            raise ValueError(f"`adapter` {adapter!r} is not in {where!r}; it holds {names}.")
        tensors, info = _pick_adapter(tensors, info, adapter)
        methods = {"lora"}
    elif adapter is not None:
        raise ValueError(f"{where!r} holds no stacked adapters; leave `adapter` out.")
    by_format = {
        FORMATS[kind.adapter_type].method: (m, kind)
        for m in PEFT_METHODS.values()
        for kind in m.kinds
    }
    unknown = sorted(methods - set(by_format))
    peft_methods = {by_format[f][0].method for f in methods if f in by_format}
    if unknown or len(peft_methods) != 1:
        raise ValueError(
            f"{where!r} holds {sorted(methods)} adapters; a PEFT directory holds one "
            f"method, with the formats {sorted(by_format)}."
        )
    method = PEFT_METHODS[peft_methods.pop()]
    layers = {}
    for path in info:
        module = path.rpartition(".")[0]
        kind = by_format[info[path]["method"]][1]
        fields = {f: tensors[f"{path}.{f}"] for f in kind.fields if f"{path}.{f}" in tensors}
        scaling = tensors[f"{path}.scaling"]
        if scaling.ndim != 0:
            raise ValueError(
                f"The adapter at {path!r} in {where!r} is stacked (scaling shape "
                f"{scaling.shape}); PEFT stores one matrix per module. Load the file into "
                "its model and save with `lora_jax.save_peft(..., name_map=...)`, mapping "
                f"the stacked module to a name with {INDEX}."
            )
        try:
            fields = kind.to_peft(fields)
            shape = tuple(info[path].get("shape") or kind.dims(fields))
        except (KeyError, IndexError, AttributeError):
            raise ValueError(
                f"{where!r}: the {method.method} adapter at {path!r} lacks tensors."
            ) from None
        rank = int(info[path].get("rank", kind.rank_of(fields) or 0))
        layers[module] = Layer(fields, float(scaling), rank, shape, kind)
    extra = {}
    for name in extras:
        owner = name.rpartition(".")[0]
        arr = tensors[name]
        weight = tensors.get(f"{owner}.weight")
        conv = (owner in layers and layers[owner].kind.layer is eqx.nn.Conv) or (
            weight is not None and weight.ndim > 2
        )
        if name.endswith(".bias") and conv:
            arr = arr.reshape(-1)  # Equinox's conv bias `(out, 1, ...)` is torch's `(out,)`
        if name.endswith(".bias") and owner in layers and train_bias != "none":
            extra[owner + ".base_layer.bias"] = arr
        else:
            extra[name] = arr
    out_tensors, config = peft_contents(
        method,
        layers,
        extra,
        all_modules=sorted(layers),
        rslora=rslora,
        train_bias=train_bias,
        modules_to_save=trainable,
    )
    write_peft_dir(dst, out_tensors, config)


def _pick_adapter(tensors, info, name):
    """One adapter of a stacked-adapters file, as the tensors of a LoRA file."""
    out, picked = {}, {}
    for path, entry in info.items():
        names, ranks = entry.get("names"), entry.get("ranks")
        if (
            not isinstance(names, list)
            or not isinstance(ranks, list)
            or name not in names
            or len(ranks) != len(names)
        ):
            raise ValueError(f"The stacked adapters at {path!r} are {names!r}, without {name!r}.")
        i = names.index(name)
        r = int(ranks[i])
        out[f"{path}.a"] = tensors[f"{path}.a"][i][..., :r]
        out[f"{path}.b"] = tensors[f"{path}.b"][i][..., :r, :]
        out[f"{path}.scaling"] = tensors[f"{path}.scaling"][i]
        picked[path] = {"method": "lora", "rank": r}
    for key, arr in tensors.items():
        if not any(key.startswith(p + ".") for p in info):
            out[key] = arr
    return out, picked


def _one_or_mixed(methods: list[str]) -> str:
    return methods[0] if len(set(methods)) == 1 else "mixed"


def peft_to_lora_jax_file(src, dst) -> None:
    """Rewrites a PEFT adapter directory as a [`lora_jax.save_adapter`][] file; PEFT's
    module `<module>` becomes our adapter at `<module>.weight`. Every module's tensors
    are checked against the config first."""
    from . import __version__

    config, tensors = read_peft_dir(src)
    where = os.fspath(src)
    cpath = os.path.join(where, CONFIG_NAME)
    method = method_for_config(config, cpath)
    suffixes = method.suffixes
    modules: dict[str, dict[str, np.ndarray]] = {}  # module -> {PEFT suffix: array}
    out: dict[str, np.ndarray] = {}
    extras = []
    for key, arr in tensors.items():
        rest, module, suffix = _split_key(key, suffixes, where)
        if suffix is not None:
            modules.setdefault(module, {})[suffix] = arr
            continue
        _refuse_suffix(key, rest, method, where)
        other = _other_method_suffix(rest, method)
        if other is not None:
            raise ValueError(
                f"Tensor {key!r} in {where!r} belongs to a {other.method} adapter, but "
                f"{CONFIG_NAME} describes a {method.method} adapter."
            )
        if rest.endswith(".base_layer.bias"):
            rest = rest[: -len(".base_layer.bias")] + ".bias"
        out[rest] = arr
        extras.append(rest)
    if not modules:
        raise ValueError(f"{where!r} holds no {method.method} tensors.")
    info: dict[str, dict] = {}
    kernel_ndim = {}  # conv module -> its kernel's number of dimensions
    for module, by_suffix in modules.items():
        kind = method.kind_of_tensors(by_suffix)
        own = dict(kind.tensors)
        fields = {own[suffix]: arr for suffix, arr in by_suffix.items() if suffix in own}
        if len(fields) != len(by_suffix):
            raise ValueError(
                f"{where!r}: module {module!r} mixes the tensors of several layer kinds "
                f"({', '.join(sorted(by_suffix))})."
            )
        rank, scaling = check_layer(method, kind, config, module, fields, None, where)
        path = f"{module}.weight"
        for f, arr in kind.from_peft(fields, kind.dims(fields)).items():
            out[f"{path}.{f}"] = arr
        s = np.asarray(scaling, np.float32)
        out[f"{path}.scaling"] = s
        info[path] = {
            "method": FORMATS[kind.adapter_type].method,
            "rank": rank,
            "scaling": float(s),
        }
        if kind.adapter_type in (LokrConvArray, LohaConvArray):  # formats with the shape
            info[path]["shape"] = list(kind.dims(fields))
        if kind.layer is eqx.nn.Conv:
            kernel_ndim[module] = len(kind.dims(fields))
    for name in extras:
        owner, _, leaf = name.rpartition(".")
        weight = out.get(f"{owner}.weight")
        ndim = kernel_ndim.get(owner, weight.ndim if weight is not None else 2)
        if leaf == "bias" and ndim > 2 and out[name].ndim == 1:
            out[name] = out[name].reshape(-1, *(1,) * (ndim - 2))  # Equinox's conv bias
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "lora_jax_version": __version__,
        "method": _one_or_mixed([e["method"] for e in info.values()]),
        "rank": json.dumps(_most_common([e["rank"] for e in info.values()])),
        "scaling": json.dumps(_most_common([e["scaling"] for e in info.values()])),
        "targets": json.dumps(list(info)),
        "adapters": json.dumps(info),
        "extras": json.dumps(extras),
        "train_bias": config.get("bias", "none") if method.bias else "none",
        "trainable": json.dumps(config.get("modules_to_save")),
    }
    write_safetensors(dst, out, metadata)
