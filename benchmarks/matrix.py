"""One LoRA training step over a matrix of model structures (benchmarks/structures.py)
and dtypes, against the floor: lora_jax's methods, quax's example, a hand-written
plain-JAX LoRA step, Flax NNX's LoRA, qwix's LoRA, and full fine-tuning.

For each structure and dtype, every contender is built on the same weights, compiled
and warmed up, then all are timed in interleaved rounds in one process (as step.py).

    python benchmarks/matrix.py --preset tiny                 # smoke test (a minute)
    python benchmarks/matrix.py --preset cpu --out matrix_cpu.md
    python benchmarks/matrix.py --preset gpu --structures swiglu,attention --out a.md
    python benchmarks/matrix.py --only lora,handwritten --hlo hlo/   # dump optimised HLO

Contenders (`--only` names; the floor always runs):

- `floor`: the forward pass plus the gradient wrt the input of the plain model, with a
  scalar threaded from each call to the next so calls made back to back do not overlap
  (step.py's floor).
- `lora`, `dora`, `lokr`, `loha`: `lora_jax.loraify(model, method=...)` on every Linear,
  Conv and Embedding of the structure (DoRA, LoKr and LoHa adapt an Embedding with LoRA:
  their methods have no embedding form), `lora_jax.partition`, AdamW on the trained
  leaves; `quax.quaxify` around the loss of the recombined model inside `jax.grad`,
  under `jax.jit`: the README's pattern. Ranks as step.py's, for about LoRA's budget.
- `quax`: `quax.examples.lora.loraify` (Linear layers only), the same step.
- `handwritten`: the same structure written as pure functions over a params dict
  (benchmarks/handwritten.py), each adapted matmul `x @ w.T + s * (x @ b.T) @ a.T`,
  AdamW on the factors: the reference for compile time and memory.
- `nnx`: Flax NNX's `nnx.LoRALinear` on an NNX port of the structure holding the same
  weights (benchmarks/nnx_ports.py), split into its `nnx.LoRAParam` state and the rest
  (`nnx.split`/`nnx.merge` inside the jitted step, NNX's functional form), optax AdamW on
  the LoRA state. No LoRA conv or embedding in NNX: conv is skipped, embedding adapts
  its head only.
- `qwix`: `qwix.apply_lora_to_model(port, qwix.LoraProvider(module_path=".*", ...))` on
  the plain NNX port, the same step. It adapts what calls `dot_general`/`einsum`/a conv
  on a parameter: every Linear and Conv, not an Embedding's lookup.
- `full`: every inexact weight trained with AdamW.

The nnx and qwix rows need `flax` and `qwix` (`pip install lora_jax[bench]`); without
them they are reported as not built.
"""

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import re
import shlex
import sys
import time
import traceback

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
import quax
import quax.examples.lora as quax_lora


HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's lora_jax
sys.path.insert(0, str(HERE))  # the benchmark modules beside this one
import handwritten  # noqa: E402
from step import (  # noqa: E402
    PIPELINE,
    JaxContender,
    fmt_mib,
    git_commit,
    method_configs,
    n_params,
    quax_factors,
    step_times,
    version,
)
from structures import SHAPES, STRUCTURES, build  # noqa: E402

import lora_jax as lora  # noqa: E402


try:
    import nnx_ports
    import qwix
    from flax import nnx

    BENCH_IMPORT_ERROR = None
except Exception as e:  # ImportError, or a broken install
    nnx_ports = qwix = nnx = None
    BENCH_IMPORT_ERROR = f"{type(e).__name__}: {e}"


PRESETS = {
    "tiny": dict(SHAPES["tiny"], rank=4, dtypes=("float32",), rounds=5),
    "cpu": dict(SHAPES["cpu"], rank=8, dtypes=("float32",), rounds=7),
    "gpu": dict(SHAPES["gpu"], rank=16, dtypes=("bfloat16",), rounds=20),
}
CONTENDERS = (
    "floor",
    "lora",
    "dora",
    "lokr",
    "loha",
    "quax",
    "handwritten",
    "nnx",
    "qwix",
    "full",
)
METHODS = ("lora", "dora", "lokr", "loha")
ALPHA_PER_RANK = 2.0  # alpha = 2·rank, so every LoRA scale s = alpha / rank = 2
MIB = 2.0**20


