"""Interop with the real PEFT, for every method (LoRA, rsLoRA, DoRA, LoKr, LoHa): files
written by lora_jax load in PEFT and give the same outputs, and the other way round;
parameter counts and tensor layouts equal PEFT's."""

import json
import math

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import quax
from safetensors.numpy import load_file

import lora_jax as lora
from lora_jax._io import saved_fields

from .helpers import randomise_model


torch = pytest.importorskip("torch", reason="PEFT interop needs torch: pip install torch==2.13.0")
peft = pytest.importorskip("peft", reason="PEFT interop needs peft: pip install peft")

SIZES = (4, 6, 8, 3)


class Net(eqx.Module):
    layers: list
    head: eqx.nn.Linear

    def __init__(self, key, sizes=SIZES):
        k1, k2, k3 = jr.split(key, 3)
        a, b, c, d = sizes
        self.layers = [eqx.nn.Linear(a, b, key=k1), eqx.nn.Linear(b, c, key=k2)]
        self.head = eqx.nn.Linear(c, d, key=k3)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x)


class TorchNet(torch.nn.Module):
    def __init__(self, names=("layers", "head"), sizes=SIZES):
        super().__init__()
        self.names = names
        a, b, c, d = sizes
        setattr(self, names[0], torch.nn.ModuleList([torch.nn.Linear(a, b), torch.nn.Linear(b, c)]))
        setattr(self, names[1], torch.nn.Linear(c, d))

    def forward(self, x):
        for layer in getattr(self, self.names[0]):
            x = torch.tanh(layer(x))
        return getattr(self, self.names[1])(x)


def _torch_copy(net: Net, names=("layers", "head"), sizes=SIZES) -> TorchNet:
    """A torch model with the Equinox model's (base) weights."""
    tnet = TorchNet(names, sizes)
    base = lora.materialise(lora.unloraify(net)[0])
    pairs = [(getattr(tnet, names[0])[i], base.layers[i]) for i in range(2)]
    pairs.append((getattr(tnet, names[1]), base.head))
    with torch.no_grad():
        for t, e in pairs:
            t.weight.copy_(torch.tensor(np.array(e.weight)))
            t.bias.copy_(torch.tensor(np.array(e.bias)))
    return tnet.eval()


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def dense_weight(w) -> np.ndarray:
    """An adapted weight written plainly from its method's formula, in float64."""
    if not lora.is_adapter(w):
        return _f64(w)
    base, s = _f64(w._w), float(w.scaling)
    if isinstance(w, lora.LoraArray):
        return base + s * _f64(w.a) @ _f64(w.b)
    if isinstance(w, lora.DoraArray):
        v = base + s * _f64(w.a) @ _f64(w.b)
        return _f64(w.m)[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
    if isinstance(w, lora.LokrArray):
        w1 = _f64(w.w1) if w.w1 is not None else _f64(w.w1_a) @ _f64(w.w1_b)
        w2 = _f64(w.w2) if w.w2 is not None else _f64(w.w2_a) @ _f64(w.w2_b)
        return base + s * np.kron(w1, w2)
    if isinstance(w, lora.LohaArray):
        return base + s * (_f64(w.w1a) @ _f64(w.w1b)) * (_f64(w.w2a) @ _f64(w.w2b))
    raise TypeError(type(w))


def _dense_forward(model, xs):
    def lin(layer, x):
        return x @ dense_weight(layer.weight).T + _f64(layer.bias)

    x = _f64(xs)
    for layer in model.layers:
        x = np.tanh(lin(layer, x))
    return lin(model.head, x)


def _inputs(key, n=5, dim=SIZES[0]):
    return np.array(jr.normal(key, (n, dim)))


def _torch_out(tmodel, xs):
    with torch.no_grad():
        return tmodel(torch.tensor(np.array(xs, np.float32))).numpy()


def _eqx_out(model, xs):
    f = eqx.filter_jit(eqx.filter_vmap(lambda m, x: quax.quaxify(m)(x), in_axes=(None, 0)))
    return np.asarray(f(model, jnp.asarray(xs, jnp.float32)))


def _bump_biases(model, key, which="all"):
    """Change the biases of `which` (`"layers"`, `"head"`, `"all"`) so that saving and
    loading them is visible in the outputs."""
    layers = which in ("layers", "all")
    head = which in ("head", "all")
    get = lambda m: (
        ((m.layers[0].bias, m.layers[1].bias) if layers else ()) + ((m.head.bias,) if head else ())
    )
    keys = jr.split(key, 3)
    return eqx.tree_at(get, model, tuple(jr.normal(k, b.shape) for k, b in zip(keys, get(model))))


def _assert_same_adapters(got, want):
    """Every saved field and the scaling of every adapter, bitwise."""
    for g, w in [
        (got.layers[0].weight, want.layers[0].weight),
        (got.layers[1].weight, want.layers[1].weight),
        (got.head.weight, want.head.weight),
    ]:
        assert type(g) is type(w)
        if not lora.is_adapter(w):
            continue
        assert saved_fields(g) == saved_fields(w)
        for f in saved_fields(w):
            x, y = np.asarray(getattr(g, f)), np.asarray(getattr(w, f))
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f


TWO = ["layers.0", "layers.1"]
EXPORT_CASES = {
    "quax_scaling": dict(loraify=dict(rank=2), save=dict()),
    "alpha": dict(loraify=dict(rank=3, alpha=5.0), save=dict()),
    "rslora": dict(loraify=dict(rank=4, alpha=3.0, rslora=True), save=dict(rslora=True)),
    "rslora_model_plain_file": dict(loraify=dict(rank=4, alpha=3.0, rslora=True), save=dict()),
    "patterns": dict(
        loraify=dict(rank=2, alpha=4.0, rank_pattern={"layers.1": 3}, alpha_pattern={"head": 7.0}),
        save=dict(),
    ),
    "bias_lora_only": dict(
        loraify=dict(rank=2, where=TWO), save=dict(train_bias="lora_only"), bias="layers"
    ),
    "bias_all": dict(loraify=dict(rank=2, where=TWO), save=dict(train_bias="all"), bias="all"),
    "modules_to_save": dict(
        loraify=dict(rank=2, where=TWO), save=dict(trainable=["head"]), bias="head"
    ),
    "dora": dict(loraify=dict(method="dora", rank=2, alpha=4.0), save=dict()),
    "dora_rslora_patterns": dict(
        loraify=dict(method="dora", rank=2, alpha=3.0, rslora=True, rank_pattern={"head": 3}),
        save=dict(rslora=True),
    ),
    "dora_bias": dict(
        loraify=dict(method="dora", rank=2, where=TWO),
        save=dict(train_bias="lora_only"),
        bias="layers",
    ),
    "lokr": dict(loraify=dict(method="lokr", rank=2, alpha=4.0, init_weights=False), save=dict()),
    "lokr_decompose_both": dict(
        loraify=dict(method="lokr", rank=1, decompose_both=True, where=TWO), save=dict()
    ),
    "lokr_factor": dict(
        loraify=dict(method="lokr", rank=2, alpha=3.0, decompose_factor=2, where=TWO), save=dict()
    ),
    "lokr_patterns": dict(
        loraify=dict(
            method="lokr",
            rank=1,
            alpha=2.0,
            rank_pattern={"layers.1": 4},
            alpha_pattern={"head": 5.0},
        ),
        save=dict(),
    ),
    "loha": dict(loraify=dict(method="loha", rank=2, alpha=3.0), save=dict()),
    "loha_modules_to_save": dict(
        loraify=dict(method="loha", rank=3, rank_pattern={"layers.1": 1}, where=TWO),
        save=dict(trainable=["head"]),
        bias="head",
    ),
}
PEFT_TYPE = {"dora": "LORA", "lokr": "LOKR", "loha": "LOHA"}


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
    method = spec["loraify"].get("method", "lora")
    assert config["peft_type"] == PEFT_TYPE.get(method, "LORA")
    if config["peft_type"] == "LORA":
        assert config["use_dora"] is (method == "dora")
    pmodel = peft.PeftModel.from_pretrained(tbase, str(tmp_path)).eval()
    xs = _inputs(getkey())
    want = _dense_forward(model, xs)
    assert np.allclose(_eqx_out(model, xs), want, atol=1e-5)
    assert np.allclose(_torch_out(pmodel, xs), want, atol=1e-5)
    # ...and PEFT's file loads back into the same adapters, bitwise.
    back = lora.load_peft(tmp_path, base if not spec.get("bias") else _bump_biases(base, getkey()))
    _assert_same_adapters(back, model)
    if spec.get("bias"):
        for got, exp in [
            (back.layers[0].bias, model.layers[0].bias),
            (back.head.bias, model.head.bias),
        ]:
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
    assert np.allclose(_torch_out(pmodel, xs), _dense_forward(model, xs), atol=1e-5)
    back = lora.load_peft(tmp_path, base, name_map=name_map)
    _assert_same_adapters(back, model)
    with pytest.raises(ValueError, match=r"module 'blocks\.0'.*`model` does not have"):
        lora.load_peft(tmp_path, base)


ALL = ["layers.0", "layers.1", "head"]
IMPORT_CASES = {
    "lora": ("LoraConfig", dict(r=2, lora_alpha=4, target_modules=ALL)),
    "rslora": (
        "LoraConfig",
        dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["layers.0", "head"]),
    ),
    "patterns": (
        "LoraConfig",
        dict(
            r=2,
            lora_alpha=4,
            target_modules=ALL,
            rank_pattern={"layers.1": 3},
            alpha_pattern={"head": 9},
        ),
    ),
    "regex_targets": ("LoraConfig", dict(r=2, lora_alpha=2, target_modules=r"layers\.\d")),
    "bias_lora_only": (
        "LoraConfig",
        dict(r=2, lora_alpha=4, target_modules=["layers.0"], bias="lora_only"),
    ),
    "bias_all": ("LoraConfig", dict(r=2, lora_alpha=4, target_modules=["layers.0"], bias="all")),
    "modules_to_save": (
        "LoraConfig",
        dict(r=2, lora_alpha=4, target_modules=TWO, modules_to_save=["head"]),
    ),
    "dora": ("LoraConfig", dict(r=2, lora_alpha=4, use_dora=True, target_modules=ALL)),
    "dora_rslora_pattern": (
        "LoraConfig",
        dict(
            r=2,
            lora_alpha=3,
            use_dora=True,
            use_rslora=True,
            target_modules=ALL,
            rank_pattern={"head": 1},
        ),
    ),
    "lokr": ("LoKrConfig", dict(r=2, alpha=4, target_modules=ALL)),
    "lokr_decompose_both": (
        "LoKrConfig",
        dict(r=1, alpha=3, decompose_both=True, target_modules=ALL),
    ),
    "lokr_factor_patterns": (
        "LoKrConfig",
        dict(
            r=2,
            alpha=2,
            decompose_factor=2,
            target_modules=ALL,
            rank_pattern={"layers.1": 1},
            alpha_pattern={"head": 7},
        ),
    ),
    "loha": ("LoHaConfig", dict(r=2, alpha=3, target_modules=ALL)),
    "loha_patterns_modules_to_save": (
        "LoHaConfig",
        dict(
            r=3, alpha=2, target_modules=TWO, rank_pattern={"layers.0": 1}, modules_to_save=["head"]
        ),
    ),
}
ADAPTER_TYPES = {
    "LoraConfig": lora.LoraArray,
    "LoKrConfig": lora.LokrArray,
    "LoHaConfig": lora.LohaArray,
}


