"""Trace + compile time of one LoRA training step against the plain model's floor
step, over depth.

Each measurement builds a fresh function, clears JAX's caches, then times
`jax.jit(f).lower(*args)` (trace + lowering to StableHLO) and `.compile()` (XLA)
with `time.perf_counter`. Small widths, so the time is the compiler's, not the
arrays'.

- plain floor: forward + gradient wrt the input of the plain model (a Python loop
  over blocks, unrolled in the program); plain full fine-tune: its training step.
- hand-written LoRA: `w·x + s·a·(b·x)` in plain JAX, no quax: the cost of the LoRA
  arithmetic and its optimiser to the compiler, whatever the library.
- lora_jax / quax.examples.lora: gradient wrt the factors + an AdamW update, the loop
  unrolled as above.
- plain floor (scan) / lora_jax (scan): the blocks stacked by `eqx.filter_vmap` of
  their constructor and run by `jax.lax.scan`; the stacked adapters hold stacked
  factors and a scaling of shape `(layers,)`. Should be flat in depth.

    python benchmarks/compile_time.py --quick          # smoke test
    python benchmarks/compile_time.py --out compile_time.md
    python benchmarks/compile_time.py --profile 48     # cProfile of lora_jax's lowering
"""

import argparse
import cProfile
import datetime
import importlib.metadata
import io
import pathlib
import platform
import pstats
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import quax
import quax.examples.lora as quax_lora


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout
import lora_jax as lora  # noqa: E402


D, HIDDEN, TOKENS, RANK = 64, 256, 32, 4
TARGET = 1.5  # issue 5: lora_jax ≤ 1.5× the plain model's trace + compile time


class Block(eqx.Module):
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.up = eqx.nn.Linear(D, HIDDEN, use_bias=False, key=k1)
        self.down = eqx.nn.Linear(HIDDEN, D, use_bias=False, key=k2)

    def __call__(self, x):  # x: (tokens, d)
        h = jax.nn.gelu(jax.vmap(self.up)(x))
        return x + jax.vmap(self.down)(h)


class Net(eqx.Module):
    blocks: list

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class ScanNet(eqx.Module):
    blocks: Block  # every array has a leading `layers` axis

    def __call__(self, x):
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def body(x, p):
            return eqx.combine(p, static)(x), None

        return jax.lax.scan(body, x, params)[0]


def loss_fn(model, x):
    return jnp.mean(model(x).astype(jnp.float32) ** 2)


