import json
import os
import re
import subprocess
import sys

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import lora_jax as lora
from lora_jax.__main__ import main

from .helpers import dense_lora, randomise_model


def _model(key, **kw):
    k1, k2, k3 = jr.split(key, 3)
    mlp = eqx.nn.MLP(4, 3, width_size=5, depth=2, key=k1)
    return randomise_model(lora.loraify(mlp, key=k2, **kw), k3)


def _dense(model, x):
    """The MLP written plainly with every weight w + s·a@b."""
    for i, layer in enumerate(model.layers):
        w = layer.weight
        w = dense_lora(w._w, w.a, w.b, w.scaling) if lora.is_adapter(w) else w
        x = w @ x + layer.bias
        if i < len(model.layers) - 1:
            x = jax_relu(x)
    return x


def jax_relu(x):
    return jnp.maximum(x, 0)


def test_inspect_lora_jax_file(tmp_path, getkey, capsys):
    model = _model(getkey(), rank=2, rank_pattern={"layers.2": 3})
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, model, train_bias="lora_only")
    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "lora_jax" and d["method"] == "lora" and d["rank"] == 2
    assert d["targets"] == {"layers.0.weight": 2, "layers.1.weight": 2, "layers.2.weight": 3}
    want = sum(v.a.size + v.b.size for v in (lyr.weight for lyr in model.layers))
    assert d["adapter_parameters"] == want
    assert d["other_parameters"] == sum(lyr.bias.size for lyr in model.layers)
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "layers.2.weight  (rank 3)" in text and "3 modules" in text


def test_inspect_peft_dir(tmp_path, getkey, capsys):
    model = _model(getkey(), rank=4, alpha=8.0)
    lora.save_peft(tmp_path, model)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "peft" and d["peft_type"] == "LORA"
    assert d["rank"] == 4 and d["alpha"] == 8
    assert d["targets"] == {"layers.0": 4, "layers.1": 4, "layers.2": 4}
    assert d["adapter_parameters"] == sum(
        lyr.weight.a.size + lyr.weight.b.size for lyr in model.layers
    )


def _outputs(model, xs):
    f = eqx.filter_jit(eqx.filter_vmap(lambda m, x: quax.quaxify(m)(x), in_axes=(None, 0)))
    return np.asarray(f(model, xs))


def test_convert_both_ways(tmp_path, getkey, capsys):
    model = _model(getkey(), rank=2, alpha=3.0, rank_pattern={"layers.1": 4})
    model = eqx.tree_at(lambda m: m.layers[0].bias, model, jr.normal(getkey(), (5,)))
    base = lora.unloraify(model)[0]
    xs = jr.normal(getkey(), (6, 4))
    want = np.stack([_dense(model, x) for x in xs])
    src = tmp_path / "a.safetensors"
    lora.save_adapter(src, model, train_bias="lora_only")
    # lora_jax -> PEFT: the directory loads (as PEFT would) into the base model.
    assert main(["convert", str(src), str(tmp_path / "peft")]) == 0
    assert "wrote" in capsys.readouterr().out
    from_peft = lora.load_peft(tmp_path / "peft", base)
    assert np.allclose(_outputs(from_peft, xs), want, atol=1e-5)
    # PEFT -> lora_jax: back to the same tensors, bitwise.
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(tmp_path / "peft"), str(back)]) == 0
    fresh = lora.loraify(base, rank=2, key=getkey(), rank_pattern={"layers.1": 4})
    loaded = lora.load_adapter(back, fresh)
    for lyr, ref in zip(loaded.layers, model.layers):
        assert np.array_equal(lyr.weight.a, ref.weight.a) and np.array_equal(
            lyr.weight.b, ref.weight.b
        )
        assert np.asarray(lyr.weight.scaling).tobytes() == np.asarray(ref.weight.scaling).tobytes()
        assert np.array_equal(lyr.bias, ref.bias)
    assert np.allclose(_outputs(loaded, xs), want, atol=1e-5)