# ------------------------------------------------------------------------- HLO


@dataclasses.dataclass(frozen=True)
class Relayout:
    """A `transpose` or `copy` instruction of an optimised HLO module."""

    computation: str
    name: str
    opcode: str
    shape: str
    elements: int
    fused: bool  # inside a fusion's computation (then it is the fusion's output)


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")


def relayouts(hlo: str, min_elements: int) -> list[Relayout]:
    """The activation-sized relayouts of an optimised HLO module: its `transpose` and
    `copy` instructions whose result has at least `min_elements` elements (say
    tokens·d), each a pass over memory that moves an activation to another layout.

    Inside a fusion's computation only the fusion's outputs count (the ROOT, or an
    operand of a ROOT tuple): a transpose feeding another op within the fusion is read
    in place by the fused loop, not written out. Outside fusions every one counts
    (in XLA's optimised HLO a transpose that only relabels the layout is a `bitcast`
    and is not counted). An instruction is counted once however often it runs (a
    transpose in a scan's loop body counts once, not once per layer).

    **Arguments:**

    - `hlo`: `compiled.as_text()` of a jitted function.
    - `min_elements`: the smallest result size counted.

    **Returns:**

    The `Relayout`s found, in the text's order.
    """
    fusions = set(_CALLS.findall("\n".join(ln for ln in hlo.splitlines() if " fusion(" in ln)))
    found, computation, lines = [], None, []

    def scan_computation(name, lines):
        parsed = [m for m in map(_INSTRUCTION.match, lines) if m]
        outputs = set()
        for m in parsed:
            if m.group(1):  # ROOT
                outputs.add(m.group(2))
                if m.group(4) == "tuple":
                    outputs.update(_OPERAND.findall(m.group(5)))
        for m in parsed:
            root, inst, shape, opcode, _ = m.groups()
            if opcode not in ("transpose", "copy"):
                continue
            array = _ARRAY.match(shape)
            if array is None:
                continue
            elements = 1
            for dim in filter(None, array.group(1).split(",")):
                elements *= int(dim)
            fused = name in fusions
            if elements < min_elements or (fused and inst not in outputs):
                continue
            found.append(Relayout(name, inst, opcode, shape, elements, fused))

    for line in hlo.splitlines():
        header = _HEADER.match(line) if not line.startswith((" ", "\t")) else None
        if header:
            computation, lines = header.group(1), []
        elif line.startswith("}") and computation is not None:
            scan_computation(computation, lines)
            computation = None
        elif computation is not None:
            lines.append(line)
    return found


def count_relayouts(hlo: str, min_elements: int) -> int:
    """How many activation-sized transposes and copies `relayouts` finds."""
    return len(relayouts(hlo, min_elements))


# ---------------------------------------------------------------------- contenders


class Built(JaxContender):
    """step.py's compiled step and its threaded state, with its build figures: the
    trace + lower and compile seconds, the number of arrays passed per call, and the
    optimised HLO text."""

    def __init__(self, fn, args, feed, trainable, donate=()):
        t = time.perf_counter()
        lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
        self.trace_s = time.perf_counter() - t
        t = time.perf_counter()
        compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t
        super().__init__(compiled, args, feed, trainable)
        self.n_args = len(jtu.tree_leaves(args))
        self.hlo = compiled.as_text()


def floor_step(s):
    arrays, static = eqx.partition(s.model, eqx.is_array)

    def floor(arrays, x, after):
        dx = s.input_grad(eqx.combine(arrays, static), x)
        return dx, after + dx.ravel()[0].astype(after.dtype)

    return Built(floor, (arrays, s.x, jnp.zeros((), jnp.float32)), {2: 1}, 0)


def adapter_step(model, s, opt, split):
    """step.py's `jax_adapter_step` on the structure's loss: the trained leaves and
    optimiser state donated, every frozen array an argument."""
    params, frozen = split(model)
    frozen_arrays, static = eqx.partition(frozen, eqx.is_array)

    def step(params, state, frozen_arrays, x):
        def loss(p):
            model = eqx.combine(p, frozen_arrays, static)
            return quax.quaxify(s.loss)(model, x)

        g = jax.grad(loss)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    args = (params, opt.init(params), frozen_arrays, s.x)
    return Built(step, args, {0: 0, 1: 1}, n_params(params), donate=(0, 1))


