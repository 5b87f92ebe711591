"""Interop with the real PEFT: files written by lora_jax load in PEFT and give the same
outputs, and the other way round."""

import json
import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax

import lora_jax as lora

from .helpers import dense_lora, randomise_model


torch = pytest.importorskip("torch", reason="PEFT interop needs torch: pip install torch==2.13.0")
peft = pytest.importorskip("peft", reason="PEFT interop needs peft: pip install peft")


class Net(eqx.Module):
    layers: list
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jr.split(key, 3)
        self.layers = [eqx.nn.Linear(4, 6, key=k1), eqx.nn.Linear(6, 5, key=k2)]
        self.head = eqx.nn.Linear(5, 3, key=k3)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)


class TorchNet(torch.nn.Module):
    def __init__(self, names=("layers", "head")):
        super().__init__()
        self.names = names
        setattr(self, names[0], torch.nn.ModuleList([torch.nn.Linear(4, 6), torch.nn.Linear(6, 5)]))
        setattr(self, names[1], torch.nn.Linear(5, 3))

    def forward(self, x):
        for layer in getattr(self, self.names[0]):
            x = torch.tanh(layer(x))
        return getattr(self, self.names[1])(x)


def _torch_copy(net: Net, names=("layers", "head")) -> TorchNet:
    """A torch model with the Equinox model's (base) weights."""
    tnet = TorchNet(names)
    base = lora.materialise(lora.unloraify(net)[0])
    pairs = [(getattr(tnet, names[0])[i], base.layers[i]) for i in range(2)]
    pairs.append((getattr(tnet, names[1]), base.head))
    with torch.no_grad():
        for t, e in pairs:
            t.weight.copy_(torch.tensor(np.array(e.weight)))
            t.bias.copy_(torch.tensor(np.array(e.bias)))
    return tnet


def _dense_forward(model, x):
    """The adapted Equinox model written plainly: every weight w + s·a@b."""

    def lin(layer, x):
        w = layer.weight
        if lora.is_adapter(w):
            w = dense_lora(w._w, w.a, w.b, w.scaling)
        return w @ x + layer.bias

    for layer in model.layers:
        x = jnp.tanh(lin(layer, x))
    return lin(model.head, x)


def _inputs(key, n=5):
    return np.array(jr.normal(key, (n, 4)))


def _torch_out(tmodel, xs):
    with torch.no_grad():
        return tmodel(torch.tensor(np.array(xs))).numpy()


def _eqx_out(model, xs):
    f = eqx.filter_jit(eqx.filter_vmap(lambda m, x: quax.quaxify(m)(x), in_axes=(None, 0)))
    return np.asarray(f(model, jnp.asarray(xs)))


def _bump_biases(model, key, which="all"):
    """Change the biases of `which` (`"layers"`, `"head"`, `"all"`) so that saving and
    loading them is visible in the outputs."""
    layers = which in ("layers", "all")
    head = which in ("head", "all")
    get = lambda m: ((m.layers[0].bias, m.layers[1].bias) if layers else ()) + ((m.head.bias,) if head else ())
    keys = jr.split(key, 3)
    return eqx.tree_at(get, model, tuple(jr.normal(k, b.shape) for k, b in zip(keys, get(model))))


EXPORT_CASES = {
    "quax_scaling": dict(loraify=dict(rank=2), save=dict()),
    "alpha": dict(loraify=dict(rank=3, alpha=5.0), save=dict()),
    "rslora": dict(loraify=dict(rank=4, alpha=3.0, rslora=True), save=dict(rslora=True)),
    "rslora_model_plain_file": dict(loraify=dict(rank=4, alpha=3.0, rslora=True), save=dict()),
    "patterns": dict(
        loraify=dict(rank=2, alpha=4.0, rank_pattern={"layers.1": 3}, alpha_pattern={"head": 7.0}),
        save=dict(),
    ),
    "bias_lora_only": dict(loraify=dict(rank=2, where=["layers.0", "layers.1"]), save=dict(train_bias="lora_only"), bias="layers"),
    "bias_all": dict(loraify=dict(rank=2, where=["layers.0", "layers.1"]), save=dict(train_bias="all"), bias="all"),
    "modules_to_save": dict(loraify=dict(rank=2, where=["layers.0", "layers.1"]), save=dict(trainable=["head"]), bias="head"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES), ids=list(EXPORT_CASES))
