"""PEFT's own adapter format: a directory with `adapter_config.json` and
`adapter_model.safetensors`, readable by `peft.PeftModel.from_pretrained`.

PEFT names a tensor `base_model.model.<module>.<suffix>`, where `<module>` is the
torch module's dotted name and `<suffix>` depends on the method (`lora_A.weight`,
`lora_B.weight` for LoRA). Each method is a row of `PEFT_METHODS`: its PEFT type, the
config flags that select it, and which PEFT suffix holds which field of our value.
"""

import json
import math
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

from ._base import as_scaling, is_adapter
from ._filters import TrainBias
from ._io import _most_common, _to_device, adapter_entries, atomic_write, read_safetensors, write_safetensors
from ._lora import LoraArray
from ._loraify import LAYERS
from ._targets import name_matches, path_name, pattern_key_matches
from ._validate import check_choice


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

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


@dataclass(frozen=True)
class PeftMethod:
    """One adapter method as PEFT stores it.

    - `method`: our name (`"lora"`).
    - `peft_type`: PEFT's `peft_type` (`"LORA"`).
    - `adapter_type`: our value type.
    - `flags`: config entries that select this method among those of one `peft_type`
        (`{"use_dora": False}`; DoRA is `{"use_dora": True}`), written on save.
    - `tensors`: `(PEFT suffix, our field)` pairs, PEFT's array equal to our field.
    - `rank_key`, `alpha_key`: PEFT's names for the rank and alpha (`r`,
        `lora_alpha`).
    - `build`: `(weight, fields, scaling, like) -> value`, our value from a base weight,
        the factor arrays by field name and the scaling; `like` is an adapter already in
        the model at that place (its flags are kept), or `None`.
    """

    method: str
    peft_type: str
    adapter_type: type
    flags: dict[str, Any]
    tensors: tuple[tuple[str, str], ...]
    build: Callable[..., Any]
    rank_key: str = "r"
    alpha_key: str = "lora_alpha"
    defaults: dict[str, Any] = field(default_factory=dict)

    def matches(self, config: dict) -> bool:
        return config.get("peft_type") == self.peft_type and all(
            config.get(k, v if not v else None) == v for k, v in self.flags.items()
        )


def _build_lora(weight, fields, scaling, like):
    a, b = fields["a"], fields["b"]
    value = like if like is not None else LoraArray(
        weight, rank=a.shape[-1], key=jr.key(0), dtype=a.dtype
    )
    return eqx.tree_at(
        lambda v: (v._w, v.a, v.b, v.scaling),
        value,
        (weight, jnp.asarray(a), jnp.asarray(b), as_scaling(scaling)),
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

# method name -> how PEFT stores it. Other methods add rows (DoRA: peft_type "LORA",
# flags {"use_dora": True}, plus ("lora_magnitude_vector", "magnitude")).
PEFT_METHODS: dict[str, PeftMethod] = {
    "lora": PeftMethod(
        method="lora",
        peft_type="LORA",
        adapter_type=LoraArray,
        flags={"use_dora": False},
        tensors=(("lora_A.weight", "b"), ("lora_B.weight", "a")),
        build=_build_lora,
        defaults=_LORA_DEFAULTS,
    ),
}

# Config entries whose non-default values lora_jax cannot honour: key -> accepted values.
UNSUPPORTED: dict[str, tuple] = {
    "lora_bias": (False, None),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False),
}


def _method_for_type(value) -> PeftMethod:
    for m in PEFT_METHODS.values():
        if type(value) is m.adapter_type:
            return m
    raise TypeError(
        f"Adapters of type {type(value).__name__} have no PEFT format in lora_jax; "
        "add a row to `lora_jax._peft.PEFT_METHODS`."
    )


