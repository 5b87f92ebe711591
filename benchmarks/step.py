"""One LoRA training step against the floor, quax's example and full fine-tuning.

The floor is the forward pass plus the input-gradient of the plain model: what any LoRA
step must do (the gradient has to flow back through every frozen layer). Each contender
is jitted, warmed up, then timed in interleaved rounds in one process; the table gives
medians and ratios to the floor.

    python benchmarks/step.py                 # the CPU shapes (4 blocks 512->2048->512)
    python benchmarks/step.py --preset gpu    # the H100 shapes, bf16
"""

import argparse
import datetime
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
import quax
import quax.examples.lora as quax_lora

import lora_jax as lora


PRESETS = {
    "cpu": dict(blocks=4, d=512, hidden=2048, tokens=512, rank=8, dtype="float32"),
    "gpu": dict(blocks=8, d=2048, hidden=8192, tokens=8192, rank=16, dtype="bfloat16"),
}


class Block(eqx.Module):
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, d, hidden, dtype, key):
        k1, k2 = jr.split(key)
        self.up = eqx.nn.Linear(d, hidden, use_bias=False, dtype=dtype, key=k1)
        self.down = eqx.nn.Linear(hidden, d, use_bias=False, dtype=dtype, key=k2)

    def __call__(self, x):  # x: (tokens, d); Linear layers vmapped over tokens
        h = jax.nn.gelu(jax.vmap(self.up)(x))
        return x + jax.vmap(self.down)(h)


class Net(eqx.Module):
    blocks: list

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def loss_fn(model, x):
    return jnp.mean(model(x).astype(jnp.float32) ** 2)


def factors_filter(model):
    """a and b of any LoRA value (ours or quax's): the trainable leaves."""

    def is_factor(path, leaf):
        return (
            eqx.is_inexact_array(leaf)
            and isinstance(path[-1], jtu.GetAttrKey)
            and path[-1].name in ("a", "b")
        )

    return jtu.tree_map_with_path(is_factor, model)


def make_lora_step(model, opt):
    params, frozen = eqx.partition(model, factors_filter(model))
    frozen_arrays, static = eqx.partition(frozen, eqx.is_array)

    # Every array is an argument: a closed-over weight would be a compile-time
    # constant, which XLA may fold (and which no real training loop has).
    @jax.jit
    def step(params, state, frozen_arrays, x):
        def loss(p):
            model = eqx.combine(p, frozen_arrays, static)
            return quax.quaxify(loss_fn)(model, x)

        g = jax.grad(loss)(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return lambda params, state, x: step(params, state, frozen_arrays, x), (
        params,
        opt.init(params),
    )


def make_full_step(model, opt):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    @jax.jit
    def step(params, state, x):
        g = jax.grad(lambda p: loss_fn(eqx.combine(p, static), x))(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    return step, (params, opt.init(params))


def make_floor(model):
    @jax.jit
    def floor(model, x):
        return jax.grad(loss_fn, argnums=1)(model, x)

    return floor


def timeit(fn, rounds):
    times = {name: [] for name in fn}
    for _ in range(rounds):
        for name, f in fn.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(preset, rounds):
    cfg = PRESETS[preset]
    dtype = jnp.dtype(cfg["dtype"])
    keys = jr.split(jr.key(0), cfg["blocks"] + 2)
    model = Net([Block(cfg["d"], cfg["hidden"], dtype, k) for k in keys[:-2]])
    x = jr.normal(keys[-1], (cfg["tokens"], cfg["d"]), dtype)
    opt = optax.adamw(1e-4)

    ours = lora.loraify(model, rank=cfg["rank"], alpha=2.0 * cfg["rank"], key=keys[-2])
    theirs = quax_lora.loraify(model, rank=cfg["rank"], key=keys[-2])
    floor = make_floor(model)
    contenders = {"floor (fwd + input grad)": lambda: floor(model, x)}
    state = {}
    for name, m, maker in (
        ("lora_jax", ours, make_lora_step),
        ("quax.examples.lora", theirs, make_lora_step),
        ("full fine-tune", model, make_full_step),
    ):
        step, s = maker(m, opt)
        state[name] = s

        def run(name=name, step=step):
            out = step(*state[name], x)
            state[name] = out
            return out

        contenders[name] = run
    for f in contenders.values():  # compile and warm up
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    med = timeit(contenders, rounds)
    base = med["floor (fwd + input grad)"]
    device = jax.devices()[0].device_kind
    lines = [
        f"# LoRA step vs floor ({preset} preset)",
        "",
        f"- date: {datetime.date.today()}; device: {device}; jax {jax.__version__}; "
        f"{platform.processor() or platform.machine()}",
        f"- shapes: {cfg['blocks']} residual blocks {cfg['d']}->{cfg['hidden']}->{cfg['d']}, "
        f"{cfg['tokens']} tokens, rank {cfg['rank']}, {cfg['dtype']}, AdamW on the trained "
        f"leaves; median of {rounds} interleaved rounds",
        "",
        "| contender | ms / step | × floor |",
        "|---|---:|---:|",
    ]
    for name, t in med.items():
        lines.append(f"| {name} | {1e3 * t:.2f} | {t / base:.3f} |")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=None, help="write the table to this markdown file")
    args = p.parse_args()
    table = main(args.preset, args.rounds)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
