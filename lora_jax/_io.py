"""Saving and loading adapters: one `.safetensors` file holding only what trains.

The file names every tensor by its dotted PyTree path: an adapter's fields as
`<path to the weight>.<field>` (`layers.0.weight.a`, `layers.0.weight.scaling`), and
any trained bias or fully trained (`trainable`) leaf by its own path (`layers.0.bias`).
Its text metadata says what the file holds (`lora_jax.inspect_file` reads it without
a model). Which fields an adapter type saves is a row of `FORMATS`: a new method adds
one row.
"""

import collections
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import ml_dtypes
import numpy as np
from jaxtyping import PyTree

from ._base import AbstractAdapter, is_adapter
from ._conv import LoraConvArray
from ._dora import DoraArray
from ._dora_conv import DoraConvArray
from ._embedding import LoraEmbeddingArray
from ._filters import TrainBias, trainable_mask
from ._loha import LohaArray
from ._loha_conv import LohaConvArray
from ._lokr import LokrArray
from ._lokr_conv import LokrConvArray
from ._lora import LoraArray
from ._multi import MultiLoraArray, select_adapter
from ._targets import path_name
from ._validate import check_choice


FORMAT_NAME = "lora_jax.adapter"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterFormat:
    """How one adapter type is written.

    - `method`: the name recorded in the metadata (`"lora"`).
    - `fields`: the array fields saved (every field but the frozen base weight); a
        field that is `None` in a value (LoKr's unused factors) is not written.
    - `rank`: the rank recorded in the metadata.
    - `describe`: static facts that must agree between the file and the model it is
        loaded into (the names of stacked adapters), recorded in the metadata. A file
        written before a fact was recorded is not checked for it.
    """

    method: str
    fields: tuple[str, ...]
    rank: Callable[[Any], int] = lambda value: int(value.rank)
    describe: Callable[[Any], dict] = lambda value: {}


def _multi_facts(value: MultiLoraArray) -> dict:
    return {"names": list(value.names), "ranks": list(value.ranks)}


# adapter type -> its file format. A new method adds a row.
FORMATS: dict[type, AdapterFormat] = {
    LoraArray: AdapterFormat("lora", ("a", "b", "scaling")),
    DoraArray: AdapterFormat("dora", ("a", "b", "m", "scaling")),
    LokrArray: AdapterFormat("lokr", ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "scaling")),
    LohaArray: AdapterFormat("loha", ("w1a", "w1b", "w2a", "w2b", "scaling")),
    LoraConvArray: AdapterFormat("lora_conv", ("a", "b", "scaling")),
    DoraConvArray: AdapterFormat("dora_conv", ("a", "b", "m", "scaling")),
    # The kernel's shape: `w1b` (LoHa) and `w2_a @ w2_b` (LoKr) hold the window folded
    # into `in`.
    LohaConvArray: AdapterFormat(
        "loha_conv",
        ("w1a", "w1b", "w2a", "w2b", "t1", "t2", "scaling"),
        describe=lambda value: {"shape": list(value._w.shape)},
    ),
    LokrConvArray: AdapterFormat(
        "lokr_conv",
        ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2", "scaling"),
        describe=lambda value: {"shape": list(value._w.shape)},
    ),
    LoraEmbeddingArray: AdapterFormat("lora_embedding", ("a", "b", "scaling")),
    MultiLoraArray: AdapterFormat(
        "multi_lora", ("a", "b", "scaling", "weights"), describe=_multi_facts
    ),
}


def saved_fields(value) -> list[str]:
    """The fields of `value` its file format writes (those that are not `None`)."""
    return [f for f in _format_of(value).fields if getattr(value, f) is not None]


def _format_of(value: AbstractAdapter) -> AdapterFormat:
    try:
        return FORMATS[type(value)]
    except KeyError:
        raise TypeError(
            f"No file format is registered for adapters of type "
            f"{type(value).__name__}; add a row to `lora_jax._io.FORMATS`."
        ) from None


