import json
import os
import re

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
import quax

import lora_jax as lora
import lora_jax._io as lio

from .helpers import dense_lora, randomise_model


class Net(eqx.Module):
    layers: list
    head: eqx.nn.Linear

    def __init__(self, key, dtype=jnp.float32):
        k1, k2, k3 = jr.split(key, 3)
        self.layers = [
            eqx.nn.Linear(4, 6, key=k1, dtype=dtype),
            eqx.nn.Linear(6, 5, key=k2, dtype=dtype),
        ]
        self.head = eqx.nn.Linear(5, 3, key=k3, dtype=dtype)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)


def _adapted(key, **kw):
    k1, k2, k3 = jr.split(key, 3)
    model = lora.loraify(
        Net(k1, kw.pop("base_dtype", jnp.float32)), key=k2, where=["layers.0", "layers.1"], **kw
    )
    return randomise_model(model, k3)


def _dense_forward(model, x):
    """The adapted model written plainly: every weight w + s·a@b."""

    def lin(layer, x):
        f = lambda t: t.astype(jnp.float32)
        w = layer.weight
        w = dense_lora(f(w._w), f(w.a), f(w.b), w.scaling) if lora.is_adapter(w) else f(w)
        return w @ x + f(layer.bias)

    for layer in model.layers:
        x = jnp.tanh(lin(layer, x))
    return lin(model.head, x)


def _bitwise_equal(x, y):
    xs, xt = jtu.tree_flatten(x)
    ys, yt = jtu.tree_flatten(y)
    assert xt == yt
    for a, b in zip(xs, ys):
        if eqx.is_array(a):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize(
    "kw",
    [
        dict(rank=2),
        dict(rank=3, alpha=6.0, rslora=True),
        dict(rank=2, alpha=3.0, rank_pattern={"layers.1": 4}, alpha_pattern={"layers.1": 5.0}),
        dict(rank=2, dtype=jnp.bfloat16),
        dict(rank=2, base_dtype=jnp.bfloat16),
    ],
)
def test_roundtrip_bitwise(tmp_path, getkey, kw):
    saved = _adapted(getkey(), **kw)
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(path, saved)
    # Load into a model with the same base but fresh factors and scalings.
    fresh = lora.loraify(
        eqx.tree_at(lambda m: m.layers, saved, [lora.materialise(lyr) for lyr in saved.layers]),
        key=getkey(),
        where=["layers.0", "layers.1"],
        **{
            k: v
            for k, v in kw.items()
            if k not in ("base_dtype", "alpha", "rslora", "alpha_pattern")
        },
    )
    # (base weights of `fresh` are the merged ones; take the saved model's base back)
    fresh = eqx.tree_at(
        lambda m: [lyr.weight._w for lyr in m.layers],
        fresh,
        [lyr.weight._w for lyr in saved.layers],
    )
    loaded = lora.load_adapter(path, fresh)
    _bitwise_equal(loaded, saved)
    x = jr.normal(getkey(), (4,))
    ref = _dense_forward(saved, x)
    if "base_dtype" in kw:
        x = x.astype(kw["base_dtype"])
    tol = 1e-5 if "dtype" not in kw and "base_dtype" not in kw else 5e-2
    assert np.allclose(np.asarray(quax.quaxify(loaded)(x), np.float32), ref, atol=tol, rtol=tol)


def test_only_adapter_leaves_saved(tmp_path, getkey):
    model = _adapted(getkey(), rank=2)
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, model)
    tensors, meta = lio.read_safetensors(path)
    assert sorted(tensors) == [
        f"layers.{i}.weight.{f}" for i in (0, 1) for f in ("a", "b", "scaling")
    ]
    assert meta["method"] == "lora" and json.loads(meta["rank"]) == 2
    assert json.loads(meta["targets"]) == ["layers.0.weight", "layers.1.weight"]
    assert meta["format_version"] == "1" and meta["lora_jax_version"] == lora.__version__
    assert np.array_equal(tensors["layers.0.weight.a"], np.asarray(model.layers[0].weight.a))