class HandLora(eqx.Module):
    """LoRA written out in plain JAX, no quax: `w·x + s·a·(b·x)` for one token."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scaling: jax.Array

    def __call__(self, x):
        w = jax.lax.stop_gradient(self.w)
        return w @ x + self.scaling * (self.a @ (self.b @ x))


def hand_loraify(net):
    def convert(layer):
        if not isinstance(layer, eqx.nn.Linear):
            return layer
        out, inp = layer.weight.shape
        a = jnp.zeros((out, RANK))
        b = jnp.full((RANK, inp), 0.01)
        return HandLora(layer.weight, a, b, jnp.asarray(2.0))

    is_linear = lambda x: isinstance(x, eqx.nn.Linear)  # noqa: E731
    return jax.tree.map(convert, net, is_leaf=is_linear)


def hand_split(model):
    def mask(leaf):
        if isinstance(leaf, HandLora):
            return HandLora(False, True, True, False)  # type: ignore[arg-type]
        return False

    is_hand = lambda x: isinstance(x, HandLora)  # noqa: E731
    return eqx.partition(model, jax.tree.map(mask, model, is_leaf=is_hand))


def floor_step():
    def floor(model, x):
        return jax.grad(loss_fn, argnums=1)(model, x)

    return floor


def full_step(static, opt):
    def step(params, state, x):
        g = jax.grad(lambda p: loss_fn(eqx.combine(p, static), x))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return step


def adapter_step(static, opt, quaxified=True):
    def step(params, state, frozen, x):
        def loss(p):
            model = eqx.combine(p, frozen, static)
            return (quax.quaxify(loss_fn) if quaxified else loss_fn)(model, x)

        g = jax.grad(loss)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return step


def quax_split(model):
    def is_factor(path, leaf):
        return (
            eqx.is_inexact_array(leaf)
            and isinstance(path[-1], jax.tree_util.GetAttrKey)
            and path[-1].name in ("a", "b")
        )

    return eqx.partition(model, jax.tree_util.tree_map_with_path(is_factor, model))


# Rows, and the floor each is compared with in "× own floor".
OWN_FLOOR = {
    "plain floor": "plain floor",
    "plain full fine-tune": "plain floor",
    "hand-written LoRA": "plain floor",
    "lora_jax": "plain floor",
    "quax.examples.lora": "plain floor",
    "plain floor (scan)": "plain floor (scan)",
    "lora_jax (scan)": "plain floor (scan)",
}


def contenders(depth, opt):
    """name -> (a function that builds a fresh step, its arguments)."""
    keys = jr.split(jr.key(depth), depth)
    x = jr.normal(jr.key(1), (TOKENS, D))
    net = Net([Block(k) for k in keys])
    stacked = ScanNet(eqx.filter_vmap(Block)(keys))

    def adapted(model, split, quaxified=True):
        params, frozen = split(model)
        frozen, static = eqx.partition(frozen, eqx.is_array)
        make = lambda: adapter_step(static, opt, quaxified)  # noqa: E731
        return make, (params, opt.init(params), frozen, x)

    ours = lora.loraify(net, rank=RANK, alpha=2.0 * RANK, key=jr.key(2))
    theirs = quax_lora.loraify(net, rank=RANK, key=jr.key(2))
    ours_scan = lora.loraify(stacked, rank=RANK, alpha=2.0 * RANK, key=jr.key(2))
    assert ours_scan.blocks.up.weight.scaling.shape == (depth,)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    return {
        "plain floor": (floor_step, (net, x)),
        "plain full fine-tune": (
            lambda: full_step(static, opt),
            (params, opt.init(params), x),
        ),
        "hand-written LoRA": adapted(hand_loraify(net), hand_split, quaxified=False),
        "lora_jax": adapted(ours, lora.partition),
        "quax.examples.lora": adapted(theirs, quax_split),
        "plain floor (scan)": (floor_step, (stacked, x)),
        "lora_jax (scan)": adapted(ours_scan, lora.partition),
    }


def hlo_ops(lowered):
    """StableHLO operations in the lowered program: what XLA is handed."""
    return sum("stablehlo." in line for line in lowered.as_text().splitlines())


def measure(make, args):
    """(trace + lower s, compile s, StableHLO ops) for a fresh function on cleared
    caches."""
    jax.clear_caches()
    f = jax.jit(make())
    t0 = time.perf_counter()
    lowered = f.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, hlo_ops(lowered)


def profile(depth, top):
    """cProfile of lora_jax's trace + lowering at `depth`, by cumulative time."""
    make, args = contenders(depth, optax.adamw(1e-4))["lora_jax"]
    measure(make, args)  # imports and first-use costs out of the way
    jax.clear_caches()
    f = jax.jit(make())
    prof = cProfile.Profile()
    prof.enable()
    f.lower(*args)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(top)
    print(s.getvalue())
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    print(s.getvalue())


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(depths, repeats, out):
    opt = optax.adamw(1e-4)
    rows = []
    for depth in depths:
        cs = contenders(depth, opt)
        times = {name: [] for name in cs}
        for _ in range(repeats):  # interleaved
            for name, (make, args) in cs.items():
                times[name].append(measure(make, args))
        med = {
            name: (
                statistics.median(t[0] for t in ts),
                statistics.median(t[1] for t in ts),
                ts[0][2],
            )
            for name, ts in times.items()
        }
        total = {name: m[0] + m[1] for name, m in med.items()}
        for name, (lower, comp, ops) in med.items():
            rows.append(
                dict(
                    depth=depth,
                    name=name,
                    lower=lower,
                    compile=comp,
                    ops=ops,
                    own=total[name] / total[OWN_FLOOR[name]],
                    plain=total[name] / total["plain floor"],
                    hand=total[name] / total["hand-written LoRA"],
                )
            )
            print(
                f"depth {depth:3d}  {name:22s} trace+lower {1e3 * lower:8.1f} ms  "
                f"compile {1e3 * comp:8.1f} ms  {ops:6d} ops  "
                f"×plain {rows[-1]['plain']:.2f}",
                flush=True,
            )
        if out:  # after every depth, so a run cut short leaves what it measured
            with open(out, "w") as f:
                f.write(table(rows, repeats) + "\n")
    return rows