# ---------------------------------------------------------------------------------------
# The safetensors file itself: atomic writes, a reader whose errors name the file.
# ---------------------------------------------------------------------------------------

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_CHUNK = 1 << 20
_MAX_HEADER = 100 * 1024 * 1024


CHECKSUM_KEY = "lora_jax_sha256"


def check_path(path, name: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path (str or os.PathLike), got {type(path).__name__}.")
    return os.fspath(path)


def encode(
    tensors: dict[str, np.ndarray], metadata: dict[str, str], *, checksum: bool = True
) -> bytes:
    """The bytes of a safetensors file: little-endian u64 header length, JSON header,
    then the tensors' data in header order. With `checksum`, the metadata also records
    the SHA-256 of the data (`lora_jax_sha256`), which the reader checks: a flipped
    bit in a tensor is an error, not a silently different adapter."""
    metadata = dict(metadata)
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], order="C")
        if arr.dtype not in _CODES:
            raise TypeError(f"Cannot save tensor {name!r} of dtype {arr.dtype}.")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _CODES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    body = b"".join(chunks)
    if checksum:
        metadata[CHECKSUM_KEY] = hashlib.sha256(body).hexdigest()
    header = {"__metadata__": metadata, **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the format asks
    return len(text).to_bytes(8, "little") + text + body


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that a reader sees the old file or the new one,
    never a torn one: a temporary file in the same directory, fsync, `os.replace`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Cannot write {path!r}: the directory {directory!r} does not exist."
        )
    if os.path.isdir(path):
        raise ValueError(f"Cannot write {path!r}: it is a directory.")
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    try:
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            chunk = view[start : start + _CHUNK]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    atomic_write(path, encode(tensors, metadata))


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice")
        out[k] = v
    return out


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a whole safetensors file, checking its structure as the format defines
    it (a header within bounds, every tensor's bytes matching its shape and dtype, the
    data covered exactly, without overlaps or holes) and, when recorded, the data's
    checksum. Any defect is a ValueError naming `path`; a missing file,
    FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No adapter file at {path!r}.")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a .safetensors file.")
    with open(path, "rb") as f:
        data = f.read()

    def bad(why: str):
        return ValueError(f"{path!r} is not a valid safetensors file: {why}.")

    if len(data) < 8:
        raise bad(f"it is {len(data)} bytes long, shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER:
        raise bad(f"its header claims {n} bytes, more than the {_MAX_HEADER} allowed")
    if 8 + n > len(data):
        raise bad(
            f"the header claims {n} bytes but the file has {len(data) - 8} after the length "
            "(truncated?)"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    except ValueError as e:
        raise bad(f"its header is malformed: {e}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("its `__metadata__` is not a map of strings")
    body = memoryview(data)[8 + n :]
    entries = []
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry {info!r}") from None
        if not all(type(s) is int and s >= 0 for s in (*shape, start, end)) or start > end:
            raise bad(f"tensor {name!r} has a malformed entry {info!r}")
        expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if end - start != expected:
            raise bad(
                f"tensor {name!r} has {end - start} bytes of data, but shape {list(shape)} of "
                f"{info['dtype']} needs {expected}"
            )
        if end > len(body):
            raise bad(
                f"tensor {name!r} ends at byte {end} of the data but the data has {len(body)} "
                "bytes (truncated?)"
            )
        entries.append((start, end, name, dtype, shape))
    covered = 0
    for start, end, name, *_ in sorted(entries):
        if start != covered:
            what = (
                "overlaps the tensor before it"
                if start < covered
                else f"leaves a hole of {start - covered} bytes before it"
            )
            raise bad(f"tensor {name!r} {what}")
        covered = end
    if covered != len(body):
        raise bad(f"it has {len(body) - covered} bytes after its last tensor")
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is not None and hashlib.sha256(body).hexdigest() != recorded:
        raise bad(
            "its tensor data does not match the checksum recorded when it was saved (corrupted?)"
        )
    tensors = {}
    for start, end, name, dtype, shape in entries:
        arr = np.frombuffer(body[start:end], dtype=dtype.newbyteorder("<")).astype(dtype)
        tensors[name] = arr.reshape(shape)
    return tensors, metadata


# ---------------------------------------------------------------------------------------
# Model <-> named tensors
# ---------------------------------------------------------------------------------------


def _leaves(model):
    return jtu.tree_flatten_with_path(model, is_leaf=is_adapter)


def adapter_entries(
    model, *, train_bias: TrainBias = "none", trainable: Sequence[str] | None = None
):
    """`(adapters, extras)`: `{path: adapter value}` and `{name: leaf}` for the
    non-adapter leaves that train (biases, `trainable` modules), both in PyTree order."""
    mask = trainable_mask(model, train_bias=train_bias, trainable=trainable)
    leaves, _ = _leaves(model)
    mask_leaves = jtu.tree_leaves(mask, is_leaf=lambda x: is_adapter(x) or isinstance(x, bool))
    adapters, extras = {}, {}
    for (path, leaf), m in zip(leaves, mask_leaves, strict=True):
        name = path_name(path)
        if is_adapter(leaf):
            adapters[name] = leaf
        elif m is True:
            extras[name] = leaf
    return adapters, extras


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0] if values else None


def save_adapter(
    path: str | os.PathLike,
    model: PyTree,
    *,
    train_bias: TrainBias = "none",
    trainable: Sequence[str] | None = None,
    adapter: str | None = None,
) -> None:
    """Saves a model's adapters (and nothing of the frozen base) to one
    `.safetensors` file.

    **Arguments:**

    - `path`: the file to write. It is written atomically: a crash mid-save leaves the
        previous file (if any) as it was.
    - `model`: an adapted model, as [`lora_jax.loraify`][] returns (any method), or
        one with several adapters from [`lora_jax.stack_adapters`][].
    - `train_bias`, `trainable`: also save the leaves these make trainable, as for
        [`lora_jax.partition`][] (biases; PEFT's `modules_to_save`).
    - `adapter`: for a model with stacked adapters, save only the one of this name,
        as a plain LoRA file. By default every stacked adapter is saved, with their
        names, ranks and mixing weights.

    Each tensor is named by its dotted PyTree path and the adapter's field:
    `layers.0.weight.a`, `layers.0.weight.b`, `layers.0.weight.scaling` (DoRA adds
    `.m`; LoKr saves `.w1`/`.w1_a`/... as the value holds them; LoHa `.w1a`...),
    `layers.0.bias`. The metadata records the method, rank, scaling, targets, the
    stacked adapters' names, the versions of lora_jax and of the format, and a
    checksum of the data that [`lora_jax.load_adapter`][] verifies.

    !!! Example

        ```python
        import os, tempfile
        import equinox as eqx
        import jax.random as jr
        import lora_jax as lora

        model = lora.loraify(eqx.nn.MLP(4, 2, 8, 1, key=jr.key(0)), rank=2, key=jr.key(1))
        path = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
        lora.save_adapter(path, model)
        model = lora.load_adapter(path, model)
        ```
    """
    check_path(path, "path")
    check_choice(train_bias, "train_bias", ("none", "lora_only", "all"))
    if adapter is not None:
        model = select_adapter(model, adapter)
    adapters, extras = adapter_entries(model, train_bias=train_bias, trainable=trainable)
    if not adapters:
        raise ValueError("`model` has no adapters to save; adapt it first with `lora_jax.loraify`.")
    tensors: dict[str, np.ndarray] = {}
    info = {}
    names: list[str] | None = None
    for name, value in adapters.items():
        fmt = _format_of(value)
        for field in saved_fields(value):
            tensors[f"{name}.{field}"] = np.asarray(getattr(value, field))
        entry = {"method": fmt.method, "rank": fmt.rank(value), **fmt.describe(value)}
        if hasattr(value, "scaling"):
            scaling = np.asarray(value.scaling)
            if scaling.ndim == 0:
                entry["scaling"] = float(scaling)
        if isinstance(value, MultiLoraArray):
            names = list(value.names)
        info[name] = entry
    for name, leaf in extras.items():
        tensors[name] = np.asarray(leaf)
    methods = sorted({e["method"] for e in info.values()})
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "lora_jax_version": _version(),
        "method": methods[0] if len(methods) == 1 else "mixed",
        "rank": json.dumps(_most_common([e["rank"] for e in info.values()])),
        "scaling": json.dumps(_most_common([e.get("scaling") for e in info.values()])),
        "targets": json.dumps(list(adapters)),
        "adapters": json.dumps(info),
        "extras": json.dumps(list(extras)),
        "train_bias": train_bias,
        "trainable": json.dumps(list(trainable) if trainable is not None else None),
    }
    if names is not None:
        metadata["adapter_names"] = json.dumps(names)
    write_safetensors(path, tensors, metadata)


def _version() -> str:
    from . import __version__

    return __version__


def check_format(path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{os.fspath(path)!r} is a safetensors file but not a lora_jax adapter file "
            f"(its metadata has format={metadata.get('format')!r}); for a PEFT adapter "
            "use `lora_jax.load_peft`."
        )
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has format version {version!r}; this lora_jax reads "
            f"versions up to {FORMAT_VERSION}. Upgrade lora_jax."
        )