def test_biases_and_trainable(tmp_path, getkey):
    model = _adapted(getkey(), rank=2)
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, model, train_bias="lora_only", trainable=["head"])
    tensors, _ = lio.read_safetensors(path)
    assert {"layers.0.bias", "layers.1.bias", "head.weight", "head.bias"} <= set(tensors)
    # Change what was saved, then load it back.
    k = getkey()
    other = jtu.tree_map(lambda x: x + 1 if eqx.is_inexact_array(x) else x, model)
    loaded = lora.load_adapter(path, other)
    for got, want in [
        (loaded.layers[0].bias, model.layers[0].bias),
        (loaded.head.weight, model.head.weight),
        (loaded.layers[1].weight.a, model.layers[1].weight.a),
    ]:
        assert np.array_equal(got, want)
    # The base weights are not in the file: `other`'s stay.
    assert np.array_equal(loaded.layers[0].weight._w, other.layers[0].weight._w)
    del k


def test_stacked_adapter_roundtrip(tmp_path, getkey):
    w = jr.normal(getkey(), (3, 5, 4))
    value = lora.LoraArray(w, rank=2, key=getkey())
    model = randomise_model({"blocks": value}, getkey())
    path = tmp_path / "s.safetensors"
    lora.save_adapter(path, model)
    fresh = {"blocks": lora.LoraArray(w, rank=2, key=getkey())}
    loaded = lora.load_adapter(path, fresh)
    _bitwise_equal(loaded, model)
    x = jr.normal(getkey(), (3, 4))
    got = quax.quaxify(jnp.einsum)("boi,bi->bo", loaded["blocks"], x)
    v = model["blocks"]
    ref = jnp.einsum("boi,bi->bo", dense_lora(v._w, v.a, v.b, v.scaling), x)
    assert np.allclose(got, ref, atol=1e-5)


def test_rank_mismatch_names_tensor(tmp_path, getkey):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _adapted(getkey(), rank=2))
    other = _adapted(getkey(), rank=2, rank_pattern={"layers.1": 3})
    with pytest.raises(
        ValueError, match=r"'layers\.1\.weight\.a'.*shape \(5, 2\).*expects \(5, 3\)"
    ):
        lora.load_adapter(path, other)


def test_dtype_mismatch_names_tensor(tmp_path, getkey):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _adapted(getkey(), rank=2))
    other = _adapted(getkey(), rank=2, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"'layers\.0\.weight\.a'.*dtype float32.*bfloat16"):
        lora.load_adapter(path, other)


def test_structure_mismatch(tmp_path, getkey):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _adapted(getkey(), rank=2))
    fewer = lora.loraify(Net(getkey()), rank=2, key=getkey(), where=["layers.0"])
    with pytest.raises(
        ValueError, match=r"has tensor 'layers\.1\.weight\.a' that `model` does not have"
    ):
        lora.load_adapter(path, fewer)
    more = lora.loraify(Net(getkey()), rank=2, key=getkey())
    with pytest.raises(ValueError, match=r"lacks tensor 'head\.weight\.a'"):
        lora.load_adapter(path, more)
    with pytest.raises(ValueError, match="`model` has no adapters"):
        lora.load_adapter(path, Net(getkey()))


def test_missing_and_bad_files(tmp_path, getkey):
    model = _adapted(getkey(), rank=2)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        lora.load_adapter(tmp_path / "nope.safetensors", model)
    with pytest.raises(ValueError, match="is a directory"):
        lora.load_adapter(tmp_path, model)
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, model)
    data = path.read_bytes()
    for cut in (0, 5, 20, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.safetensors.*not a valid safetensors"):
            lora.load_adapter(bad, model)
    corrupt = bytearray(data)
    corrupt[8:12] = b"\xff\xfe{["
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="corrupt.safetensors.*header is not JSON"):
        lora.load_adapter(bad, model)
    foreign = tmp_path / "foreign.safetensors"
    lio.write_safetensors(foreign, {"x": np.zeros(2, np.float32)}, {})
    with pytest.raises(ValueError, match="not a lora_jax adapter file"):
        lora.load_adapter(foreign, model)


def test_crash_during_save_keeps_old_file(tmp_path, getkey, monkeypatch):
    path = tmp_path / "a.safetensors"
    old = _adapted(getkey(), rank=2)
    lora.save_adapter(path, old)
    before = path.read_bytes()
    monkeypatch.setattr(lio, "_CHUNK", 16)
    real_write = os.write
    calls = []

    def flaky_write(fd, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError("disk on fire")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky_write)
    with pytest.raises(OSError, match="disk on fire"):
        lora.save_adapter(path, _adapted(getkey(), rank=2))
    monkeypatch.setattr(os, "write", real_write)
    assert len(calls) == 3  # it did fail midway
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]
    _bitwise_equal(lora.load_adapter(path, old), old)