def _randomise_torch(pmodel, scale=0.5):
    """Every trainable parameter random (PEFT's init makes most adapters no-ops)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for _, p in pmodel.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * scale)
    return pmodel.eval()


def _module(model, name):
    for part in name.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


@pytest.mark.parametrize("case", list(IMPORT_CASES), ids=list(IMPORT_CASES))
def test_peft_to_lora_jax(tmp_path, getkey, case):
    cls, kwargs = IMPORT_CASES[case]
    base = Net(getkey())
    pmodel = _randomise_torch(peft.get_peft_model(_torch_copy(base), getattr(peft, cls)(**kwargs)))
    pmodel.save_pretrained(str(tmp_path))
    model = lora.load_peft(tmp_path, base)
    xs = _inputs(getkey())
    want = _torch_out(pmodel, xs)
    assert np.allclose(_eqx_out(model, xs), want, atol=1e-5)
    assert np.allclose(_dense_forward(model, xs), want, atol=1e-5)
    # Each adapted layer is the method's value with PEFT's scaling.
    expected = lora.DoraArray if kwargs.get("use_dora") else ADAPTER_TYPES[cls]
    seen = 0
    for name, module in pmodel.base_model.model.named_modules():
        if isinstance(module, (peft.tuners.lora.LoraLayer, peft.tuners.lycoris_utils.LycorisLayer)):
            ours = _module(model, name).weight
            assert type(ours) is expected
            assert ours.rank == module.r["default"]
            assert math.isclose(float(ours.scaling), module.scaling["default"], rel_tol=1e-6)
            seen += 1
    assert seen > 0


def test_load_into_adapted_model_replaces_factors(tmp_path, getkey):
    base = Net(getkey())
    pmodel = peft.get_peft_model(
        _torch_copy(base), peft.LoraConfig(r=2, target_modules=["layers.0"])
    )
    _randomise_torch(pmodel, 1.0).save_pretrained(str(tmp_path))
    adapted = lora.loraify(base, rank=2, key=getkey(), where=["layers.0"], allow_materialise=True)
    model = lora.load_peft(tmp_path, adapted)
    assert model.layers[0].weight.allow_materialise
    xs = _inputs(getkey())
    assert np.allclose(_dense_forward(model, xs), _torch_out(pmodel, xs), atol=1e-5)
    # A model adapted with another method there: PEFT's method wins, the flags stay.
    other = lora.loraify(
        base, rank=2, key=getkey(), where=["layers.0"], method="loha", allow_materialise=True
    )
    model = lora.load_peft(tmp_path, other)
    assert (
        type(model.layers[0].weight) is lora.LoraArray and model.layers[0].weight.allow_materialise
    )
    assert np.allclose(_dense_forward(model, xs), _torch_out(pmodel, xs), atol=1e-5)


# Parameter counts and tensor layouts against PEFT's own, for LoKr and LoHa
# configurations that exercise its rules for when each factor is decomposed.
WIDE = (16, 24, 36, 10)
COUNT_CASES = {
    "lokr_r2": ("LoKrConfig", dict(r=2), dict(method="lokr", rank=2)),
    "lokr_r8_full": ("LoKrConfig", dict(r=8), dict(method="lokr", rank=8)),
    "lokr_decompose_both": (
        "LoKrConfig",
        dict(r=1, decompose_both=True),
        dict(method="lokr", rank=1, decompose_both=True),
    ),
    "lokr_factor_4": (
        "LoKrConfig",
        dict(r=2, decompose_factor=4),
        dict(method="lokr", rank=2, decompose_factor=4),
    ),
    "lokr_factor_5_nondividing": (
        "LoKrConfig",
        dict(r=3, decompose_factor=5),
        dict(method="lokr", rank=3, decompose_factor=5),
    ),
    "lokr_both_factor_8": (
        "LoKrConfig",
        dict(r=1, decompose_both=True, decompose_factor=8),
        dict(method="lokr", rank=1, decompose_both=True, decompose_factor=8),
    ),
    "lokr_rank_pattern": (
        "LoKrConfig",
        dict(r=1, rank_pattern={"head": 6}),
        dict(method="lokr", rank=1, rank_pattern={"head": 6}),
    ),
    "loha_r2": ("LoHaConfig", dict(r=2), dict(method="loha", rank=2)),
    "loha_r5_pattern": (
        "LoHaConfig",
        dict(r=5, rank_pattern={"layers.0": 2}),
        dict(method="loha", rank=5, rank_pattern={"layers.0": 2}),
    ),
}


@pytest.mark.parametrize("case", list(COUNT_CASES), ids=list(COUNT_CASES))
def test_counts_and_layout_match_peft(tmp_path, getkey, case):
    from safetensors.numpy import load_file

    cls, pkw, okw = COUNT_CASES[case]
    base = Net(getkey(), WIDE)
    pmodel = peft.get_peft_model(
        _torch_copy(base, sizes=WIDE), getattr(peft, cls)(target_modules=ALL, **pkw)
    )
    peft_trainable = sum(p.numel() for p in pmodel.parameters() if p.requires_grad)
    model = lora.loraify(base, key=getkey(), where=ALL, **okw)
    assert lora.summary(model).trainable == peft_trainable
    pmodel.save_pretrained(str(tmp_path / "peft"))
    lora.save_peft(tmp_path / "ours", model)
    theirs = {
        k: v.shape
        for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()
    }
    ours = {
        k: v.shape
        for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()
    }
    assert ours == theirs


# Stacked layers: one weight (L, out, in) run with `lax.scan`, saved as PEFT's
# `layers.0`, `layers.1`, ... through a name template.

L = 3


class Stacked(eqx.Module):
    blocks: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.blocks = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(jr.split(k1, L))
        self.head = eqx.nn.Linear(4, 2, key=k2)

    def __call__(self, x):
        params, static = eqx.partition(self.blocks, eqx.is_array)
        step = lambda x, p: (jnp.tanh(eqx.combine(p, static)(x)), None)
        return self.head(lax.scan(step, x, params)[0])


class TorchStacked(torch.nn.Module):
    def __init__(self, net: Stacked):
        super().__init__()
        base = lora.materialise(lora.unloraify(net)[0])
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(L)])
        self.out = torch.nn.Linear(4, 2)
        with torch.no_grad():
            for i, t in enumerate(self.layers):
                t.weight.copy_(torch.tensor(np.array(base.blocks.weight[i])))
                t.bias.copy_(torch.tensor(np.array(base.blocks.bias[i])))
            self.out.weight.copy_(torch.tensor(np.array(base.head.weight)))
            self.out.bias.copy_(torch.tensor(np.array(base.head.bias)))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x)


def _stacked_dense(model, xs):
    w = model.blocks.weight
    x = _f64(xs)
    for i in range(L):
        one = jtu_slice(w, i)
        x = np.tanh(x @ dense_weight(one).T + _f64(model.blocks.bias[i]))
    return x @ dense_weight(model.head.weight).T + _f64(model.head.bias)


def jtu_slice(w, i):
    """Layer `i` of a stacked adapter (every leaf with the stacking axis sliced)."""
    if not lora.is_adapter(w):
        return w[i]
    fields = [f for f in (*saved_fields(w), "_w")]
    return eqx.tree_at(
        lambda v: tuple(getattr(v, f) for f in fields), w, tuple(getattr(w, f)[i] for f in fields)
    )


def _stack_map(name):
    """Our `blocks` (stacked) are torch's `layers.0`, `layers.1`, ...; `head` is `out`."""
    return "out" if name == "head" else name.replace("blocks", "layers.{i}", 1)


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr"])
def test_stacked_layers_both_ways(tmp_path, getkey, method):
    base = Stacked(getkey())
    model = randomise_model(
        lora.loraify(base, rank=2, alpha=3.0, key=getkey(), method=method, where=["blocks"]),
        getkey(),
    )
    # PEFT's LoHa and LoKr have no `bias`.
    train_bias = "none" if method in ("loha", "lokr") else "lora_only"
    if train_bias != "none":
        model = eqx.tree_at(lambda m: m.blocks.bias, model, jr.normal(getkey(), (L, 4)))
    lora.save_peft(tmp_path, model, name_map=_stack_map, train_bias=train_bias)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [f"layers.{i}" for i in range(L)]
    pmodel = peft.PeftModel.from_pretrained(TorchStacked(base).eval(), str(tmp_path)).eval()
    xs = _inputs(getkey(), dim=4)
    assert np.allclose(_torch_out(pmodel, xs), _stacked_dense(model, xs), atol=1e-5)
    back = lora.load_peft(tmp_path, base, name_map=_stack_map)
    for f in (*saved_fields(model.blocks.weight), "_w"):
        assert (
            np.asarray(getattr(back.blocks.weight, f)).tobytes()
            == np.asarray(getattr(model.blocks.weight, f)).tobytes()
        )
    if train_bias != "none":
        assert np.array_equal(back.blocks.bias, model.blocks.bias)
    # A PEFT adapter trained layer by layer loads into the stack; the scanned model agrees.
    _randomise_torch(pmodel).save_pretrained(str(tmp_path / "trained"))
    trained = lora.load_peft(tmp_path / "trained", base, name_map=_stack_map)
    assert trained.blocks.weight.scaling.shape == (L,)
    out = eqx.filter_jit(eqx.filter_vmap(lambda m, x: quax.quaxify(m)(x), in_axes=(None, 0)))(
        trained, jnp.asarray(xs, jnp.float32)
    )
    assert np.allclose(np.asarray(out), _torch_out(pmodel, xs), atol=1e-5)