def method_for_config(config: dict, where: str) -> PeftMethod:
    peft_type = config.get("peft_type")
    types = sorted({m.peft_type for m in PEFT_METHODS.values()})
    if peft_type not in types:
        raise ValueError(
            f"{where!r} has peft_type {peft_type!r}, which lora_jax does not support; "
            f"supported: {', '.join(types)}."
        )
    for m in PEFT_METHODS.values():
        if m.matches(config):
            break
    else:
        flags = sorted({k for m in PEFT_METHODS.values() if m.peft_type == peft_type for k in m.flags})
        given = ", ".join(f"{k}={config.get(k)!r}" for k in flags)
        raise ValueError(
            f"{where!r} asks for a {peft_type} variant ({given}) that lora_jax does not "
            "support yet."
        )
    for key, ok in UNSUPPORTED.items():
        if key in config and config[key] not in ok:
            raise ValueError(
                f"{where!r} sets `{key}={config[key]!r}`, which lora_jax does not "
                f"support (only {ok[0]!r})."
            )
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
    raise TypeError(f"`name_map` must be a dict, a callable or None; got {type(name_map).__name__}.")


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


def _module_names(model) -> list[str]:
    """Every module (non-leaf node) name in `model`, parents first."""
    names: dict[str, None] = {}
    for path, _ in jtu.tree_flatten_with_path(model, is_leaf=is_adapter)[0]:
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


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def peft_contents(
    method: PeftMethod,
    layers: dict[str, tuple[dict[str, np.ndarray], float]],
    extra: dict[str, np.ndarray],
    *,
    all_modules: Sequence[str],
    rslora: bool,
    train_bias: str,
    modules_to_save: list[str] | None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """PEFT's tensors and config from `{torch module: (fields, scaling)}` and the extra
    (bias, modules_to_save) tensors by torch name."""
    tensors: dict[str, np.ndarray] = {}
    entries = {}  # torch module name -> (rank, alpha)
    field_to_suffix = {f: s for s, f in method.tensors}
    for module, (fields, scaling) in layers.items():
        for f, arr in fields.items():
            tensors[f"{PREFIX}{module}.{field_to_suffix[f]}"] = arr
        rank = int(fields["a"].shape[-1])
        entries[module] = (rank, snap_alpha(scaling, rank, rslora))
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
    config.update(
        {
            "peft_type": method.peft_type,
            method.rank_key: r,
            method.alpha_key: alpha,
            "target_modules": target_modules,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_rslora": rslora,
            "bias": train_bias,
            "modules_to_save": modules_to_save,
            "base_model_name_or_path": base_model_name_or_path,
            "task_type": task_type,
            "inference_mode": True,
        }
    )
    return tensors, config


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
) -> None:
    """Saves a model's adapters in PEFT's format, for `peft.PeftModel.from_pretrained`.

    **Arguments:**

    - `directory`: where to write `adapter_config.json` and
        `adapter_model.safetensors` (created if missing; each file written atomically).
    - `model`: an adapted model.
    - `name_map`: maps our module names (`layers.0`, from the PyTree path) to the torch
        model's (`model.layers.0.mlp.up_proj`): a dict (names not in it are kept) or a
        callable.
    - `base_model_name_or_path`, `task_type`: written to the config as they are.
    - `train_bias`: PEFT's `bias` (`"none"`, `"lora_only"`, `"all"`); those biases are
        saved too.
    - `trainable`: module names trained in full, saved as PEFT's `modules_to_save`.
    - `rslora`: write `use_rslora=True` (`lora_alpha = scaling·sqrt(r)`). Either way
        PEFT computes the same scaling as the model's.

    Our `a` (`out × r`) is PEFT's `lora_B.weight`, our `b` (`r × in`) its
    `lora_A.weight`. `lora_alpha` is chosen so that PEFT's scaling equals each layer's
    scaling (quax's scaling of 1 gives `lora_alpha = r`); layers whose rank or alpha
    differ from the most common go to `rank_pattern` / `alpha_pattern`.

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
    check_choice(train_bias, "train_bias", ("none", "lora_only", "all"))
    if not isinstance(rslora, bool):
        raise TypeError(f"`rslora` must be a bool, got {rslora!r}.")
    mapped = _check_name_map(name_map)
    adapters, biases = adapter_entries(model, train_bias=train_bias)
    if not adapters:
        raise ValueError("`model` has no adapters to save; adapt it first with `lora_jax.loraify`.")
    _, saved = adapter_entries(model, trainable=trainable) if trainable else ({}, {})
    layers = _layers_by_name(model)
    all_modules = [mapped(n) for n in _module_names(model)]

    method = None
    layers_out: dict[str, tuple[dict[str, np.ndarray], float]] = {}
    for path, value in adapters.items():
        module, _, fieldname = path.rpartition(".")
        layer = layers.get(module)
        if layer is None or LAYERS[type(layer)].field != fieldname:
            raise ValueError(
                f"The adapter at {path!r} is not the weight of a layer PEFT knows "
                f"({', '.join(t.__name__ for t in LAYERS)}); PEFT cannot name it."
            )
        m = _method_for_type(value)
        if method is not None and m is not method:
            raise ValueError(
                f"`model` mixes {method.method!r} and {m.method!r} adapters; a PEFT "
                "adapter directory holds one method."
            )
        method = m
        if value._w.ndim != 2:
            raise ValueError(
                f"The adapter at {path!r} is stacked (weight shape {value._w.shape}); "
                "PEFT stores one matrix per module. Unstack the layers first."
            )
        fields = {f: np.asarray(getattr(value, f)) for _, f in m.tensors}
        layers_out[mapped(module)] = (fields, float(value.scaling))
    assert method is not None
    adapted_modules = {path.rpartition(".")[0] for path in adapters}
    extra: dict[str, np.ndarray] = {}
    for name, leaf in biases.items():
        module = name.rpartition(".")[0]
        key = f"{mapped(module)}.base_layer.bias" if module in adapted_modules else _torch_leaf(mapped, name)
        extra[key] = np.asarray(leaf)
    modules_to_save = []
    for t in trainable or ():
        hits = [n for n in _module_names(model) if name_matches(n, t)]
        modules_to_save.extend(mapped(n) for n in hits if mapped(n) not in modules_to_save)
    for name, leaf in saved.items():
        extra[_torch_leaf(mapped, name)] = np.asarray(leaf)
    tensors, config = peft_contents(
        method,
        layers_out,
        extra,
        all_modules=all_modules,
        rslora=rslora,
        train_bias=train_bias,
        modules_to_save=modules_to_save or None,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
    )
    write_peft_dir(directory, tensors, config)


def write_peft_dir(directory, tensors: dict[str, np.ndarray], config: dict) -> None:
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, WEIGHTS_NAME), tensors, {"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(directory, CONFIG_NAME), text.encode())


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def read_peft_dir(directory) -> tuple[dict, dict[str, np.ndarray]]:
    """`(config, tensors)` of a PEFT adapter directory, with clear errors."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise ValueError(f"{directory!r} is a file; a PEFT adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}.")
        raise FileNotFoundError(f"No PEFT adapter directory at {directory!r}.")
    cpath = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(cpath):
        raise FileNotFoundError(f"{directory!r} has no {CONFIG_NAME}; is it a PEFT adapter directory?")
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