def test_no_adapters(tmp_path, getkey):
    with pytest.raises(ValueError, match="`model` has no adapters"):
        lora.save_adapter(tmp_path / "a.safetensors", Net(getkey()))
    assert not os.listdir(tmp_path)


def test_readable_by_safetensors(tmp_path, getkey):
    from safetensors.numpy import load_file

    model = _adapted(getkey(), rank=2)
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, model)
    tensors = load_file(str(path))
    assert np.array_equal(tensors["layers.1.weight.b"], model.layers[1].weight.b)


# --- Every method: save -> load is bitwise ---------------------------------------------


def _layers_model(key):
    k1, k2, k3 = jr.split(key, 3)
    return {
        "conv": eqx.nn.Conv2d(2, 3, 3, key=k1),
        "emb": eqx.nn.Embedding(7, 4, key=k2),
        "net": Net(k3),
    }


METHOD_CASES = {
    "dora": lambda m, k: lora.loraify(
        m, rank=2, alpha=3.0, method="dora", key=k, where=["layers.0", "layers.1"]
    ),
    "dora_rslora_bf16": lambda m, k: lora.loraify(
        m, rank=2, alpha=3.0, rslora=True, method="dora", dtype=jnp.bfloat16, key=k
    ),
    "lokr": lambda m, k: lora.loraify(m, rank=2, method="lokr", key=k),
    "lokr_decompose_both": lambda m, k: lora.loraify(
        m, rank=1, alpha=2.0, method="lokr", decompose_both=True, key=k
    ),
    "lokr_factor": lambda m, k: lora.loraify(
        m, rank=2, method="lokr", decompose_factor=2, rank_dropout=0.1, key=k
    ),
    "loha": lambda m, k: lora.loraify(
        m, rank=2, alpha=5.0, method="loha", key=k, rank_pattern={"head": 3}
    ),
    "conv_embedding": lambda m, k: lora.loraify(m, rank=2, key=k, where=["conv", "emb"]),
    "dora_conv": lambda m, k: lora.loraify(m, rank=2, key=k, method="dora", where=["conv"]),
    "loha_conv": lambda m, k: lora.loraify(
        m, rank=2, key=k, method="loha", rank_dropout=0.1, where=["conv"]
    ),
    "lokr_conv": lambda m, k: lora.loraify(
        m, rank=1, key=k, method="lokr", init_weights=False, where=["conv"]
    ),
    "loha_conv_tucker": lambda m, k: lora.loraify(
        m, rank=2, key=k, method="loha", use_effective_conv2d=True, where=["conv"]
    ),
    "lokr_conv_tucker": lambda m, k: lora.loraify(
        m, rank=1, key=k, method="lokr", use_effective_conv2d=True, where=["conv"]
    ),
}


@pytest.mark.parametrize("case", list(METHOD_CASES), ids=list(METHOD_CASES))
def test_every_method_roundtrip_bitwise(tmp_path, getkey, case):
    build = METHOD_CASES[case]
    base = (
        _layers_model(getkey())
        if case in ("conv_embedding", "dora_conv") or case.startswith(("loha_conv", "lokr_conv"))
        else Net(getkey())
    )
    saved = randomise_model(build(base, getkey()), getkey())
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(path, saved)
    _, meta = lio.read_safetensors(path)
    methods = {e["method"] for e in json.loads(meta["adapters"]).values()}
    expected = {
        "conv_embedding": {"lora_conv", "lora_embedding"},
        "dora_conv": {"dora_conv"},
        "loha_conv": {"loha_conv"},
        "lokr_conv": {"lokr_conv"},
        "loha_conv_tucker": {"loha_conv"},
        "lokr_conv_tucker": {"lokr_conv"},
    }
    assert methods == expected.get(case, {case.split("_")[0]})
    # A model adapted the same way with other values takes the saved ones, bitwise.
    fresh = build(base, getkey())
    assert not _equal_bytes(fresh, saved)
    _bitwise_equal(lora.load_adapter(path, fresh), saved)