def test_lora_jax_to_peft(tmp_path, getkey, case):
    spec = EXPORT_CASES[case]
    base = Net(getkey())
    tbase = _torch_copy(base)
    model = randomise_model(lora.loraify(base, key=getkey(), **spec["loraify"]), getkey())
    if spec.get("bias"):
        model = _bump_biases(model, getkey(), spec["bias"])
    lora.save_peft(tmp_path, model, **spec["save"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False
    pmodel = peft.PeftModel.from_pretrained(tbase, str(tmp_path))
    xs = _inputs(getkey())
    want = np.stack([np.asarray(_dense_forward(model, jnp.asarray(x))) for x in xs])
    assert np.allclose(_eqx_out(model, xs), want, atol=1e-5)
    assert np.allclose(_torch_out(pmodel, xs), want, atol=1e-5)
    # ...and PEFT's file loads back into the same factors and scalings, bitwise.
    back = lora.load_peft(tmp_path, base if not spec.get("bias") else _bump_biases(base, getkey()))
    for i in range(2):
        got, exp = back.layers[i].weight, model.layers[i].weight
        assert np.array_equal(got.a, exp.a) and np.array_equal(got.b, exp.b)
        assert np.asarray(got.scaling).tobytes() == np.asarray(exp.scaling).tobytes()
    if spec.get("bias"):
        for got, exp in [(back.layers[0].bias, model.layers[0].bias), (back.head.bias, model.head.bias)]:
            if spec["bias"] == "all" or (spec["bias"] == "layers") == (got is back.layers[0].bias):
                assert np.array_equal(got, exp)


def test_quax_scaling_gives_alpha_r(tmp_path, getkey):
    model = lora.loraify(Net(getkey()), rank=3, key=getkey())
    lora.save_peft(tmp_path, model, base_model_name_or_path="tiny/net")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert sorted(config["target_modules"]) == ["head", "layers.0", "layers.1"]
    assert config["base_model_name_or_path"] == "tiny/net"
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).r == 3


@pytest.mark.parametrize("as_callable", [False, True])
def test_name_map(tmp_path, getkey, as_callable):
    base = Net(getkey())
    names = ("blocks", "out")
    tbase = _torch_copy(base, names)
    model = randomise_model(lora.loraify(base, rank=2, key=getkey()), getkey())
    mapping = {"layers": "blocks", "layers.0": "blocks.0", "layers.1": "blocks.1", "head": "out"}
    name_map = (lambda n: mapping.get(n, n)) if as_callable else mapping
    lora.save_peft(tmp_path, model, name_map=name_map)
    pmodel = peft.PeftModel.from_pretrained(tbase, str(tmp_path))
    xs = _inputs(getkey())
    assert np.allclose(_torch_out(pmodel, xs), _eqx_out(model, xs), atol=1e-5)
    back = lora.load_peft(tmp_path, base, name_map=name_map)
    assert np.allclose(_eqx_out(back, xs), _eqx_out(model, xs), atol=1e-6)
    with pytest.raises(ValueError, match=r"module 'blocks\.0'.*`model` does not have"):
        lora.load_peft(tmp_path, base)


IMPORT_CASES = {
    "lora": dict(r=2, lora_alpha=4, target_modules=["layers.0", "layers.1", "head"]),
    "rslora": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["layers.0", "head"]),
    "patterns": dict(
        r=2, lora_alpha=4, target_modules=["layers.0", "layers.1", "head"],
        rank_pattern={"layers.1": 3}, alpha_pattern={"head": 9},
    ),
    "regex_targets": dict(r=2, lora_alpha=2, target_modules=r"layers\.\d"),
    "bias_lora_only": dict(r=2, lora_alpha=4, target_modules=["layers.0"], bias="lora_only"),
    "bias_all": dict(r=2, lora_alpha=4, target_modules=["layers.0"], bias="all"),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["layers.0", "layers.1"], modules_to_save=["head"]),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES), ids=list(IMPORT_CASES))