def _json_meta(path, metadata, key, kind: type | tuple[type, ...] | None = None):
    try:
        value = json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(
            f"{os.fspath(path)!r} has missing or malformed metadata {key!r}."
        ) from None
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{os.fspath(path)!r} has malformed metadata {key!r}: {value!r}.")
    return value


def read_adapter_file(
    path,
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, dict], list[str]]:
    """`(tensors, metadata, adapters, extras)` of a lora_jax adapter file, its
    structure and metadata checked."""
    tensors, metadata = read_safetensors(path)
    check_format(path, metadata)
    where = os.fspath(path)
    info = _json_meta(path, metadata, "adapters", dict)
    extras = _json_meta(path, metadata, "extras", list)
    if metadata.get("train_bias", "none") not in ("none", "lora_only", "all"):
        raise ValueError(
            f"{where!r} has malformed metadata `train_bias={metadata['train_bias']!r}`."
        )
    trainable = _json_meta(path, metadata, "trainable", (list, type(None)))
    if trainable is not None and not all(isinstance(t, str) for t in trainable):
        raise ValueError(f"{where!r} has malformed metadata 'trainable': {trainable!r}.")
    known = {f.method for f in FORMATS.values()}
    for name, entry in info.items():
        if not isinstance(entry, dict) or entry.get("method") not in known:
            raise ValueError(
                f"{where!r} describes the adapter at {name!r} as {entry!r}; this lora_jax "
                f"knows the methods {sorted(known)}."
            )
        if not any(t.startswith(name + ".") for t in tensors):
            raise ValueError(f"{where!r} lists an adapter at {name!r} but holds no tensor for it.")
    for name in extras:
        if name not in tensors:
            raise ValueError(f"{where!r} lists the tensor {name!r} but does not hold it.")
    return tensors, metadata, info, extras