def test_tucker_structure_must_match(tmp_path, getkey):
    """A conv adapter in PEFT's Tucker form writes its cores; a model adapted without
    it does not take the file."""
    base = _layers_model(getkey())
    tucker = METHOD_CASES["loha_conv_tucker"](base, getkey())
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, tucker)
    tensors, _ = lio.read_safetensors(path)
    assert {"conv.weight.t1", "conv.weight.t2"} <= set(tensors)
    plain = METHOD_CASES["loha_conv"](base, getkey())
    with pytest.raises(
        ValueError, match=r"has tensor 'conv\.weight\.t1' that `model` does not have"
    ):
        lora.load_adapter(path, plain)


def _equal_bytes(x, y) -> bool:
    try:
        _bitwise_equal(x, y)
    except AssertionError:
        return False
    return True


def test_lokr_fields_saved_as_held(tmp_path, getkey):
    """LoKr writes exactly the factors the value holds (whole or decomposed)."""
    k1, k2 = jr.split(getkey())
    base = {"big": eqx.nn.Linear(16, 24, key=k1), "small": eqx.nn.Linear(4, 6, key=k2)}
    model = lora.loraify(base, rank=1, method="lokr", decompose_both=True, key=getkey())
    assert model["big"].weight.w1_a is not None and model["small"].weight.w1 is not None
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, model)
    tensors, _ = lio.read_safetensors(path)
    for name in ("big", "small"):
        v = model[name].weight
        held = {
            f for f in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b") if getattr(v, f) is not None
        }
        in_file = {k.rpartition(".")[2] for k in tensors if k.startswith(f"{name}.weight.")} - {
            "scaling"
        }
        assert in_file == held
    # A LoKr model with the other structure does not take the file.
    other = lora.loraify(base, rank=1, method="lokr", key=getkey())
    with pytest.raises(ValueError, match=r"lacks tensor 'big\.weight\.w1'"):
        lora.load_adapter(path, other)


def test_method_mismatch_names_place(tmp_path, getkey):
    base = Net(getkey())
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, lora.loraify(base, rank=2, method="dora", key=getkey()))
    with pytest.raises(
        ValueError,
        match=r"holds a 'dora' adapter at 'layers\.0\.weight', but `model` has a 'lora' adapter",
    ):
        lora.load_adapter(path, lora.loraify(base, rank=2, key=getkey()))


# --- Hostile files ----------------------------------------------------------------------


def _raw(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


def _model_and_file(tmp_path, getkey):
    model = _adapted(getkey(), rank=2)
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, model)
    return model, path