def test_peft_to_lora_jax(tmp_path, getkey, case):
    torch.manual_seed(0)
    base = Net(getkey())
    pmodel = peft.get_peft_model(_torch_copy(base), peft.LoraConfig(**IMPORT_CASES[case]))
    with torch.no_grad():
        for name, p in pmodel.named_parameters():
            if p.requires_grad:  # lora_B is zero at init: make the adapter do something
                p.copy_(torch.randn_like(p) * 0.5)
    pmodel.save_pretrained(str(tmp_path))
    model = lora.load_peft(tmp_path, base)
    xs = _inputs(getkey())
    want = _torch_out(pmodel, xs)
    assert np.allclose(_eqx_out(model, xs), want, atol=1e-5)
    assert np.allclose(np.stack([_dense_forward(model, jnp.asarray(x)) for x in xs]), want, atol=1e-5)
    # The scaling is PEFT's, layer by layer.
    for name, module in pmodel.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            ours = model
            for part in name.split("."):
                ours = ours[int(part)] if part.isdigit() else getattr(ours, part)
            assert math.isclose(float(ours.weight.scaling), module.scaling["default"], rel_tol=1e-6)


def test_load_into_adapted_model_replaces_factors(tmp_path, getkey):
    base = Net(getkey())
    pmodel = peft.get_peft_model(_torch_copy(base), peft.LoraConfig(r=2, target_modules=["layers.0"]))
    with torch.no_grad():
        for p in pmodel.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    pmodel.save_pretrained(str(tmp_path))
    adapted = lora.loraify(base, rank=2, key=getkey(), where=["layers.0"], allow_materialise=True)
    model = lora.load_peft(tmp_path, adapted)
    assert model.layers[0].weight.allow_materialise
    xs = _inputs(getkey())
    assert np.allclose(_eqx_out(model, xs), _torch_out(pmodel, xs), atol=1e-5)


def _write_config(tmp_path, **changes):
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(changes)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))


def test_errors(tmp_path, getkey):
    base = Net(getkey())
    with pytest.raises(FileNotFoundError, match="No PEFT adapter directory"):
        lora.load_peft(tmp_path / "nope", base)
    with pytest.raises(ValueError, match="no adapters to save"):
        lora.save_peft(tmp_path, base)
    lora.save_peft(tmp_path, lora.loraify(base, rank=2, key=getkey()))
    _write_config(tmp_path, peft_type="IA3")
    with pytest.raises(ValueError, match="peft_type 'IA3'.*supported: LORA"):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, peft_type="LORA", use_dora=True)
    with pytest.raises(ValueError, match=r"use_dora=True.*not support"):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, use_dora=False, lora_bias=True)
    with pytest.raises(ValueError, match="`lora_bias=True`"):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, lora_bias=False, rank_pattern={"head": 5})
    with pytest.raises(ValueError, match="module 'head' has rank 2, but adapter_config.json says 5"):
        lora.load_peft(tmp_path, base)
    small = eqx.tree_at(lambda m: m.layers, base, [base.layers[0]])
    _write_config(tmp_path, rank_pattern={})
    with pytest.raises(ValueError, match=r"module 'layers\.1', which `model` does not have"):
        lora.load_peft(tmp_path, small)
    with pytest.raises(ValueError, match="one-to-one"):
        lora.load_peft(tmp_path, base, name_map=lambda n: "x")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json' is not valid JSON"):
        lora.load_peft(tmp_path, base)