def test_stacked_errors(tmp_path, getkey):
    base = Stacked(getkey())
    model = lora.loraify(base, rank=2, key=getkey(), where=["blocks"])
    with pytest.raises(
        ValueError, match=r"'blocks\.weight' is stacked.*\{i\} in `name_map`.*save_adapter"
    ):
        lora.save_peft(tmp_path, model)
    both = lora.loraify(base, rank=2, key=getkey(), where=["blocks", "head"])
    with pytest.raises(
        ValueError, match=r"'head\.weight', but that adapter is not stacked; \{i\} is only for"
    ):
        lora.save_peft(tmp_path, both, name_map=lambda n: "x.{i}" if n == "head" else _stack_map(n))
    # A PEFT adapter for only some of the stacked layers cannot fill the stack.
    pmodel = peft.get_peft_model(
        TorchStacked(base), peft.LoraConfig(r=2, target_modules=["layers.0", "layers.2"])
    )
    pmodel.save_pretrained(str(tmp_path / "partial"))
    with pytest.raises(ValueError, match=r"layers \[0, 2\] of a stack of 3"):
        lora.load_peft(tmp_path / "partial", base, name_map=_stack_map)
    with pytest.raises(ValueError, match=r"module 'layers\.0', which `model` does not have"):
        lora.load_peft(tmp_path / "partial", base)