def lora_jax_step(s, opt, method, rank, options, key, lora_rank):
    k1, k2 = jr.split(key)
    alpha = ALPHA_PER_RANK * rank
    model = lora.loraify(
        s.model, rank=rank, alpha=alpha, method=method, key=k1, where=s.where(method), **options
    )
    if s.embedding_where(method) is not None:  # the Embedding, with LoRA
        model = lora.loraify(
            model,
            rank=lora_rank,
            alpha=ALPHA_PER_RANK * lora_rank,
            key=k2,
            where=s.embedding_where(method),
        )
    return adapter_step(model, s, opt, lora.partition)


def quax_step(s, opt, rank, key):
    model = quax_lora.loraify(s.model, rank=rank, key=key)
    return adapter_step(model, s, opt, lambda m: eqx.partition(m, quax_factors(m)))


def handwritten_step(s, opt, rank, key):
    frozen, adapters = handwritten.split(s.model, rank=rank, key=key)
    scale = ALPHA_PER_RANK

    def step(adapters, state, frozen, x):
        g = jax.grad(lambda ad: handwritten.loss(s, frozen, ad, x, scale=scale))(adapters)
        updates, state = opt.update(g, state, adapters)
        return optax.apply_updates(adapters, updates), state

    args = (adapters, opt.init(adapters), frozen, s.x)
    return Built(step, args, {0: 0, 1: 1}, n_params(adapters), donate=(0, 1))


def nnx_state_step(model, x, loss_fn, opt):
    """A step on an NNX model's `nnx.LoRAParam` state: split once outside, merged
    inside the jitted step (NNX's functional form, no Python state per call)."""
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)

    def step(params, state, rest, x):
        def loss(p):
            return loss_fn(nnx.merge(graphdef, p, rest), x)

        g = jax.grad(loss)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    args = (params, opt.init(params), rest, x)
    return Built(step, args, {0: 0, 1: 1}, n_params(params), donate=(0, 1))


def needs_bench():
    if BENCH_IMPORT_ERROR is not None:
        raise RuntimeError(f"flax/qwix do not import ({BENCH_IMPORT_ERROR})")


def nnx_step(s, opt, rank):
    needs_bench()
    model, x, loss_fn = nnx_ports.port(s, lora_rank=rank)
    return nnx_state_step(model, x, loss_fn, opt)


def qwix_step(s, opt, rank):
    needs_bench()
    model, x, loss_fn = nnx_ports.port(s)
    provider = qwix.LoraProvider(module_path=".*", rank=rank, alpha=ALPHA_PER_RANK * rank)
    one = x[0] if nnx_ports.vmapped(s) else x  # the model's call, as the loss makes it
    model = qwix.apply_lora_to_model(model, provider, one, rngs=nnx.Rngs(1))
    return nnx_state_step(model, x, loss_fn, opt)


def full_step(s, opt):
    params, static = eqx.partition(s.model, eqx.is_inexact_array)

    def step(params, state, x):
        g = jax.grad(lambda p: s.loss(eqx.combine(p, static), x))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    # Copies: the donated buffers must not be the plain model's, which the floor uses.
    params = jtu.tree_map(jnp.copy, params)
    args = (params, opt.init(params), s.x)
    return Built(step, args, {0: 0, 1: 1}, n_params(params), donate=(0, 1))


def labels(rank):
    configs = method_configs(rank)
    out = {"floor": "floor (fwd + input grad)"}
    for m in METHODS:
        _, r, options = configs[m]
        opts = "".join(f", {k}={v}" for k, v in options.items())
        out[m] = f"lora_jax {m} (rank {r}{opts})"
    out |= {
        "quax": f"quax.examples.lora (rank {rank})",
        "handwritten": f"hand-written JAX LoRA (rank {rank})",
        "nnx": f"flax nnx.LoRALinear (rank {rank})",
        "qwix": f"qwix LoraProvider (rank {rank})",
        "full": "full fine-tune",
    }
    return out