def _inverse(model, mapped) -> dict[str, str]:
    inverse: dict[str, str] = {}
    for name in _module_names(model):
        torch_name = mapped(name)
        if torch_name in inverse and inverse[torch_name] != name:
            raise ValueError(
                f"`name_map` sends both {inverse[torch_name]!r} and {name!r} to "
                f"{torch_name!r}; it must be one-to-one."
            )
        inverse[torch_name] = name
    return inverse


def load_peft(
    directory: str | os.PathLike,
    model: PyTree,
    *,
    name_map: NameMap = None,
    dtype=None,
) -> PyTree:
    """Loads a PEFT adapter directory (`save_pretrained`'s output) into a model.

    **Arguments:**

    - `directory`: holds `adapter_config.json` and `adapter_model.safetensors`.
    - `model`: the base model (or one already adapted at the same places: its
        adapters' factors are replaced).
    - `name_map`: as for [`lora_jax.save_peft`][]: maps our module names to the torch
        model's.
    - `dtype`: the factors' dtype; defaults to the file's.

    **Returns:**

    The adapted model. Each adapted layer's weight becomes a [`lora_jax.LoraArray`][]
    with `a = lora_B`, `b = lora_A` and PEFT's scaling (`lora_alpha/r`, or
    `/sqrt(r)` with `use_rslora`, `rank_pattern`/`alpha_pattern` honoured). Saved
    biases and `modules_to_save` leaves replace the model's. Everything is checked
    before the new model is built; a tensor for a module the model lacks raises a
    ValueError naming it.

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
    directory = os.fspath(directory)
    config, tensors = read_peft_dir(directory)
    cpath = os.path.join(directory, CONFIG_NAME)
    method = method_for_config(config, cpath)
    mapped = _check_name_map(name_map)
    inverse = _inverse(model, mapped)
    layers = _layers_by_name(model)
    leaves = {
        path_name(p): leaf for p, leaf in jtu.tree_flatten_with_path(model, is_leaf=is_adapter)[0]
    }
    torch_leaves = {_torch_leaf(mapped, n): n for n in leaves}
    wpath = os.path.join(directory, WEIGHTS_NAME)
    try:
        default_r = int(config[method.rank_key])
        default_alpha = float(config[method.alpha_key])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{cpath!r} lacks a valid {method.rank_key!r} or {method.alpha_key!r}.") from None
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    suffixes = dict(method.tensors)
    factors: dict[str, dict[str, np.ndarray]] = {}  # torch module -> field -> array
    plain: dict[str, np.ndarray] = {}  # our leaf name -> array
    for key, arr in tensors.items():
        rest, module, suffix = _split_key(key, suffixes, wpath)
        if suffix is not None:
            factors.setdefault(module, {})[suffixes[suffix]] = arr
            continue
        if rest.endswith(".base_layer.bias"):
            rest = rest[: -len(".base_layer.bias")] + ".bias"
        ours = torch_leaves.get(rest)
        if ours is None:
            raise ValueError(
                f"Tensor {key!r} in {wpath!r} is for {rest!r}, which `model` does not "
                "have" + (" (after `name_map`)." if name_map is not None else "; pass `name_map`?")
            )
        like = leaves[ours]
        if tuple(arr.shape) != tuple(like.shape):
            raise ValueError(
                f"Tensor {key!r} in {wpath!r} has shape {tuple(arr.shape)}, but `model`'s "
                f"{ours!r} has {tuple(like.shape)}."
            )
        plain[ours] = arr.astype(like.dtype)

    replacements: dict[str, Any] = {}  # our weight path -> new adapter
    for module, fields in factors.items():
        ours = inverse.get(module)
        if ours is None or ours not in layers:
            raise ValueError(
                f"{wpath!r} has a {method.method} adapter for module {module!r}, which "
                "`model` does not have" + (" (after `name_map`)" if name_map is not None else "")
                + f". Layers that can be adapted: {', '.join(repr(mapped(n)) for n in list(layers)[:8])}."
            )
        missing = [s for s, f in method.tensors if f not in fields]
        if missing:
            raise ValueError(f"{wpath!r} lacks {PREFIX}{module}.{missing[0]}.")
        layer = layers[ours]
        weight_field = LAYERS[type(layer)].field
        current = getattr(layer, weight_field)
        like = current if isinstance(current, method.adapter_type) else None
        base = current._w if is_adapter(current) else current
        a, b = fields["a"], fields["b"]
        rank = a.shape[-1] if a.ndim == 2 else -1
        out, inp = base.shape[-2:]
        if a.ndim != 2 or b.ndim != 2 or a.shape != (out, rank) or b.shape != (rank, inp):
            raise ValueError(
                f"{wpath!r}: module {module!r} has lora_A {tuple(b.shape)} and lora_B "
                f"{tuple(a.shape)}, which do not fit a weight of shape ({out}, {inp}) "
                "(expected (r, in) and (out, r))."
            )
        expected_r = _lookup(module, rank_pattern, default_r)
        if int(expected_r) != rank:
            raise ValueError(
                f"{wpath!r}: module {module!r} has rank {rank}, but {CONFIG_NAME} says "
                f"{expected_r}."
            )
        alpha = float(_lookup(module, alpha_pattern, default_alpha))
        if dtype is not None:
            fields = {k: v.astype(jnp.dtype(dtype)) for k, v in fields.items()}
        if like is not None:
            fields = {k: _to_device(v, getattr(like, k)) for k, v in fields.items()}
        replacements[f"{ours}.{weight_field}"] = method.build(
            base, fields, peft_scaling(alpha, rank, rslora), like
        )
    if not replacements:
        raise ValueError(f"{wpath!r} holds no {method.method} tensors.")

    def swap(path, leaf):
        name = path_name(path)
        if name in replacements:
            return replacements[name]
        if name in plain:
            return _to_device(plain[name], leaf)
        return leaf

    return jtu.tree_map_with_path(swap, model, is_leaf=is_adapter)


def _lookup(name: str, patterns: dict, default):
    for key, value in patterns.items():
        if pattern_key_matches(name, key):
            return value
    return default


# ---------------------------------------------------------------------------------------
# Converting files without a model
# ---------------------------------------------------------------------------------------


def lora_jax_file_to_peft(src, dst, *, rslora: bool = False) -> None:
    """Rewrites a [`lora_jax.save_adapter`][] file as a PEFT adapter directory. An
    adapter saved at `<module>.weight` becomes PEFT's module `<module>`."""
    from ._io import _json_meta, check_format

    tensors, metadata = read_safetensors(src)
    check_format(src, metadata)
    info = _json_meta(src, metadata, "adapters")
    extras = _json_meta(src, metadata, "extras")
    trainable = _json_meta(src, metadata, "trainable")
    train_bias = metadata.get("train_bias", "none")
    methods = {e["method"] for e in info.values()}
    if len(methods) != 1 or next(iter(methods)) not in PEFT_METHODS:
        raise ValueError(
            f"{os.fspath(src)!r} holds {sorted(methods)} adapters; PEFT directories "
            f"hold one of {sorted(PEFT_METHODS)}."
        )
    method = PEFT_METHODS[methods.pop()]
    layers = {}
    for path in info:
        module = path.rpartition(".")[0]
        fields = {f: tensors[f"{path}.{f}"] for _, f in method.tensors}
        if fields["a"].ndim != 2:
            raise ValueError(f"The adapter at {path!r} is stacked; PEFT stores one matrix per module.")
        layers[module] = (fields, float(tensors[f"{path}.scaling"]))
    extra = {}
    for name in extras:
        owner = name.rpartition(".")[0]
        if name.endswith(".bias") and owner in layers and train_bias != "none":
            extra[owner + ".base_layer.bias"] = tensors[name]
        else:
            extra[name] = tensors[name]
    out, config = peft_contents(
        method,
        layers,
        extra,
        all_modules=sorted(layers),
        rslora=rslora,
        train_bias=train_bias,
        modules_to_save=trainable,
    )
    write_peft_dir(dst, out, config)


