"""One adapter training step against the floor: lora_jax's methods, quax's example, full
fine-tuning, and PEFT on PyTorch (eager and `torch.compile`), on the same shapes.

The floor is the forward pass plus the input-gradient of the plain model: what any
adapter step must do (the gradient has to flow back through every frozen layer). Every
contender is compiled and warmed up, then all are timed in interleaved rounds in one
process; the table gives the median of each, its ratio to the floor and its memory.

    python benchmarks/step.py --preset tiny             # smoke test (seconds)
    python benchmarks/step.py                           # the CPU shapes
    python benchmarks/step.py --preset gpu --out step_gpu.md
    python benchmarks/step.py --only lora,peft          # some rows (floors always run)

Rows (`--only` names): floor, lora, dora, lokr, loha, lokr-default, qlora-nf4,
qlora-int8, qlora-nf4-remat, lora-remat, lora-mosaic, lora-mosaic-remat, dora-mosaic,
lokr-mosaic, loha-mosaic, qlora-nf4-mosaic, qlora-int8-mosaic (the `-mosaic` rows:
`kernel="mosaic"`, the fused kernel on a Hopper GPU, elsewhere the same as without),
quax, full, torch-floor, torch-floor-compile, peft, peft-compile. The torch rows need
`torch` and `peft`; they are skipped with a note when either does not import.
"""

import argparse
import datetime
import importlib.metadata
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback


# torch's OpenMP workers otherwise spin between ops and take the cores from XLA's
# threads on a CPU run (the rounds interleave the two).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
import quax
import quax.examples.lora as quax_lora


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout
import lora_jax as lora  # noqa: E402


PRESETS = {
    "tiny": dict(blocks=2, d=64, hidden=256, tokens=64, rank=4, dtype="float32", rounds=5),
    "cpu": dict(blocks=4, d=512, hidden=2048, tokens=512, rank=8, dtype="float32", rounds=15),
    "gpu": dict(blocks=8, d=2048, hidden=8192, tokens=8192, rank=16, dtype="bfloat16", rounds=30),
}
ROWS = (
    "floor",
    "lora",
    "dora",
    "lokr",
    "loha",
    "lokr-default",
    "qlora-nf4",
    "qlora-int8",
    "qlora-nf4-remat",
    "lora-remat",
    "lora-mosaic",
    "lora-mosaic-remat",
    "dora-mosaic",
    "lokr-mosaic",
    "loha-mosaic",
    "qlora-nf4-mosaic",
    "qlora-int8-mosaic",
    "quax",
    "full",
    "torch-floor",
    "torch-floor-compile",
    "peft",
    "peft-compile",
)
# LoKr splits each dimension as (4, dim/4): w1 is 4x4 and w2 is (out/4, in/4) held as a
# product of rank 4r, so its budget is LoRA's r·(out+in) plus 16.
LOKR_FACTOR = 4
MIB = 2.0**20


# ---------------------------------------------------------------------------- models


class Block(eqx.Module):
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, d, hidden, dtype, key):
        k1, k2 = jr.split(key)
        self.up = eqx.nn.Linear(d, hidden, use_bias=False, dtype=dtype, key=k1)
        self.down = eqx.nn.Linear(hidden, d, use_bias=False, dtype=dtype, key=k2)

    def __call__(self, x):  # x: (tokens, d); Linear layers vmapped over tokens
        h = jax.nn.gelu(jax.vmap(self.up)(x))  # tanh approximation, as torch's below
        return x + jax.vmap(self.down)(h)


class Net(eqx.Module):
    blocks: list
    remat: bool = eqx.field(static=True, default=False)

    def __call__(self, x):
        for b in self.blocks:
            # Under remat: keep the adapted products, recompute the gelu.
            x = _remat_call(b, x) if self.remat else b(x)
        return x


def _call(block, x):
    return block(x)


_remat_call = eqx.filter_checkpoint(_call, policy=lora.remat_policy)


def loss_fn(model, x):
    return jnp.mean(model(x).astype(jnp.float32) ** 2)


# ------------------------------------------------------------------ JAX contenders