HOSTILE = {
    "oversized_header": (
        lambda data: (2**40).to_bytes(8, "little") + data[8:],
        "header claims 1099511627776 bytes, more than",
    ),
    "trailing_bytes": (lambda data: data + b"\0" * 8, "8 bytes after its last tensor"),
    "flipped_bit": (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "does not match the checksum"),
    "overlap": (
        lambda data: _raw(
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
        ),
        "'y' overlaps the tensor before it",
    ),
    "hole": (
        lambda data: _raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
        "'x' leaves a hole of 4 bytes",
    ),
    "overflowing_shape": (
        lambda data: _raw(
            {"x": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "'x' has 4 bytes of data, but shape",
    ),
    "negative_shape": (
        lambda data: _raw(
            {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4
        ),
        "'x' has a malformed entry",
    ),
    "unknown_dtype": (
        lambda data: _raw({"x": {"dtype": "F8_E9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
        "'x' has a malformed entry",
    ),
    "duplicate_key": (
        lambda data: (lambda t: len(t).to_bytes(8, "little") + t + b"\0" * 4)(
            b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        ),
        "the key 'x' appears twice",
    ),
    "metadata_not_strings": (
        lambda data: _raw({"__metadata__": {"format": 1}}),
        "`__metadata__` is not a map of strings",
    ),
    "header_not_object": (lambda data: _raw([1, 2]), "header is not a JSON object"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_files(tmp_path, getkey, case):
    model, path = _model_and_file(tmp_path, getkey)
    corrupt, message = HOSTILE[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(
        ValueError,
        match=r"bad\.safetensors' is not a valid safetensors file: .*" + re.escape(message),
    ):
        lora.load_adapter(bad, model)


def test_hostile_metadata(tmp_path, getkey):
    model, path = _model_and_file(tmp_path, getkey)
    tensors, meta = lio.read_safetensors(path)
    bad = tmp_path / "bad.safetensors"
    for change, message in [
        ({"adapters": "[1]"}, "malformed metadata 'adapters'"),
        ({"adapters": "{"}, "missing or malformed metadata 'adapters'"),
        (
            {"adapters": json.dumps({"layers.0.weight": {"method": "magic"}})},
            "as {'method': 'magic'}; this lora_jax knows",
        ),
        (
            {"adapters": json.dumps({"nowhere.weight": {"method": "lora"}})},
            "lists an adapter at 'nowhere.weight' but holds no tensor",
        ),
        (
            {"extras": json.dumps(["ghost.bias"])},
            "lists the tensor 'ghost.bias' but does not hold it",
        ),
        ({"trainable": "5"}, "malformed metadata 'trainable'"),
        ({"train_bias": "some"}, "malformed metadata `train_bias='some'`"),
        ({"format_version": "99"}, "format version '99'"),
    ]:
        lio.write_safetensors(bad, tensors, {**meta, **change})
        with pytest.raises(ValueError, match=re.escape(message)):
            lora.load_adapter(bad, model)


def test_validation_before_any_work(tmp_path, getkey, monkeypatch):
    """A file that does not fit fails before any leaf is built or moved to a device;
    one that fits builds the model in one go."""
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _adapted(getkey(), rank=2))
    calls = []
    real = lio._replace_leaves
    monkeypatch.setattr(lio, "_replace_leaves", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(
        lio, "_to_device", lambda *a: pytest.fail("moved a tensor before validating")
    )
    other = _adapted(getkey(), rank=2, rank_pattern={"layers.1": 3})
    with pytest.raises(ValueError, match=r"'layers\.1\.weight\.a'"):
        lora.load_adapter(path, other)
    assert calls == []


def test_interrupted_peft_save_keeps_old_directory(tmp_path, getkey, monkeypatch):
    old = _adapted(getkey(), rank=2)
    lora.save_peft(tmp_path, old)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(lio, "_CHUNK", 16)
    real_write = os.write
    calls = []

    def flaky_write(fd, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError("disk on fire")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky_write)
    with pytest.raises(OSError, match="disk on fire"):
        lora.save_peft(tmp_path, _adapted(getkey(), rank=3))
    monkeypatch.setattr(os, "write", real_write)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    loaded = lora.load_peft(tmp_path, lora.unloraify(old)[0])
    assert np.array_equal(loaded.layers[0].weight.a, old.layers[0].weight.a)


def test_peft_validation_before_any_work(tmp_path, getkey, monkeypatch):
    import lora_jax._peft as lpeft

    lora.save_peft(
        tmp_path, lora.loraify(Net(getkey()), rank=2, key=getkey(), where=["layers.0", "layers.1"])
    )
    monkeypatch.setattr(
        lpeft, "_build", lambda *a: pytest.fail("built an adapter before validating")
    )

    class Other(eqx.Module):  # layers.1 is (7, 6) here, not (5, 6): checked after layers.0
        layers: list
        head: eqx.nn.Linear

    k1, k2, k3 = jr.split(getkey(), 3)
    other = Other(
        [eqx.nn.Linear(4, 6, key=k1), eqx.nn.Linear(6, 7, key=k2)], eqx.nn.Linear(7, 3, key=k3)
    )
    with pytest.raises(ValueError, match=r"layers\.1\.lora_B\.weight has shape \(5, 2\)"):
        lora.load_peft(tmp_path, other)


def test_bad_paths(tmp_path, getkey):
    model = _adapted(getkey(), rank=2)
    with pytest.raises(TypeError, match=r"`path` must be a path \(str or os.PathLike\), got int"):
        lora.save_adapter(5, model)
    with pytest.raises(TypeError, match="`path` must be a path"):
        lora.load_adapter(None, model)
    with pytest.raises(FileNotFoundError, match=r"the directory '.*missing' does not exist"):
        lora.save_adapter(tmp_path / "missing" / "a.safetensors", model)
    with pytest.raises(ValueError, match="it is a directory"):
        lora.save_adapter(tmp_path, model)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="'.*file' is a file; a PEFT adapter is a directory"):
        lora.save_peft(tmp_path / "file", model)
    with pytest.raises(TypeError, match="`directory` must be a path"):
        lora.load_peft(3.0, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