def skip_note(name, contender):
    """Why a contender does not run a structure, or what it leaves out; `None` if it
    runs it whole."""
    if contender == "nnx" and name == "conv":
        return "skipped: flax.nnx has no LoRA conv layer"
    notes = {
        ("quax", "conv"): "convs not adapted (quax's loraify adapts Linear only)",
        ("quax", "embedding"): "embedding not adapted (quax's loraify adapts Linear only)",
        ("nnx", "embedding"): "embedding not adapted (flax.nnx has no LoRA embedding)",
        ("qwix", "embedding"): "embedding not adapted (qwix adapts dot_general/conv, not a lookup)",
    }
    notes[("qwix", "scan")] = (
        "qwix makes its factors during the model's first call, which here runs inside "
        "the blocks' lax.scan: they cannot be made there"
    )
    for m in ("dora", "lokr", "loha"):
        notes[(m, "embedding")] = "embedding adapted with LoRA (no embedding form)"
    return notes.get((contender, name))


# ------------------------------------------------------------------------- running


@dataclasses.dataclass
class Row:
    contender: str
    label: str
    built: Built | None = None
    error: str | None = None
    note: str | None = None
    step_ms: float | None = None
    call_ms: float | None = None
    relayouts: int | None = None


def run_group(name, dtype, cfg, wanted, rounds, hlo_dir):
    """Build, warm up and time every wanted contender on one structure and dtype."""
    rank = cfg["rank"]
    shapes = {k: cfg[k] for k in SHAPES["tiny"]}
    s = build(name, **shapes, dtype=dtype, key=jr.key(0))
    opt = optax.adamw(1e-4)
    key = jr.key(1)
    configs = method_configs(rank)
    makers = {
        "floor": lambda: floor_step(s),
        **{m: (lambda m=m: lora_jax_step(s, opt, m, *configs[m][1:], key, rank)) for m in METHODS},
        "quax": lambda: quax_step(s, opt, rank, key),
        "handwritten": lambda: handwritten_step(s, opt, rank, key),
        "nnx": lambda: nnx_step(s, opt, rank),
        "qwix": lambda: qwix_step(s, opt, rank),
        "full": lambda: full_step(s, opt),
    }
    names = labels(rank)
    threshold = eqx.filter_eval_shape(s.input_grad, s.model, s.x).size
    rows = {}
    for c in CONTENDERS:
        if c not in wanted:
            continue
        row = rows[c] = Row(c, names[c], note=skip_note(name, c))
        if row.note and row.note.startswith("skipped"):
            continue
        t = time.perf_counter()
        try:
            row.built = makers[c]()
            for _ in range(3):  # warm-up
                row.built.sync(row.built())
        except Exception as e:
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            row.error = f"failed to build: {type(e).__name__}: {first}"[:300]
            row.built = None
            continue
        row.relayouts = count_relayouts(row.built.hlo, threshold)
        if hlo_dir is not None:
            path = pathlib.Path(hlo_dir) / f"{name}-{dtype}-{c}.txt"
            path.write_text(row.built.hlo)
        print(
            f"{name} {dtype} {c}: built in {time.perf_counter() - t:.1f} s "
            f"(trace {row.built.trace_s:.1f} s, compile {row.built.compile_s:.1f} s)",
            flush=True,
        )
    live = {c: r.built for c, r in rows.items() if r.built is not None}
    if "floor" in live:
        per_step, per_call = step_times(live, rounds)
        for c in live:
            rows[c].step_ms, rows[c].call_ms = 1e3 * per_step[c], 1e3 * per_call[c]
    return s, rows, threshold


def ratio(a, b, fmt="{:.2f}"):
    return "" if a is None or not b else fmt.format(a / b)