def quax_factors(model):
    """a and b of quax's LoraArray: the trainable leaves."""

    def is_factor(path, leaf):
        return (
            eqx.is_inexact_array(leaf)
            and isinstance(path[-1], jtu.GetAttrKey)
            and path[-1].name in ("a", "b")
        )

    return jtu.tree_map_with_path(is_factor, model)


def n_params(tree):
    return sum(x.size for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x))


def memory(compiled):
    """argument + output + temp − alias bytes of a compiled step, and its temp bytes."""
    try:
        m = compiled.memory_analysis()
        total = (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        return total, m.temp_size_in_bytes
    except Exception:  # some backends give no analysis
        return None, None


class JaxContender:
    """A compiled step and the state it threads through the rounds: `feed` maps an
    argument's position to the position of the output that replaces it after a call."""

    def __init__(self, compiled, args, feed, trainable):
        self.compiled, self.args, self.feed = compiled, list(args), dict(feed)
        self.trainable = trainable
        self.mem, self.temp = memory(compiled)

    def __call__(self):
        out = self.compiled(*self.args)
        for arg, result in self.feed.items():
            self.args[arg] = out[result]
        return out

    def sync(self, out):
        jax.block_until_ready(out)


def jax_floor(model, x):
    """The floor, with a scalar `after` threaded from each call to the next (the input
    gradient's first entry added to it): calls made back to back then run one after
    another, as a training loop's steps do, where XLA:CPU would otherwise run
    independent calls at once. It costs one scalar add."""

    def floor(model, x, after):
        dx = jax.grad(loss_fn, argnums=1)(model, x)
        return dx, after + dx[0, 0].astype(after.dtype)

    args = (model, x, jnp.zeros((), jnp.float32))
    return JaxContender(jax.jit(floor).lower(*args).compile(), args, {2: 1}, 0)


def jax_adapter_step(model, x, opt, split):
    params, frozen = split(model)
    frozen_arrays, static = eqx.partition(frozen, eqx.is_array)

    # Every array is an argument: a closed-over weight would be a compile-time
    # constant, which XLA may fold (and which no real training loop has). The trained
    # leaves and the optimiser state are donated, as in a training loop.
    def step(params, state, frozen_arrays, x):
        def loss(p):
            model = eqx.combine(p, frozen_arrays, static)
            return quax.quaxify(loss_fn)(model, x)

        g = jax.grad(loss)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    args = (params, opt.init(params), frozen_arrays, x)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    return JaxContender(compiled, args, {0: 0, 1: 1}, n_params(params))


def jax_full_step(model, x, opt):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(params, state, x):
        g = jax.grad(lambda p: loss_fn(eqx.combine(p, static), x))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    # Copies: the donated buffers must not be the plain model's, which the floor uses.
    params = jtu.tree_map(jnp.copy, params)
    args = (params, opt.init(params), x)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    return JaxContender(compiled, args, {0: 0, 1: 1}, n_params(params))


def method_configs(rank):
    """row: (method, rank, options) per lora_jax method, chosen so each trains about
    LoRA's r·(in+out) parameters per matrix; and LoKr as PEFT configures it by default
    (its own, much smaller budget)."""
    return {
        "lora": ("lora", rank, {}),  # r·(in+out)
        "dora": ("dora", rank, {}),  # r·(in+out) + out magnitudes
        # (w1a@w1b) ⊙ (w2a@w2b): two pairs of factors, so half the rank.
        "loha": ("loha", max(1, rank // 2), {}),
        "lokr": ("lokr", LOKR_FACTOR * rank, {"decompose_factor": LOKR_FACTOR}),
        # PEFT's defaults: each dimension split near its square root, w2 at rank r.
        "lokr-default": ("lokr", rank, {}),
    }


# ---------------------------------------------------------------- torch contenders


def torch_contenders(cfg, wanted, notes):
    """PEFT LoRA on the same architecture, and torch's own floor. `{}` (with a note)
    when torch or peft does not import."""
    try:
        import peft
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
    except Exception as e:  # ImportError, or a broken install
        notes.append(f"torch rows skipped: {type(e).__name__}: {e}")
        return {}, None

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, cfg["dtype"])

    class TBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(cfg["d"], cfg["hidden"], bias=False)
            self.down = nn.Linear(cfg["hidden"], cfg["d"], bias=False)

        def forward(self, x):
            return x + self.down(F.gelu(self.up(x), approximate="tanh"))

    class TNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(TBlock() for _ in range(cfg["blocks"]))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    def plain():
        torch.manual_seed(0)
        with torch.device(dev):  # initialised where it runs: no host copy
            m = TNet().to(dtype=dtype)
        m.requires_grad_(False)
        return m

    x = torch.randn(cfg["tokens"], cfg["d"], device=dev, dtype=dtype)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    class Floor:
        def __init__(self, compiled):
            self.model = plain()
            self.run = torch.compile(self.model) if compiled else self.model
            self.x = x.clone().requires_grad_(True)
            self.trainable = 0

        def __call__(self):
            loss = self.run(self.x).float().square().mean()
            (g,) = torch.autograd.grad(loss, self.x)
            return g

        def prepare(self):  # before a memory reading
            pass

        def resident(self):
            return nbytes(self.model.parameters()) + nbytes([self.x])

    class Peft:
        def __init__(self, compiled):
            config = peft.LoraConfig(
                r=cfg["rank"], lora_alpha=2 * cfg["rank"], target_modules=["up", "down"]
            )
            # autocast_adapter_dtype=False: the adapters take the base's dtype (bf16 on
            # the gpu preset), as lora_jax's factors do; PEFT's default would make them
            # float32.
            self.model = peft.get_peft_model(plain(), config, autocast_adapter_dtype=False)
            self.run = torch.compile(self.model) if compiled else self.model
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.trainable = sum(p.numel() for p in self.params)
            # fused=True: torch's fastest AdamW on CUDA (optax's is fused by XLA).
            self.opt = torch.optim.AdamW(self.params, lr=1e-4, **({"fused": True} if cuda else {}))

        def __call__(self):
            self.opt.zero_grad(set_to_none=True)
            loss = self.run(x).float().square().mean()
            loss.backward()
            self.opt.step()
            return loss

        def prepare(self):
            self.opt.zero_grad(set_to_none=True)

        def resident(self):
            state = [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)]
            return nbytes(self.model.parameters()) + nbytes(state) + nbytes([x])

    makers = {
        "torch-floor": lambda: Floor(False),
        "torch-floor-compile": lambda: Floor(True),
        "peft": lambda: Peft(False),
        "peft-compile": lambda: Peft(True),
    }
    out = {name: make() for name, make in makers.items() if name in wanted}
    for c in out.values():
        c.sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)

    def measure(c):
        """resident bytes + the step's peak over what was allocated before it."""
        if not cuda:
            return None, None
        c.prepare()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        c.sync(c())
        transient = torch.cuda.max_memory_allocated() - before
        return c.resident() + transient, transient

    info = dict(
        device=torch.cuda.get_device_name() if cuda else "cpu",
        versions=f"torch {torch.__version__}, peft {peft.__version__}",
        measure=measure,
    )
    return out, info