def test_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "missing.safetensors" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00")
    assert main(["inspect", str(bad)]) == 1
    assert "not a valid safetensors file" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x")]) == 1
    assert "No such file or directory" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1
    assert "adapter_config.json" in capsys.readouterr().err


def test_module_entry_point(tmp_path, getkey):
    path = tmp_path / "a.safetensors"
    lora.save_adapter(path, _model(getkey(), rank=2))
    root = os.path.dirname(os.path.dirname(os.path.abspath(lora.__file__)))
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-m", "lora_jax", "inspect", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "method" in run.stdout and "lora" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "lora_jax", "frobnicate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 2 and "invalid choice" in run.stderr


def _same_adapters(x, y):
    """Every adapter's saved fields, bitwise."""
    from lora_jax._io import saved_fields

    for lx, ly in zip(x.layers, y.layers):
        vx, vy = lx.weight, ly.weight
        assert type(vx) is type(vy) and saved_fields(vx) == saved_fields(vy)
        for f in saved_fields(vx):
            assert np.asarray(getattr(vx, f)).tobytes() == np.asarray(getattr(vy, f)).tobytes(), f


METHODS = {
    "dora": dict(method="dora", rank=2, alpha=3.0),
    "lokr": dict(method="lokr", rank=2, alpha=4.0, rank_pattern={"layers.1": 3}),
    "loha": dict(method="loha", rank=2, alpha=5.0),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_inspect_and_convert_methods(tmp_path, getkey, capsys, method):
    kw = METHODS[method]
    model = _model(getkey(), **kw)
    base = lora.unloraify(model)[0]
    trainable = lora.summary(model).trainable
    src = tmp_path / "a.safetensors"
    lora.save_adapter(src, model)
    assert main(["inspect", str(src), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == method and d["adapter_parameters"] == trainable
    assert d["targets"] == {
        f"layers.{i}.weight": (3 if (method == "lokr" and i == 1) else 2) for i in range(3)
    }
    # lora_jax -> PEFT: the directory describes the same adapter and loads into the base.
    peft_dir = tmp_path / "peft"
    assert main(["convert", str(src), str(peft_dir)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(peft_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (
        d["method"] == method
        and d["peft_type"] == {"dora": "LORA", "lokr": "LOKR", "loha": "LOHA"}[method]
    )
    assert d["adapter_parameters"] == trainable
    assert d["targets"] == {
        f"layers.{i}": (3 if (method == "lokr" and i == 1) else 2) for i in range(3)
    }
    _same_adapters(lora.load_peft(peft_dir, base), model)
    # PEFT -> lora_jax: the same tensors again, bitwise.
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(peft_dir), str(back)]) == 0
    fresh = lora.loraify(base, key=getkey(), **kw)
    _same_adapters(lora.load_adapter(back, fresh), model)
    assert main(["inspect", str(peft_dir)]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^method\s+{method}$", text, re.M) and re.search(
        r"^\s+layers\.1  \(rank \d\)$", text, re.M
    )


def test_convert_one_of_stacked_adapters(tmp_path, getkey, capsys):
    base = eqx.nn.MLP(4, 3, width_size=5, depth=2, key=getkey())
    en = randomise_model(lora.loraify(base, rank=2, key=getkey()), getkey())
    fr = randomise_model(lora.loraify(base, rank=3, alpha=6.0, key=getkey()), getkey())
    src = tmp_path / "stack.safetensors"
    lora.save_adapter(src, lora.stack_adapters({"en": en, "fr": fr}))
    assert main(["inspect", str(src), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["adapter_names"] == ["en", "fr"]
    assert d["adapter_parameters"] == lora.summary(en).trainable + lora.summary(fr).trainable
    assert main(["convert", str(src), str(tmp_path / "x")]) == 1
    assert (
        "stacked adapters ['en', 'fr']" in capsys.readouterr().err and not (tmp_path / "x").exists()
    )
    assert main(["convert", str(src), str(tmp_path / "fr"), "--adapter", "fr"]) == 0
    _same_adapters(lora.load_peft(tmp_path / "fr", base), fr)