def table(rows, repeats):
    deepest = max(r["depth"] for r in rows)
    at = {r["name"]: r for r in rows if r["depth"] == deepest}
    ours = at["lora_jax"]
    verdict = "meets" if ours["plain"] <= TARGET else "misses"
    lines = [
        "# Trace + compile time of a LoRA training step over depth",
        "",
        f"- date: {datetime.date.today()}; device: {jax.devices()[0].device_kind}; "
        f"host: {platform.processor() or platform.machine()}",
        f"- versions: jax {jax.__version__}, jaxlib {version('jaxlib')}, equinox "
        f"{eqx.__version__}, quax {version('quax')}, optax {optax.__version__}, "
        f"lora_jax {version('lora_jax')}",
        f"- blocks: x + Linear({D}->{HIDDEN}) -> gelu -> Linear({HIDDEN}->{D}), "
        f"{TOKENS} tokens, rank {RANK}, float32. Floors: forward + gradient wrt the "
        "input. Training steps (full fine-tune, LoRA): gradient wrt the trained "
        "leaves + AdamW. hand-written LoRA: `w·x + s·a·(b·x)` in plain JAX without "
        "quax, the same step: what the LoRA arithmetic and its optimiser cost the "
        "compiler whatever the library. A fresh function and `jax.clear_caches()` "
        f"before each measurement; median of {repeats} interleaved repeats. ops: "
        "StableHLO operations in the lowered program.",
        "- × own floor: the scan rows against the plain floor (scan), the others "
        "against the plain floor. × hand: against the hand-written LoRA step.",
        f"- target (issue 5): lora_jax ≤ {TARGET}× the plain floor at depth "
        f"{deepest}: {ours['plain']:.2f}×, {verdict} it; the hand-written LoRA "
        f"step is {at['hand-written LoRA']['plain']:.2f}× and lora_jax "
        f"{ours['hand']:.2f}× the hand-written one. lora_jax (scan): "
        f"{at['lora_jax (scan)']['plain']:.2f}× the unrolled plain floor.",
        "",
        "| depth | contender | trace + lower ms | compile ms | total ms | ops "
        "| × own floor | × hand |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['depth']} | {r['name']} | {1e3 * r['lower']:.1f} "
            f"| {1e3 * r['compile']:.1f} | {1e3 * (r['lower'] + r['compile']):.1f} "
            f"| {r['ops']} | {r['own']:.2f} | {r['hand']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", default="6,12,24,48", help="comma-separated depths")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="depths 2,4; one repeat")
    p.add_argument("--out", default=None, help="write the table to this markdown file")
    p.add_argument(
        "--profile",
        type=int,
        default=None,
        metavar="DEPTH",
        help="instead: cProfile lora_jax's trace + lowering at this depth",
    )
    p.add_argument("--top", type=int, default=40, help="rows of the profile")
    args = p.parse_args()
    if args.profile is not None:
        profile(args.profile, args.top)
        sys.exit()
    depths = [2, 4] if args.quick else [int(d) for d in args.depths.split(",")]
    repeats = 1 if args.quick else args.repeats
    print(table(main(depths, repeats, args.out), repeats))