# ------------------------------------------------------------------------- running


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def git_commit():
    try:
        root = pathlib.Path(__file__).resolve().parents[1]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "?"
    except Exception:
        return "?"


def median_times(calls, rounds, warmup=0):
    """{name: median seconds of `calls[name]()`} over interleaved rounds, after `warmup`
    untimed calls of each. A call's result is waited on by the call's `sync` if it has
    one (torch's contenders), else by `jax.block_until_ready`."""

    def run(c):
        return getattr(c, "sync", jax.block_until_ready)(c())

    for c in calls.values():
        for _ in range(warmup):
            run(c)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, c in calls.items():
            t = time.perf_counter()
            run(c)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


PIPELINE = 5  # steps dispatched back to back in one timed run


def step_times(calls, rounds, steps=PIPELINE):
    """Two medians over interleaved rounds, each `{name: seconds}`:

    - per step: `steps` calls made back to back and waited on once, divided by
      `steps`. This is how a training loop runs: JAX (and CUDA, for torch) dispatch
      asynchronously, so the host prepares the next step while the device runs this
      one, and a step costs what the device takes. Each contender feeds a call's
      results to the next (the floor a scalar), so calls never overlap.
    - per call: one call waited on. It adds the host's dispatch and the wait to the
      device's time: on the H100 machine about 0.6 ms for the floor's 17 arguments and
      1.7-2.3 ms for a LoRA step's 130, which moves with the host.

    A call's result is waited on by the call's `sync` (torch's contenders) or
    `jax.block_until_ready`."""
    per_step = {name: [] for name in calls}
    per_call = {name: [] for name in calls}
    for _ in range(rounds):
        for name, c in calls.items():
            sync = getattr(c, "sync", jax.block_until_ready)
            t = time.perf_counter()
            sync(c())
            per_call[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(steps):
                out = c()
            sync(out)
            per_step[name].append((time.perf_counter() - t) / steps)
    median = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return median(per_step), median(per_call)


def fmt_mib(b):
    return "n/a" if b is None else f"{b / MIB:,.1f}"


def main(preset, rounds, only):
    cfg = PRESETS[preset]
    rounds = rounds or cfg["rounds"]
    wanted = set(ROWS if only is None else only) | {"floor"}
    if "peft" in wanted:
        wanted.add("torch-floor")
    if "peft-compile" in wanted:
        wanted.add("torch-floor-compile")
    dtype = jnp.dtype(cfg["dtype"])
    keys = jr.split(jr.key(0), cfg["blocks"] + 2)
    model = Net([Block(cfg["d"], cfg["hidden"], dtype, k) for k in keys[:-2]])
    x = jr.normal(keys[-1], (cfg["tokens"], cfg["d"]), dtype)
    opt = optax.adamw(1e-4)
    labels, notes, contenders = {}, [], {}

    def add(name, label, make):
        if name not in wanted:
            return
        t = time.perf_counter()
        try:
            contenders[name] = make()
        except Exception as e:
            traceback.print_exc()
            notes.append(f"{name} failed to build: {type(e).__name__}: {e}")
            return
        labels[name] = label
        print(f"built {name} in {time.perf_counter() - t:.1f} s", flush=True)

    r = cfg["rank"]
    add("floor", "JAX floor (fwd + input grad)", lambda: jax_floor(model, x))

    def adapted(base, rank=r, method="lora", **options):
        """A lora_jax training step on `base` (alpha = 2·rank, as PEFT's rows)."""
        adapted_model = lora.loraify(
            base, rank=rank, alpha=2.0 * rank, method=method, key=keys[-2], **options
        )
        return jax_adapter_step(adapted_model, x, opt, lora.partition)

    for row, (method, rank, options) in method_configs(r).items():
        opts = ", ".join(f"{k}={v}" for k, v in options.items())
        if row == "lokr-default":
            opts = "PEFT's default split"
        label = f"lora_jax {method} (rank {rank}{', ' + opts if opts else ''})"
        add(
            row,
            label,
            lambda method=method, rank=rank, options=options: adapted(
                model, rank, method, **options
            ),
        )
    remat_label = ", blocks under lora.remat_policy"
    for qmethod, remat in (("nf4", False), ("int8", False), ("nf4", True)):
        add(
            f"qlora-{qmethod}" + ("-remat" if remat else ""),
            f"lora_jax lora (rank {r}) on a {qmethod} base (QLoRA)"
            + (remat_label if remat else ""),
            lambda qmethod=qmethod, remat=remat: adapted(
                lora.quantise(Net(model.blocks, remat=remat), method=qmethod)
            ),
        )
    add(
        "lora-remat",
        f"lora_jax lora (rank {r}){remat_label}",
        lambda: adapted(Net(model.blocks, remat=True)),
    )
    add(
        "lora-mosaic",
        f"lora_jax lora (rank {r}), kernel='mosaic'",
        lambda: adapted(model, kernel="mosaic"),
    )
    add(
        "lora-mosaic-remat",
        f"lora_jax lora (rank {r}), kernel='mosaic'{remat_label}",
        lambda: adapted(Net(model.blocks, remat=True), kernel="mosaic"),
    )
    add(
        "dora-mosaic",
        f"lora_jax dora (rank {r}), kernel='mosaic'",
        lambda: adapted(model, method="dora", kernel="mosaic"),
    )
    _, lokr_rank, lokr_options = method_configs(r)["lokr"]
    add(
        "lokr-mosaic",
        f"lora_jax lokr (rank {lokr_rank}, decompose_factor={LOKR_FACTOR}), kernel='mosaic'",
        lambda: adapted(model, lokr_rank, "lokr", kernel="mosaic", **lokr_options),
    )
    _, loha_rank, _ = method_configs(r)["loha"]
    add(
        "loha-mosaic",
        f"lora_jax loha (rank {loha_rank}), kernel='mosaic'",
        lambda: adapted(model, loha_rank, "loha", kernel="mosaic"),
    )
    for qmethod in ("nf4", "int8"):
        add(
            f"qlora-{qmethod}-mosaic",
            f"lora_jax lora (rank {r}) on a {qmethod} base (QLoRA), kernel='mosaic'",
            lambda qmethod=qmethod: adapted(lora.quantise(model, method=qmethod), kernel="mosaic"),
        )
    add(
        "quax",
        f"quax.examples.lora (rank {r})",
        lambda: jax_adapter_step(
            quax_lora.loraify(model, rank=r, key=keys[-2]),
            x,
            opt,
            lambda m: eqx.partition(m, quax_factors(m)),
        ),
    )
    add("full", "JAX full fine-tune", lambda: jax_full_step(model, x, opt))
    jax_peaks = {}
    torch_info = None
    if wanted & {"torch-floor", "torch-floor-compile", "peft", "peft-compile"}:
        t = time.perf_counter()
        try:
            built, torch_info = torch_contenders(cfg, wanted, notes)
        except Exception as e:
            traceback.print_exc()
            notes.append(f"torch rows failed to build: {type(e).__name__}: {e}")
            built = {}
        tlabels = {
            "torch-floor": "torch floor (eager)",
            "torch-floor-compile": "torch floor (torch.compile)",
            "peft": f"PEFT LoRA, torch eager (rank {r})",
            "peft-compile": f"PEFT LoRA, torch.compile (rank {r})",
        }
        for name, c in built.items():
            contenders[name], labels[name] = c, tlabels[name]
        print(f"built torch rows in {time.perf_counter() - t:.1f} s", flush=True)

    # Warm up: three calls each (torch.compile compiles on the first ones). A contender
    # that fails here is dropped with a note, and the others go on.
    for name in list(contenders):
        t = time.perf_counter()
        try:
            for _ in range(3):
                contenders[name].sync(contenders[name]())
        except Exception as e:
            traceback.print_exc()
            notes.append(f"{name} failed in warm-up: {type(e).__name__}: {e}")
            del contenders[name]
            continue
        print(f"warmed {name} in {time.perf_counter() - t:.1f} s", flush=True)
        if isinstance(contenders[name], JaxContender):
            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                jax_peaks[name] = stats["peak_bytes_in_use"]
    for name, c in contenders.items():
        if not isinstance(c, JaxContender):
            c.mem, c.temp = torch_info["measure"](c)

    med, med_call = step_times(contenders, rounds)
    base = med["floor"]
    torch_base = {
        "torch-floor": med.get("torch-floor"),
        "peft": med.get("torch-floor"),
        "torch-floor-compile": med.get("torch-floor-compile"),
        "peft-compile": med.get("torch-floor-compile"),
    }
    device = jax.devices()[0].device_kind
    processor = platform.processor() or platform.machine()
    versions = ", ".join(
        [
            f"jax {jax.__version__}",
            f"jaxlib {version('jaxlib')}",
            f"equinox {eqx.__version__}",
            f"quax {version('quax')}",
            f"optax {optax.__version__}",
            f"lora_jax {version('lora_jax')} (commit {git_commit()})",
        ]
    )
    if torch_info:
        versions += f", {torch_info['versions']}"
    d, h, k = cfg["d"], cfg["hidden"], LOKR_FACTOR
    devices = f"JAX device: {device}"
    if torch_info:
        devices += f"; torch device: {torch_info['device']}"
    lines = [
        f"# Adapter training step vs the floor ({preset} preset)",
        "",
        f"- date: {datetime.date.today()}; {devices}; host: {processor}, "
        f"python {platform.python_version()}",
        f"- versions: {versions}",
        f"- shapes: {cfg['blocks']} residual blocks x + Linear({d}->{h}, no bias) -> "
        f"gelu (tanh) -> Linear({h}->{d}), {cfg['tokens']} tokens, {cfg['dtype']}; "
        "loss mean(square) in float32; AdamW on the trained leaves; median of "
        f"{rounds} interleaved rounds after 3 warm-up calls each",
        f"- ms / step: {PIPELINE} steps dispatched back to back and waited on once, "
        "per step, as a training loop runs them (dispatch is asynchronous, so the "
        "host's work overlaps the device's); each step takes the previous one's "
        "results (the floor a scalar from its input gradient), so steps never "
        "overlap. ms / call: one step waited on by itself, which adds the host's "
        "dispatch (more for a step with more arguments) and the wait's latency. "
        "× floor columns are against the JAX floor measured the same way.",
        f"- parameter budgets: LoRA, DoRA, quax and PEFT at rank {r} train "
        "r·(in+out) per matrix (DoRA adds its `out` magnitudes); LoHa at rank "
        f"{max(1, r // 2)} has two factor pairs, so the same count; LoKr with "
        f"decompose_factor={k} (w1 {k}x{k}, w2 of size out/{k} x in/{k} held at "
        f"rank {k * r}) the same plus {k * k}. PEFT's default LoKr split (near "
        "square roots) cannot reach that budget; the lokr-default row is that "
        "configuration at rank r, with its own (smaller) budget. The column gives "
        "the exact counts.",
        "- × floor: against the JAX floor (forward + gradient wrt the input of the "
        "plain model). × torch floor: against torch's own floor, eager for eager "
        "rows and torch.compile for compiled rows.",
        "- memory: JAX rows: the compiled step's argument + output + temp − alias "
        "bytes (`compiled.memory_analysis()`; the trained leaves and optimiser "
        "state are donated); temp: its temp bytes. torch rows (CUDA only): the "
        "bytes this contender holds (weights, adapters, optimiser state, input) + "
        "the step's `torch.cuda.max_memory_allocated()` over what was allocated "
        "before it (reset per contender); temp: that transient part.",
        "- PEFT: LoraConfig(r, lora_alpha=2r, target_modules=[up, down]), "
        "get_peft_model(autocast_adapter_dtype=False) so adapters take the base "
        "dtype; torch.optim.AdamW (fused on CUDA); a step = zero_grad, forward, "
        "loss, backward, optimiser step; torch.compile wraps the PEFT model (the "
        "optimiser step is eager).",
    ]
    if jax_peaks:
        lines.append(
            "- JAX device `peak_bytes_in_use` after each JAX contender's warm-up (a "
            "running maximum over the process, so only growth shows): "
            + ", ".join(f"{k} {fmt_mib(v)} MiB" for k, v in jax_peaks.items())
        )
    lines += [f"- note: {n}" for n in notes]
    lines += [
        "",
        "| contender | trained params | ms / step | × floor | × torch floor "
        "| ms / call | × floor | memory MiB | temp MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ROWS:
        if name not in med:
            continue
        t, c = med[name], contenders[name]
        tb = torch_base.get(name)
        lines.append(
            f"| {labels[name]} | {c.trainable:,} | {1e3 * t:.2f} | {t / base:.3f} "
            f"| {'' if tb is None else f'{t / tb:.3f}'} "
            f"| {1e3 * med_call[name]:.2f} | {med_call[name] / med_call['floor']:.3f} "
            f"| {fmt_mib(c.mem)} "
            f"| {fmt_mib(c.temp)} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--rounds", type=int, default=None, help="default: the preset's")
    p.add_argument("--only", default=None, help=f"comma-separated rows of {', '.join(ROWS)}")
    p.add_argument("--out", default=None, help="write the table to this markdown file")
    args = p.parse_args()
    only = None
    if args.only is not None:
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in only if s not in ROWS]
        if bad:
            p.error(f"--only: unknown rows {bad}; choose from {', '.join(ROWS)}")
    table = main(args.preset, args.rounds, only)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