def peft_to_lora_jax_file(src, dst) -> None:
    """Rewrites a PEFT adapter directory as a [`lora_jax.save_adapter`][] file; PEFT's
    module `<module>` becomes our adapter at `<module>.weight`."""
    from . import __version__
    from ._io import FORMAT_NAME, FORMAT_VERSION

    config, tensors = read_peft_dir(src)
    cpath = os.path.join(os.fspath(src), CONFIG_NAME)
    method = method_for_config(config, cpath)
    rslora = bool(config.get("use_rslora", False))
    suffixes = dict(method.tensors)
    out: dict[str, np.ndarray] = {}
    info: dict[str, dict] = {}
    extras = []
    for key, arr in tensors.items():
        rest, module, suffix = _split_key(key, suffixes, os.fspath(src))
        if suffix is not None:
            out[f"{module}.weight.{suffixes[suffix]}"] = arr
            info.setdefault(f"{module}.weight", {"method": method.method})
            continue
        if rest.endswith(".base_layer.bias"):
            rest = rest[: -len(".base_layer.bias")] + ".bias"
        out[rest] = arr
        extras.append(rest)
    for path, entry in info.items():
        module = path.rpartition(".")[0]
        rank = int(out[f"{path}.a"].shape[-1])
        alpha = float(_lookup(module, config.get("alpha_pattern") or {}, config[method.alpha_key]))
        scaling = np.asarray(peft_scaling(alpha, rank, rslora), np.float32)
        out[f"{path}.scaling"] = scaling
        entry.update(rank=rank, scaling=float(scaling))
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "lora_jax_version": __version__,
        "method": method.method,
        "rank": json.dumps(_most_common([e["rank"] for e in info.values()])),
        "scaling": json.dumps(_most_common([e["scaling"] for e in info.values()])),
        "targets": json.dumps(list(info)),
        "adapters": json.dumps(info),
        "extras": json.dumps(extras),
        "train_bias": config.get("bias", "none"),
        "trainable": json.dumps(config.get("modules_to_save")),
    }
    write_safetensors(dst, out, metadata)