def group_table(name, dtype, rows, threshold):
    floor, hand = rows.get("floor"), rows.get("handwritten")
    fstep = floor.step_ms if floor else None
    fcall = floor.call_ms if floor else None
    hb = hand.built if hand else None
    lines = [
        f"### {name}, {dtype}",
        "",
        "| contender | trained params | args | ms / step | × floor | ms / call | × floor "
        "| compile s | × hand | memory MiB | × hand | temp MiB "
        f"| relayouts ≥ {threshold:,} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for c, row in rows.items():
        if row.note:
            notes.append(f"- {c}: {row.note}")
        if row.built is None:
            why = row.error or row.note
            lines.append(f"| {row.label} | {why} |" + " |" * 11)
            continue
        b = row.built
        total = b.trace_s + b.compile_s
        hand_total = hb.trace_s + hb.compile_s if hb else None
        lines.append(
            f"| {row.label} | {b.trainable:,} | {b.n_args} | {row.step_ms:.2f} "
            f"| {ratio(row.step_ms, fstep)} | {row.call_ms:.2f} | {ratio(row.call_ms, fcall)} "
            f"| {total:.2f} | {ratio(total, hand_total)} "
            f"| {fmt_mib(b.mem)} | {ratio(b.mem, hb.mem if hb else None)} "
            f"| {fmt_mib(b.temp)} | {row.relayouts} |"
        )
    return lines + ([""] + notes if notes else [])


def summary_tables(results, contenders):
    """The × floor matrix (ms / step), and each contender's worst case over the
    structures."""
    keys = list(results)
    head = [c for c in contenders if c != "floor"]
    lines = [
        "## × floor (ms / step), by structure",
        "",
        "| structure | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    for name, dtype in keys:
        rows = results[(name, dtype)]
        fstep = rows["floor"].step_ms if "floor" in rows else None
        cells = []
        for c in head:
            row = rows.get(c)
            if row is None:
                cells.append("")
            elif row.built is None:
                cells.append("skip" if row.note and row.note.startswith("skipped") else "fail")
            else:
                cells.append(ratio(row.step_ms, fstep))
        lines.append(f"| {name} ({dtype}) | " + " | ".join(cells) + " |")

    def worst(c, value):
        got = []
        for key in keys:
            v = value(results[key], c)
            if v is not None:
                got.append((v, f"{key[0]} ({key[1]})"))
        return max(got) if got else None

    def step_ratio(rows, c):
        r, f = rows.get(c), rows.get("floor")
        if r is None or r.built is None or f is None or f.built is None:
            return None
        return r.step_ms / f.step_ms

    def call_ratio(rows, c):
        r, f = rows.get(c), rows.get("floor")
        if r is None or r.built is None or f is None or f.built is None:
            return None
        return r.call_ms / f.call_ms

    def vs_hand(attr):
        def get(rows, c):
            r, h = rows.get(c), rows.get("handwritten")
            if r is None or r.built is None or h is None or h.built is None:
                return None
            a, b = attr(r.built), attr(h.built)
            return None if a is None or not b else a / b

        return get

    compile_total = lambda b: b.trace_s + b.compile_s  # noqa: E731
    lines += [
        "",
        "## Worst case per contender over the structures",
        "",
        "| contender | × floor, ms / step | × floor, ms / call | compile × hand "
        "| memory × hand | failed or skipped |",
        "|---|---|---|---|---|---|",
    ]
    for c in head:
        cells = []
        for value in (step_ratio, call_ratio, vs_hand(compile_total), vs_hand(lambda b: b.mem)):
            w = worst(c, value)
            cells.append("" if w is None else f"{w[0]:.2f} ({w[1]})")
        missing = [
            f"{k[0]} ({k[1]})" for k in keys if c in results[k] and results[k][c].built is None
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {', '.join(missing)} |")
    return lines


def header(preset, cfg, rounds, structures, dtypes):
    device = jax.devices()[0]
    versions = ", ".join(
        [
            f"jax {jax.__version__}",
            f"jaxlib {version('jaxlib')}",
            f"equinox {eqx.__version__}",
            f"quax {version('quax')}",
            f"optax {optax.__version__}",
            f"flax {version('flax')}",
            f"qwix {version('qwix')}",
            f"lora_jax {version('lora_jax')}",
        ]
    )
    shapes = ", ".join(f"{k}={cfg[k]}" for k in SHAPES["tiny"])
    lines = [
        f"# LoRA step over model structures vs the floor ({preset} preset)",
        "",
        f"- commit: {git_commit()}; date: {datetime.date.today()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; JAX device: "
        f"{device.platform} {device.device_kind}; python {platform.python_version()}",
        f"- versions: {versions}",
        "- command: `python " + shlex.join(["benchmarks/matrix.py", *sys.argv[1:]]) + "`",
        f"- shapes: {shapes}, rank {cfg['rank']}; structures: {', '.join(structures)}; "
        f"dtypes: {', '.join(dtypes)} (benchmarks/structures.py describes each)",
        "- every contender of a structure and dtype starts from the same weights and "
        "batch; losses mean(square) in float32 (cross-entropy for embedding); AdamW "
        f"(1e-4) on the trained leaves; LoRA scale alpha/rank = {ALPHA_PER_RANK:g}",
        f"- ms / step: {PIPELINE} steps dispatched back to back and waited on once, per "
        "step (the primary figure: a training loop's step); ms / call: one step waited on "
        "by itself (adds the dispatch of `args` arrays and the wait). Medians of "
        f"{rounds} interleaved rounds after 3 warm-up calls each. × floor: against the "
        "floor measured the same way.",
        "- compile s: trace + lower + compile of the step, measured once; memory: the "
        "compiled step's argument + output + temp − alias bytes (`memory_analysis()`), "
        "temp: its temp bytes; × hand: against the hand-written JAX LoRA step",
        "- relayouts: activation-sized `transpose`/`copy` instructions in the optimised "
        "HLO (result ≥ the input gradient's size, so a weight as large counts too, as in "
        "full fine-tuning's weight gradients; inside a fusion only its outputs; each "
        "instruction once, however often a loop runs it): `matrix.relayouts`",
    ]
    if BENCH_IMPORT_ERROR is not None:
        lines.append(f"- note: flax/qwix do not import: {BENCH_IMPORT_ERROR}")
    return lines


def main(preset, rounds, only, structures, dtypes, hlo_dir):
    cfg = PRESETS[preset]
    rounds = rounds or cfg["rounds"]
    dtypes = dtypes or cfg["dtypes"]
    structures = structures or STRUCTURES
    wanted = set(CONTENDERS if only is None else only) | {"floor"}
    contenders = [c for c in CONTENDERS if c in wanted]
    if hlo_dir is not None:
        pathlib.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
    results, body = {}, []
    for name in structures:
        for dtype in dtypes:
            t = time.perf_counter()
            s, rows, threshold = run_group(name, dtype, cfg, wanted, rounds, hlo_dir)
            results[(name, dtype)] = rows
            table = group_table(name, dtype, rows, threshold)
            print("\n".join(table), flush=True)
            print(f"({name} {dtype}: {time.perf_counter() - t:.0f} s)", flush=True)
            body += table + [""]
            for row in rows.values():  # free the buffers before the next structure
                row.built = None if row.built is None else _Done(row.built)
            del s
    lines = header(preset, cfg, rounds, structures, dtypes) + [""]
    lines += summary_tables(results, contenders) + ["", "## Per structure", ""] + body
    return "\n".join(lines)


class _Done:
    """A timed contender's figures, its buffers released."""

    def __init__(self, b):
        self.trainable, self.n_args, self.mem, self.temp = b.trainable, b.n_args, b.mem, b.temp
        self.trace_s, self.compile_s = b.trace_s, b.compile_s


def names(arg, choices, flag, p):
    if arg is None:
        return None
    got = [s.strip() for s in arg.split(",") if s.strip()]
    bad = [s for s in got if s not in choices]
    if bad:
        p.error(f"{flag}: unknown {bad}; choose from {', '.join(choices)}")
    return got


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--rounds", type=int, default=None, help="default: the preset's")
    p.add_argument("--only", default=None, help=f"comma-separated: {', '.join(CONTENDERS)}")
    p.add_argument("--structures", default=None, help=f"comma-separated: {', '.join(STRUCTURES)}")
    p.add_argument("--dtypes", default=None, help="comma-separated: float32, bfloat16")
    p.add_argument("--out", default=None, help="write the tables to this markdown file")
    p.add_argument("--hlo", default=None, help="dump each step's optimised HLO text here")
    args = p.parse_args()
    text = main(
        args.preset,
        args.rounds,
        names(args.only, CONTENDERS, "--only", p),
        names(args.structures, STRUCTURES, "--structures", p),
        names(args.dtypes, ("float32", "bfloat16"), "--dtypes", p),
        args.hlo,
    )
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