def test_one_adapter_of_many(tmp_path, getkey):
    base = Net(getkey())
    en = randomise_model(lora.loraify(base, rank=2, key=getkey()), getkey())
    fr = randomise_model(lora.loraify(base, rank=3, alpha=6.0, key=getkey()), getkey())
    both = lora.stack_adapters({"en": en, "fr": fr})
    with pytest.raises(ValueError, match=r"several stacked adapters \['en', 'fr'\].*`adapter=`"):
        lora.save_peft(tmp_path, both)
    with pytest.raises(ValueError, match=r"`adapter` 'de' is not an adapter of `model`"):
        lora.save_peft(tmp_path, both, adapter="de")
    lora.save_peft(tmp_path / "fr", both, adapter="fr")
    pmodel = peft.PeftModel.from_pretrained(_torch_copy(base), str(tmp_path / "fr")).eval()
    xs = _inputs(getkey())
    assert np.allclose(_torch_out(pmodel, xs), _dense_forward(fr, xs), atol=1e-5)
    # Hot-swap a PEFT adapter into the stack: a new name is added, an old one replaced.
    de = _randomise_torch(
        peft.get_peft_model(
            _torch_copy(base), peft.LoraConfig(r=2, lora_alpha=5, target_modules=ALL)
        )
    )
    de.save_pretrained(str(tmp_path / "de"))
    three = lora.load_peft(tmp_path / "de", both, adapter="de")
    assert lora.adapter_names(three) == ("en", "fr", "de")
    assert np.allclose(_eqx_out(lora.set_adapter(three, "de"), xs), _torch_out(de, xs), atol=1e-5)
    assert np.allclose(_eqx_out(three, xs), _dense_forward(en, xs), atol=1e-5)  # "en" still active
    swapped = lora.load_peft(tmp_path / "de", both, adapter="en")
    assert lora.adapter_names(swapped) == ("en", "fr")
    assert np.allclose(_eqx_out(swapped, xs), _torch_out(de, xs), atol=1e-5)
    with pytest.raises(ValueError, match="pass `adapter=`"):
        lora.load_peft(tmp_path / "de", both)