def load_adapter(path: str | os.PathLike, model: PyTree) -> PyTree:
    """Loads adapters saved by [`lora_jax.save_adapter`][] into a model of the same
    structure.

    **Arguments:**

    - `path`: the `.safetensors` file.
    - `model`: the adapted model to load into (its base weights are kept; its adapter
        factors, DoRA magnitudes, scalings, stacked adapters' mixing weights and any
        saved bias or `trainable` leaves are replaced).

    **Returns:**

    A new model. Every tensor's name, shape and dtype, each adapter's method and the
    names and ranks of stacked adapters are checked against `model` before anything
    is built, so a mismatch raises a ValueError naming the tensor and nothing is
    half-loaded. A missing file raises FileNotFoundError; a truncated or corrupt one
    (the data's checksum is verified), a ValueError naming the file.

    !!! Example

        ```python
        import os, tempfile
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import lora_jax as lora

        base = eqx.nn.MLP(4, 2, 8, 1, key=jr.key(0))
        tuned = lora.loraify(base, rank=2, key=jr.key(1), init="gaussian")
        path = os.path.join(tempfile.mkdtemp(), "adapter.safetensors")
        lora.save_adapter(path, tuned)
        # Into a fresh copy, adapted at the same places (its own factors are replaced):
        fresh = lora.loraify(base, rank=2, key=jr.key(2))
        loaded = lora.load_adapter(path, fresh)
        assert jnp.array_equal(loaded.layers[0].weight.b, tuned.layers[0].weight.b)
        ```
    """
    tensors, metadata, info, _ = read_adapter_file(check_path(path, "path"))
    where = os.fspath(path)
    train_bias = metadata.get("train_bias", "none")
    trainable = _json_meta(path, metadata, "trainable")
    try:
        adapters, extras = adapter_entries(model, train_bias=train_bias, trainable=trainable)
    except ValueError as e:
        raise ValueError(f"{where!r} does not fit `model`: {e}") from None
    if not adapters:
        raise ValueError(
            "`model` has no adapters; `load_adapter` loads into a model adapted the "
            f"same way as the one saved to {where!r} (call `lora_jax.loraify` first)."
        )
    expected: dict[str, Any] = {}
    for name, value in adapters.items():
        fmt = _format_of(value)
        entry = info.get(name, {})
        saved = entry.get("method")
        if saved is not None and saved != fmt.method:
            raise ValueError(
                f"{where!r} holds a {saved!r} adapter at {name!r}, but `model` has a "
                f"{fmt.method!r} adapter ({type(value).__name__}) there."
            )
        for key, want in fmt.describe(value).items():
            if saved is not None and key in entry and entry[key] != want:
                raise ValueError(
                    f"{where!r} holds the adapter at {name!r} with {key} "
                    f"{entry.get(key)!r}, but `model` has {want!r} there."
                )
        for field in saved_fields(value):
            expected[f"{name}.{field}"] = getattr(value, field)
    expected.update(extras)
    missing = [n for n in expected if n not in tensors]
    extra = [n for n in tensors if n not in expected]
    if missing:
        raise ValueError(
            f"{where!r} lacks tensor {missing[0]!r} that `model` has"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ". Was it saved from a model adapted the same way?"
        )
    if extra:
        raise ValueError(
            f"{where!r} has tensor {extra[0]!r} that `model` does not have"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + ". Was it saved from a model adapted the same way?"
        )
    for name, leaf in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(leaf.shape):
            raise ValueError(
                f"Tensor {name!r} in {where!r} has shape {tuple(got.shape)}, but `model` "
                f"expects {tuple(leaf.shape)}."
            )
        if np.dtype(got.dtype) != np.dtype(leaf.dtype):
            raise ValueError(
                f"Tensor {name!r} in {where!r} has dtype {got.dtype}, but `model` "
                f"expects {np.dtype(leaf.dtype)}."
            )
    return _replace_leaves(model, adapters, tensors)


def _to_device(arr: np.ndarray, like) -> jax.Array:
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.Array) and sharding is not None:
        return jax.device_put(arr, sharding)
    return jnp.asarray(arr)


def _replace_leaves(model, adapters: dict[str, Any], tensors: dict[str, np.ndarray]):
    """Builds the whole new model at once from validated tensors."""
    leaves, treedef = _leaves(model)
    out = []
    for path, leaf in leaves:
        name = path_name(path)
        if name in adapters:
            fields = saved_fields(leaf)
            new = [_to_device(tensors[f"{name}.{f}"], getattr(leaf, f)) for f in fields]
            leaf = eqx.tree_at(lambda v: tuple(getattr(v, f) for f in fields), leaf, tuple(new))
        elif name in tensors:
            leaf = _to_device(tensors[name], leaf)
        out.append(leaf)
    return jtu.tree_unflatten(treedef, out)