def _write_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_errors(tmp_path, getkey):
    base = Net(getkey())
    with pytest.raises(FileNotFoundError, match="No PEFT adapter directory"):
        lora.load_peft(tmp_path / "nope", base)
    with pytest.raises(ValueError, match="no adapters to save"):
        lora.save_peft(tmp_path, base)
    assert not (tmp_path / "adapter_config.json").exists()
    lora.save_peft(tmp_path, lora.loraify(base, rank=2, key=getkey()))
    _write_config(tmp_path, peft_type="IA3")
    with pytest.raises(ValueError, match="peft_type 'IA3'.*supported: LOHA, LOKR, LORA"):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, peft_type="LORA", use_dora=True)
    with pytest.raises(ValueError, match=r"lacks base_model\.model\.head\.lora_magnitude_vector"):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, use_dora=False, lora_bias=True)
    with pytest.raises(ValueError, match="`lora_bias=True`"):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, lora_bias=False, init_lora_weights="pissa")
    with pytest.raises(
        ValueError, match="`init_lora_weights='pissa'`.*only True, False, 'gaussian'"
    ):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, init_lora_weights=True, use_velora=True)
    with pytest.raises(
        ValueError, match="`use_velora=True`, a key PEFT's LORA config does not have"
    ):
        lora.load_peft(tmp_path, base)
    _write_config(
        tmp_path, use_velora=None, some_future_option=None, r=0
    )  # empty unknown keys are fine
    with pytest.raises(ValueError, match="`r=0`; it must be a positive integer"):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, r=2, lora_dropout=1.5)
    with pytest.raises(ValueError, match=r"`lora_dropout=1\.5`; it must be a number in \[0, 1\)"):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, lora_dropout=0.0, rank_pattern={"(": 2})
    with pytest.raises(ValueError, match="`rank_pattern="):
        lora.load_peft(tmp_path, base)
    _write_config(tmp_path, rank_pattern={"head": 5})
    with pytest.raises(
        ValueError, match="module 'head' has rank 2, but adapter_config.json says 5"
    ):
        lora.load_peft(tmp_path, base)
    small = eqx.tree_at(lambda m: m.layers, base, [base.layers[0]])
    _write_config(tmp_path, rank_pattern={})
    with pytest.raises(ValueError, match=r"module 'layers\.1', which `model` does not have"):
        lora.load_peft(tmp_path, small)
    wrong = Net(getkey(), (4, 6, 7, 3))
    with pytest.raises(
        ValueError,
        match=r"head\.lora_A\.weight has shape \(2, 8\), but a Linear weight \(3, 7\) at rank 2 "
        r"needs \(2, 7\)",
    ):
        lora.load_peft(tmp_path, wrong)
    with pytest.raises(ValueError, match="one-to-one"):
        lora.load_peft(tmp_path, base, name_map=lambda n: "x")
    with pytest.raises(TypeError, match="`dtype` must be a floating dtype"):
        lora.load_peft(tmp_path, base, dtype=jnp.int32)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LOKR", "r": 2, "alpha": 2})
    )
    with pytest.raises(
        ValueError,
        match=r"'base_model\.model\.head\.lora_A\.weight'.* belongs to a lora adapter, but "
        r"adapter_config.json describes a lokr",
    ):
        lora.load_peft(tmp_path, base)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json' is not valid JSON"):
        lora.load_peft(tmp_path, base)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        lora.load_peft(tmp_path, base)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    )
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(
        ValueError, match="adapter_model.safetensors' is not a valid safetensors file"
    ):
        lora.load_peft(tmp_path, base)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(
        ValueError, match="adapter_model.bin \\(a pickle\\), which lora_jax never loads"
    ):
        lora.load_peft(tmp_path, base)
    (tmp_path / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        lora.load_peft(tmp_path, base)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        lora.load_peft(tmp_path, base)


def test_lokr_structure_mismatch(tmp_path, getkey):
    """A LoKr file whose factors PEFT would not build under its config (`w1` whole
    where `decompose_both` asks for `w1_a @ w1_b`) is refused, naming the tensor."""
    base = Net(getkey(), WIDE)
    lora.save_peft(tmp_path, lora.loraify(base, rank=1, method="lokr", key=getkey(), where=ALL))
    _write_config(tmp_path, decompose_both=True)
    with pytest.raises(ValueError, match=r"lacks base_model\.model\.head\.lokr_w1_a"):
        lora.load_peft(tmp_path, base)


def test_save_refusals(tmp_path, getkey):
    base = Net(getkey())
    lokr = lora.loraify(base, rank=2, method="lokr", key=getkey())
    with pytest.raises(ValueError, match="LOKR config has no `bias` option"):
        lora.save_peft(tmp_path, lokr, train_bias="lora_only")
    with pytest.raises(ValueError, match="`rslora=True` applies to LoRA and DoRA, not 'lokr'"):
        lora.save_peft(tmp_path, lokr, rslora=True)
    mixed = lora.loraify(
        lora.loraify(base, rank=2, key=getkey(), where=["head"]),
        rank=2,
        method="loha",
        key=getkey(),
        where=TWO,
    )
    with pytest.raises(ValueError, match="mixes"):
        lora.save_peft(tmp_path, mixed)
    # LoKr layers adapted with different options: no one PEFT config builds them all.
    one = lora.loraify(
        Net(getkey(), WIDE),
        rank=1,
        method="lokr",
        key=getkey(),
        where=["layers.0"],
        decompose_both=True,
    )
    two = lora.loraify(one, rank=1, method="lokr", key=getkey(), where=["layers.1"])
    with pytest.raises(ValueError, match="cannot be described by one PEFT LoKrConfig"):
        lora.save_peft(tmp_path, two)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_load_onto_quantised_base(tmp_path, getkey, method):
    """QLoRA's workflow: a PEFT adapter onto an int8 base; the result equals the adapter
    on the dequantised base."""
    base = Net(getkey())
    lora.save_peft(
        tmp_path, randomise_model(lora.loraify(base, rank=2, method=method, key=getkey()), getkey())
    )
    quantised = lora.quantise(base, method="int8")
    model = lora.load_peft(tmp_path, quantised)
    assert type(model.layers[0].weight._w).__name__ == "Int8Array"
    xs = _inputs(getkey())
    want = _dense_forward(lora.load_peft(tmp_path, lora.materialise(quantised)), xs)
    assert np.allclose(_eqx_out(model, xs), want, atol=1e-5)


def test_put_into_stack_errors(tmp_path, getkey):
    base = Net(getkey())
    both = lora.stack_adapters(
        {
            "en": lora.loraify(base, rank=2, key=getkey()),
            "fr": lora.loraify(base, rank=2, key=getkey()),
        }
    )
    lora.save_peft(tmp_path / "two", lora.loraify(base, rank=2, key=getkey(), where=TWO))
    with pytest.raises(
        ValueError,
        match=r"adapts \['layers\.0', 'layers\.1'\], but `model`'s stacked adapters are at "
        r"\['head', 'layers\.0', 'layers\.1'\]",
    ):
        lora.load_peft(tmp_path / "two", both, adapter="de")
    lora.save_peft(tmp_path / "bias", lora.loraify(base, rank=2, key=getkey()), train_bias="all")
    with pytest.raises(ValueError, match="stacked adapters cannot hold per adapter"):
        lora.load_peft(tmp_path / "bias", both, adapter="de")
    lora.save_peft(tmp_path / "dora", lora.loraify(base, rank=2, method="dora", key=getkey()))
    with pytest.raises(ValueError, match="holds a 'dora' adapter; stacked adapters are LoRA only"):
        lora.load_peft(tmp_path / "dora", both, adapter="de")
    with pytest.raises(ValueError, match="but `model` has none"):
        lora.load_peft(tmp_path / "two", base, adapter="de")


def test_dora_conv_equals_peft_forward(getkey):
    """PEFT's DoRA Conv2d and a `DoraConvArray` holding its tensors give one output:
    the norm taken per output channel over the input channels and the window, the
    magnitudes scaling the conv LoRA's output (PEFT's `lora_A` is our `b`, its
    `lora_B` our `a`, its `lora_magnitude_vector` our `m`). Ungrouped: for a grouped
    conv PEFT's `lora_A` sees every input channel, an update it cannot merge into the
    grouped kernel; ours keeps the kernel's groups."""
    out, inp, rank, alpha = 6, 4, 2, 3.0
    conv = torch.nn.Sequential(torch.nn.Conv2d(inp, out, 3, stride=2, padding=1, bias=False))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_dora=True)
    model = peft.get_peft_model(conv, config)
    layer = model.base_model.model[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            p.copy_(torch.randn(p.shape, generator=g))
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.copy_(torch.rand(magnitude.shape, generator=g) + 0.5)
    x = np.random.default_rng(0).standard_normal((2, inp, 9, 9)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()

    ours = eqx.nn.Conv2d(inp, out, 3, stride=2, padding=1, use_bias=False, key=getkey())
    ours = eqx.tree_at(
        lambda c: c.weight, ours, jnp.asarray(layer.base_layer.weight.detach().numpy())
    )
    ours = lora.loraify(
        ours, rank=rank, alpha=alpha, key=getkey(), method="dora", where=lambda n, l: True
    )
    held = lambda p: jnp.asarray(p.detach().numpy())  # noqa: E731
    ours = eqx.tree_at(
        lambda c: (c.weight.a, c.weight.b, c.weight.m),
        ours,
        (
            held(layer.lora_B["default"].weight),
            held(layer.lora_A["default"].weight),
            held(magnitude).reshape(out),
        ),
    )
    assert isinstance(ours.weight, lora.DoraConvArray)
    got = quax.quaxify(lambda m, x: jax.vmap(m)(x))(ours, jnp.asarray(x))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_loha_conv_equals_peft_forward(getkey):
    """PEFT's LoHa Conv2d (`use_effective_conv2d=False`) and a `LohaConvArray` holding
    its four tensors (`hada_w1_a`... are our `w1a`..., the same shapes) give one
    output."""
    out, inp, rank, alpha = 6, 4, 2, 3.0
    conv = torch.nn.Sequential(torch.nn.Conv2d(inp, out, 3, stride=2, padding=1, bias=False))
    model = peft.get_peft_model(
        conv, peft.LoHaConfig(r=rank, alpha=alpha, target_modules=["0"], init_weights=False)
    )
    layer = model.base_model.model[0]
    x = np.random.default_rng(0).standard_normal((2, inp, 9, 9)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()

    held = lambda p: jnp.asarray(p.detach().numpy())  # noqa: E731
    ours = eqx.nn.Conv2d(inp, out, 3, stride=2, padding=1, use_bias=False, key=getkey())
    ours = eqx.tree_at(lambda c: c.weight, ours, held(layer.base_layer.weight))
    ours = lora.loraify(
        ours, rank=rank, alpha=alpha, key=getkey(), method="loha", where=lambda n, l: True
    )
    names = ("w1a", "w1b", "w2a", "w2b")
    tensors = [held(getattr(layer, f"hada_{n[:2]}_{n[2]}")["default"]) for n in names]
    ours = eqx.tree_at(lambda c: [getattr(c.weight, n) for n in names], ours, tensors)
    assert isinstance(ours.weight, lora.LohaConvArray)
    got = quax.quaxify(lambda m, x: jax.vmap(m)(x))(ours, jnp.asarray(x))
    with torch.no_grad():  # `init_weights=False`: the update is not zero
        assert not np.allclose(expected, layer.base_layer(torch.from_numpy(x)).numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# --- Conv and Embedding layers ------------------------------------------------------------


class ConvNet(eqx.Module):
    """Two convs of `dims` spatial dimensions: a 3-wide one (stride 2, padding 1) and a
    1×1 one, with biases."""

    conv: eqx.nn.Conv
    mix: eqx.nn.Conv

    def __init__(self, key, dims=2):
        k1, k2 = jr.split(key)
        self.conv = eqx.nn.Conv(dims, 3, 5, 3, stride=2, padding=1, key=k1)
        self.mix = eqx.nn.Conv(dims, 5, 4, 1, key=k2)

    def __call__(self, x):
        return self.mix(jnp.tanh(self.conv(x)))


class TorchConvNet(torch.nn.Module):
    def __init__(self, dims=2):
        super().__init__()
        conv = getattr(torch.nn, f"Conv{dims}d")
        self.conv = conv(3, 5, 3, stride=2, padding=1)
        self.mix = conv(5, 4, 1)

    def forward(self, x):
        return self.mix(torch.tanh(self.conv(x)))


class EmbedNet(eqx.Module):
    """Token embeddings, a Conv1d over the sequence and a Linear head: LoRA's three
    layer kinds in one model."""

    embed: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jr.split(key, 3)
        self.embed = eqx.nn.Embedding(11, 4, key=k1)
        self.conv = eqx.nn.Conv1d(4, 6, 3, padding=1, key=k2)
        self.head = eqx.nn.Linear(6, 3, key=k3)

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens).T  # (channels, length)
        return self.head(jnp.tanh(self.conv(x)).mean(axis=-1))


class TorchEmbedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.conv = torch.nn.Conv1d(4, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, tokens):
        x = self.embed(tokens).transpose(1, 2)
        return self.head(torch.tanh(self.conv(x)).mean(dim=-1))


def _copy_into_torch(model, tmodel):
    """The Equinox model's base weights and biases into the torch model's modules of
    the same names (a conv's bias `(out, 1, ...)` is torch's `(out,)`)."""
    base = lora.materialise(lora.unloraify(model)[0])
    with torch.no_grad():
        for name, module in tmodel.named_children():
            ours = getattr(base, name)
            module.weight.copy_(torch.tensor(np.array(ours.weight)))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.tensor(np.array(ours.bias)).reshape(-1))
    return tmodel.eval()


def _dense_kernel(w) -> np.ndarray:
    """A conv or embedding adapter's weight, written plainly from its formula."""
    if not lora.is_adapter(w):
        return _f64(w)
    base, s = _f64(w._w), float(w.scaling)
    if isinstance(w, (lora.LoraConvArray, lora.DoraConvArray)):  # the "peft" form
        v = base + s * np.einsum("or,ri...->oi...", _f64(w.a).reshape(w.a.shape[:2]), _f64(w.b))
        if isinstance(w, lora.LoraConvArray):
            return v
        norm = np.sqrt((v**2).reshape(len(v), -1).sum(1))
        return v * (_f64(w.m) / norm).reshape(-1, *(1,) * (v.ndim - 1))
    # PEFT's Tucker form: W[o, i, *s] = Σ a[o, x]·t[x, y, *s]·b[y, i].
    tucker = lambda a, t, b: np.einsum("ox,xy...,yi->oi...", _f64(a), _f64(t), _f64(b))  # noqa: E731
    if isinstance(w, lora.LohaConvArray):
        if w.t1 is not None:
            delta = tucker(w.w1a, w.t1, w.w1b) * tucker(w.w2a, w.t2, w.w2b)
        else:
            delta = (_f64(w.w1a) @ _f64(w.w1b)) * (_f64(w.w2a) @ _f64(w.w2b))
        return base + s * delta.reshape(base.shape)
    if isinstance(w, lora.LokrConvArray):
        w1 = _f64(w.w1) if w.w1 is not None else _f64(w.w1_a) @ _f64(w.w1_b)
        if w.t2 is not None:
            w2 = tucker(w.w2_a, w.t2, w.w2_b)
        else:
            w2 = _f64(w.w2) if w.w2 is not None else _f64(w.w2_a) @ _f64(w.w2_b)
        w2 = w2.reshape(w2.shape[0], -1, *base.shape[2:])
        return base + s * np.einsum("iu,jv...->ijuv...", w1, w2).reshape(base.shape)
    if isinstance(w, lora.LoraEmbeddingArray):
        return base + s * _f64(w.a) @ _f64(w.b)
    return dense_weight(w)


def _plain(model):
    """The model with every adapted weight replaced by its dense float32 weight."""
    return jax.tree.map(
        lambda x: jnp.asarray(_dense_kernel(x), jnp.float32) if lora.is_adapter(x) else x,
        model,
        is_leaf=lora.is_adapter,
    )


def _run(model, xs, tokens=False):
    """Our adapted model (through quax) and the plain model with dense weights, on a
    batch."""
    with jax.default_matmul_precision("highest"):
        f = lambda m: np.asarray(jax.vmap(quax.quaxify(m))(jnp.asarray(xs)))  # noqa: E731
        return f(model), f(_plain(model))


def _run_torch(tmodel, xs):
    with torch.no_grad():
        return tmodel(torch.from_numpy(np.array(xs))).numpy()


# PEFT's LoHa and LoKr adapt Conv1d and Conv2d (with or without the Tucker form of
# `use_effective_conv2d`); LoRA and DoRA Conv3d too.
CONV_METHODS = [
    (m, d)
    for m in ("lora", "dora", "loha", "lokr", "loha-tucker", "lokr-tucker")
    for d in (1, 2, 3)
    if m in ("lora", "dora") or d < 3
]


@pytest.mark.parametrize("method,dims", CONV_METHODS, ids=[f"{m}-{d}d" for m, d in CONV_METHODS])
def test_conv_adapters_both_ways(tmp_path, getkey, method, dims):
    """Conv adapters in PEFT's format: lora_jax's file loads in PEFT and gives the same
    output as the dense reference; PEFT's file of its own random adapter loads into
    the base model and gives PEFT's output; and the round trip is bitwise."""
    method, _, form = method.partition("-")
    tucker = dict(use_effective_conv2d=True) if form == "tucker" else {}
    base = ConvNet(getkey(), dims)
    xs = np.asarray(jr.normal(getkey(), (2, 3, *(7,) * dims)), np.float32)
    bias = "all" if method in ("lora", "dora") else "none"
    model = lora.loraify(
        base, rank=2, alpha=3.0, key=getkey(), method=method, where=["conv", "mix"], **tucker
    )
    if tucker:  # the 3-wide conv holds cores, the 1×1 one the plain factors (as PEFT)
        core = model.conv.weight.t1 if method == "loha" else model.conv.weight.t2
        assert core.shape == (2, 2, *(3,) * dims)
        assert model.mix.weight.t2 is None
    model = randomise_model(model, getkey())
    if bias == "all":
        model = eqx.tree_at(
            lambda m: (m.conv.bias, m.mix.bias),
            model,
            (jr.normal(getkey(), (5,) + (1,) * dims), jr.normal(getkey(), (4,) + (1,) * dims)),
        )
    lora.save_peft(tmp_path / "ours", model, train_bias=bias)
    pmodel = peft.PeftModel.from_pretrained(
        _copy_into_torch(base, TorchConvNet(dims)), str(tmp_path / "ours")
    ).eval()
    got, want = _run(model, xs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run_torch(pmodel, xs), want, rtol=1e-4, atol=1e-4)
    back = lora.load_peft(tmp_path / "ours", base)
    for name in ("conv", "mix"):
        g, w = getattr(back, name), getattr(model, name)
        assert type(g.weight) is type(w.weight)
        for f in saved_fields(w.weight):
            assert np.array_equal(getattr(g.weight, f), getattr(w.weight, f)), (name, f)
        assert np.array_equal(g.bias, w.bias)

    config = {
        "lora": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "mix"], bias="all"),
        "dora": peft.LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "mix"], use_dora=True),
        "loha": peft.LoHaConfig(r=2, alpha=3, target_modules=["conv", "mix"], **tucker),
        "lokr": peft.LoKrConfig(r=2, alpha=3, target_modules=["conv", "mix"], **tucker),
    }[method]
    pmodel = _randomise_torch(
        peft.get_peft_model(_copy_into_torch(base, TorchConvNet(dims)), config)
    )
    if method == "lora":  # a trained bias, saved with `bias="all"`
        with torch.no_grad():
            pmodel.base_model.model.conv.base_layer.bias.add_(1.0)
    pmodel.save_pretrained(str(tmp_path / "theirs"))
    loaded = lora.load_peft(tmp_path / "theirs", base)
    assert (
        type(loaded.conv.weight).__name__
        == {
            "lora": "LoraConvArray",
            "dora": "DoraConvArray",
            "loha": "LohaConvArray",
            "lokr": "LokrConvArray",
        }[method]
    )
    got, want = _run(loaded, xs)
    expected = _run_torch(pmodel, xs)
    np.testing.assert_allclose(want, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("direction", ["to_peft", "from_peft"])
def test_embedding_conv_linear_in_one_config(tmp_path, getkey, direction):
    """One LoRA config over an Embedding, a Conv1d and a Linear: PEFT's
    `lora_embedding_A` is our `aᵀ`, `lora_embedding_B` our `bᵀ`."""
    base = EmbedNet(getkey())
    tokens = np.asarray(jr.randint(getkey(), (3, 5), 0, 11), np.int64)
    targets = ["embed", "conv", "head"]
    if direction == "to_peft":
        model = lora.loraify(base, rank=3, alpha=6.0, key=getkey(), where=targets)
        model = randomise_model(model, getkey())
        lora.save_peft(tmp_path, model)
        pmodel = peft.PeftModel.from_pretrained(
            _copy_into_torch(base, TorchEmbedNet()), str(tmp_path)
        ).eval()
        files = load_file(tmp_path / "adapter_model.safetensors")
        assert files["base_model.model.embed.lora_embedding_A"].shape == (3, 11)
    else:
        config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets)
        pmodel = _randomise_torch(
            peft.get_peft_model(_copy_into_torch(base, TorchEmbedNet()), config)
        )
        pmodel.save_pretrained(str(tmp_path))
        model = lora.load_peft(tmp_path, base)
    assert isinstance(model.embed.weight, lora.LoraEmbeddingArray)
    assert isinstance(model.conv.weight, lora.LoraConvArray)
    assert isinstance(model.head.weight, lora.LoraArray)
    got, want = _run(model, tokens.astype(np.int32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run_torch(pmodel, tokens), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_conv_and_embedding_files_convert_both_ways(tmp_path, getkey, method):
    """`python -m lora_jax convert` for conv and embedding adapters: a lora_jax file
    becomes a PEFT directory that real PEFT loads (same outputs), and PEFT's directory
    becomes a lora_jax file that loads bitwise into the adapted model, the convs'
    biases included."""
    from lora_jax.__main__ import main

    base = EmbedNet(getkey())
    where = ["embed", "conv", "head"] if method == "lora" else ["conv", "head"]
    model = lora.loraify(base, rank=2, alpha=5.0, key=getkey(), method=method, where=where)
    model = randomise_model(model, getkey())
    model = eqx.tree_at(lambda m: m.conv.bias, model, jr.normal(getkey(), (6, 1)))
    src = tmp_path / "ours.safetensors"
    lora.save_adapter(src, model, train_bias="all")
    assert main(["convert", str(src), str(tmp_path / "peft")]) == 0
    pmodel = peft.PeftModel.from_pretrained(
        _copy_into_torch(base, TorchEmbedNet()), str(tmp_path / "peft")
    ).eval()
    tokens = np.asarray(jr.randint(getkey(), (3, 5), 0, 11), np.int64)
    got, want = _run(model, tokens.astype(np.int32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run_torch(pmodel, tokens), want, rtol=1e-4, atol=1e-4)
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(tmp_path / "peft"), str(back)]) == 0
    fresh = lora.loraify(base, rank=2, key=getkey(), method=method, where=where)
    loaded = lora.load_adapter(back, fresh)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def _conv_model(key, **conv):
    layer = eqx.nn.Conv2d(4, 6, 3, key=key, **conv)
    return layer


@pytest.mark.parametrize(
    "conv,method,message",
    [
        (dict(groups=2), "lora", "groups=2, but PEFT's conv `lora_A` is ungrouped"),
        (dict(groups=2), "dora", "groups=2"),
        (dict(dilation=2), "lora", r"dilation \(2, 2\), which PEFT's conv `lora_A` does not"),
        (dict(padding=1, padding_mode="REFLECT"), "loha", "pads with 'REFLECT'"),
        (dict(), "balanced", "conv_form is 'balanced'"),
    ],
)
def test_conv_adapters_without_a_peft_form(tmp_path, getkey, conv, method, message):
    """Convs whose PEFT module would compute something else are refused, naming why;
    nothing is written."""
    options = dict(conv_form="balanced") if method == "balanced" else dict(method=method)
    model = [_conv_model(getkey(), **conv)]
    model = lora.loraify(model, rank=2, key=getkey(), where=lambda n, l: True, **options)
    with pytest.raises(ValueError, match=message):
        lora.save_peft(tmp_path / "out", model)
    assert not (tmp_path / "out").exists()


def test_conv_refusals(tmp_path, getkey, capsys):
    cube = [eqx.nn.Conv3d(2, 3, 3, key=getkey())]
    loha = lora.loraify(cube, rank=2, key=getkey(), method="loha", where=lambda n, l: True)
    with pytest.raises(ValueError, match="PEFT's LoHa adapts Conv1d and Conv2d, not Conv3d"):
        lora.save_peft(tmp_path / "out", loha)
    # The same from a lora_jax file, without the model: its metadata holds the kernel's
    # shape.
    from lora_jax.__main__ import main

    lora.save_adapter(tmp_path / "cube.safetensors", loha)
    assert main(["convert", str(tmp_path / "cube.safetensors"), str(tmp_path / "out")]) != 0
    assert "PEFT's LoHa adapts Conv1d and Conv2d, not Conv3d" in capsys.readouterr().err
    up = [eqx.nn.ConvTranspose2d(2, 3, 3, key=getkey())]
    up = lora.loraify(up, rank=2, key=getkey(), where=lambda n, l: True)
    with pytest.raises(ValueError, match="PEFT does not adapt an ConvTranspose2d"):
        lora.save_peft(tmp_path / "out", up)
    assert not (tmp_path / "out").exists()

    # With `use_effective_conv2d=True`, PEFT's LoHa for a 1×1 conv builds the plain
    # factors, which load as such.
    base = ConvNet(getkey())
    config = peft.LoHaConfig(r=2, alpha=2, target_modules=["mix"], use_effective_conv2d=True)
    pmodel = _randomise_torch(peft.get_peft_model(_copy_into_torch(base, TorchConvNet()), config))
    pmodel.save_pretrained(str(tmp_path / "pointwise"))
    loaded = lora.load_peft(tmp_path / "pointwise", base)
    xs = np.asarray(jr.normal(getkey(), (2, 3, 7, 7)), np.float32)
    got, want = _run(loaded, xs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run_torch(pmodel, xs), want, rtol=1e-4, atol=1e-4)

    # PEFT's DoRA adapts Embeddings; lora_jax's does not.
    emb = EmbedNet(getkey())
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["embed"], use_dora=True)
    peft.get_peft_model(_copy_into_torch(emb, TorchEmbedNet()), config).save_pretrained(
        str(tmp_path / "dora_embedding")
    )
    with pytest.raises(ValueError, match="DoRA adapter of an Embedding, which lora_jax does not"):
        lora.load_peft(tmp_path / "dora_embedding", emb)
    # A conv adapter onto a grouped conv of the same kernel shape is refused, not run.
    lora.save_peft(
        tmp_path / "plain",
        lora.loraify([_conv_model(getkey())], rank=2, key=getkey(), where=lambda n, l: True),
    )
    grouped = [eqx.nn.Conv2d(8, 6, 3, groups=2, key=getkey())]
    with pytest.raises(ValueError, match="groups=2"):
        lora.load_peft(tmp_path / "plain", grouped)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_tucker_and_plain_convs_have_no_one_config(tmp_path, getkey, method):
    """PEFT's config has one `use_effective_conv2d`: 3×3 convs adapted with and
    without the Tucker form cannot be saved together; nothing is written."""
    k1, k2 = jr.split(getkey())
    model = {"a": eqx.nn.Conv2d(4, 8, 3, key=k1), "b": eqx.nn.Conv2d(4, 8, 3, key=k2)}
    model = lora.loraify(model, rank=1, key=getkey(), method=method, where=["a"])
    model = lora.loraify(
        model, rank=1, key=getkey(), method=method, where=["b"], use_effective_conv2d=True
    )
    with pytest.raises(ValueError, match="one `use_effective_conv2d` for every layer"):
        lora.save_peft(tmp_path / "out", model)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_tucker_files_convert_both_ways(tmp_path, getkey, method):
    """`python -m lora_jax convert` for Tucker-form conv adapters: to a PEFT directory
    real PEFT loads (same outputs), and back to a file that loads bitwise. A PEFT
    Conv1d's core is `(r, r, k, 1)`, read without a model as a Conv2d's `k×1` kernel:
    such a file does not load into the Conv1d model, and says why."""
    from lora_jax.__main__ import main

    for dims in (2, 1):
        base = ConvNet(getkey(), dims)
        # (Only the 3-wide conv: the 1×1 one holds PEFT's plain factors, which a file
        # without a model reads as a Linear's.)
        options = dict(method=method, use_effective_conv2d=True, where=["conv"])
        model = lora.loraify(base, rank=2, alpha=3.0, key=getkey(), **options)
        model = randomise_model(model, getkey())
        src = tmp_path / f"ours{dims}.safetensors"
        lora.save_adapter(src, model)
        assert main(["convert", str(src), str(tmp_path / f"peft{dims}")]) == 0
        pmodel = peft.PeftModel.from_pretrained(
            _copy_into_torch(base, TorchConvNet(dims)), str(tmp_path / f"peft{dims}")
        ).eval()
        xs = np.asarray(jr.normal(getkey(), (2, 3, *(7,) * dims)), np.float32)
        got, want = _run(model, xs)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(_run_torch(pmodel, xs), want, rtol=1e-4, atol=1e-4)
        back = tmp_path / f"back{dims}.safetensors"
        assert main(["convert", str(tmp_path / f"peft{dims}"), str(back)]) == 0
        fresh = lora.loraify(base, rank=2, key=getkey(), **options)
        if dims == 1:
            with pytest.raises(ValueError, match=r"with shape \[5, 3, 3, 1\], but `model` has"):
                lora.load_adapter(back, fresh)
            continue
        loaded = lora.load_adapter(back, fresh)
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_lokr_conv_whole_w2_both_ways(tmp_path, getkey):
    """A LoKr conv whose `w2` is whole (`k × q × kernel`, rank at least half of
    `max(k, q)`) equals PEFT's Conv2d both ways; PEFT's Conv1d in that case takes
    `torch.kron` of a matrix and a 3-D tensor (another update), and is refused."""
    conv = [eqx.nn.Conv2d(4, 6, 3, stride=2, padding=1, key=getkey())]
    model = lora.loraify(
        conv, rank=8, alpha=4.0, key=getkey(), method="lokr", where=lambda n, l: True
    )
    model = randomise_model(model, getkey())
    assert model[0].weight.w2.shape == (3, 2, 3, 3)
    lora.save_peft(tmp_path / "ours", model)
    tconv = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1))
    with torch.no_grad():
        tconv[0].weight.copy_(torch.tensor(np.array(conv[0].weight)))
        tconv[0].bias.copy_(torch.tensor(np.array(conv[0].bias)).reshape(-1))
    pmodel = peft.PeftModel.from_pretrained(tconv, str(tmp_path / "ours")).eval()
    xs = np.asarray(jr.normal(getkey(), (2, 4, 7, 7)), np.float32)
    run = lambda m: np.asarray(jax.vmap(quax.quaxify(m[0]))(jnp.asarray(xs)))  # noqa: E731
    with jax.default_matmul_precision("highest"):
        got, want = run(model), run(_plain(model))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run_torch(pmodel, xs), want, rtol=1e-4, atol=1e-4)
    back = lora.load_peft(tmp_path / "ours", conv)
    assert np.array_equal(back[0].weight.w2, model[0].weight.w2)

    line = [eqx.nn.Conv1d(4, 6, 3, key=getkey())]
    whole = lora.loraify(line, rank=8, key=getkey(), method="lokr", where=lambda n, l: True)
    with pytest.raises(ValueError, match="PEFT's LoKr Conv1d with a whole `w2`"):
        lora.save_peft(tmp_path / "line", whole)
    assert not (tmp_path / "line").exists()


def test_load_keeps_conv_path(tmp_path, getkey):
    """Loading into convs adapted with `conv_path="merged"` keeps it, where the file's
    adapter replaces one of another rank too; the outputs equal the factored path's."""
    base = ConvNet(getkey())
    saved = randomise_model(
        lora.loraify(base, rank=2, alpha=3.0, key=getkey(), where=["conv", "mix"]), getkey()
    )
    lora.save_peft(tmp_path, saved)
    merged = lora.loraify(base, rank=3, key=getkey(), where=["conv", "mix"], conv_path="merged")
    loaded = lora.load_peft(tmp_path, merged)
    assert loaded.conv.weight.conv_path == "merged" and loaded.conv.weight.rank == 2
    xs = np.asarray(jr.normal(getkey(), (2, 3, 7, 7)), np.float32)
    got, want = _run(loaded, xs)
    np.testing.assert_allclose(got, _run(saved, xs)[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "method,init_weights",
    [("loha", True), ("loha", False), ("lokr", True), ("lokr", False), ("lokr", "lycoris")],
)
def test_tucker_init_as_peft(tmp_path, getkey, method, init_weights):
    """A Tucker-form conv adapter starts as PEFT's does for the same config: the same
    tensors and shapes (in PEFT's layout), zero where PEFT's are zero, and elsewhere
    drawn from PEFT's Kaiming-uniform(a=√5), `U(±1/√fan_in)` with PEFT's fan-in (each
    tensor's largest entry below that bound and above half of it, as PEFT's own)."""
    conv = [eqx.nn.Conv2d(64, 128, 3, key=getkey())]
    options = dict(method=method, use_effective_conv2d=True, init_weights=init_weights)
    ours = lora.loraify(conv, rank=2, key=getkey(), where=lambda n, l: True, **options)
    lora.save_peft(tmp_path, ours)
    got = {
        k.rpartition(".")[2]: v
        for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
    }
    config = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[method](
        r=2, target_modules=["0"], use_effective_conv2d=True, init_weights=init_weights
    )
    torch_conv = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 3))
    layer = peft.get_peft_model(torch_conv, config).base_model.model[0]
    theirs = {
        name: p["default"].detach().numpy()
        for name in layer.adapter_layer_names
        if "default" in (p := getattr(layer, name))
    }
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in theirs.items()}
    for name, want in theirs.items():
        have = np.asarray(got[name], np.float32)
        if not np.any(want):
            assert not np.any(have), name
            continue
        bound = 1 / math.sqrt(math.prod(want.shape[1:]))
        for x in (have, want):
            assert 0.5 * bound < np.abs(x).max() <= bound * (1 + 1e-6), name
