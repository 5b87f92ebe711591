"""One training step of LoRA, DoRA, LoKr and LoHa against the floor (forward + input
gradient of the plain model), on a stack of residual MLP blocks, on JAX's default
device. Interleaved runs in one process, median of `--runs` each after warm-up.

    PYTHONPATH=. python benchmarks/methods_step.py [--runs 20] [--jaxpr] [--out FILE]

`--jaxpr` also lists, for each variant, the transposes and the intermediates of a full
weight's size (other than the weights themselves) in the step's jaxpr.
"""

import argparse
import datetime

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import quax
import step  # this directory's step.py: its timer

import lora_jax as lora


WIDTH, HIDDEN, DEPTH, BATCH, RANK = 512, 2048, 4, 512, 8


class Block(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.fc1 = eqx.nn.Linear(WIDTH, HIDDEN, key=k1)
        self.fc2 = eqx.nn.Linear(HIDDEN, WIDTH, key=k2)

    def __call__(self, x):
        return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class Model(eqx.Module):
    blocks: list

    def __init__(self, key):
        self.blocks = [Block(k) for k in jr.split(key, DEPTH)]

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def make_floor(model, x, y):
    # The weights are arguments (not constants baked into the program), as in a step.
    @eqx.filter_jit
    def floor(model, x, y):
        out, vjp = jax.vjp(jax.vmap(lambda xi: model(xi)), x)
        return vjp(out - y)[0]

    return lambda: floor(model, x, y)


def make_step(model, x, y):
    params, frozen = lora.partition(model)

    def loss(params, x, y):
        m = eqx.combine(params, frozen)
        out = quax.quaxify(lambda m, x: jax.vmap(lambda xi: m(xi))(x))(m, x)
        return 0.5 * jnp.sum((out - y) ** 2)

    grad = jax.jit(jax.grad(loss))
    return (lambda: grad(params, x, y)), (lambda: jax.make_jaxpr(jax.grad(loss))(params, x, y))


def inspect(jaxpr, weight_shapes):
    transposes, full = [], []

    def visit(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "transpose":
                transposes.append(tuple(eqn.invars[0].aval.shape))
            for v in eqn.outvars:
                shape = tuple(getattr(v.aval, "shape", ()))
                if shape in weight_shapes and eqn.primitive.name not in ("pjit",):
                    full.append((eqn.primitive.name, shape))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return transposes, full


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--jaxpr", action="store_true")
    parser.add_argument("--out", default=None, help="markdown file for the table")
    args = parser.parse_args()

    key = jr.key(0)
    base = Model(key)
    x = jr.normal(jr.key(1), (BATCH, WIDTH))
    y = jr.normal(jr.key(2), (BATCH, WIDTH))
    fns = {"floor": make_floor(base, x, y)}
    jaxprs = {}
    for method in ("lora", "dora", "lokr", "loha"):
        adapted = lora.loraify(base, rank=RANK, alpha=float(RANK), key=jr.key(3), method=method)
        fns[method], jaxprs[method] = make_step(adapted, x, y)

    times = step.median_times(fns, args.runs, warmup=2)  # the warm-up compiles
    floor = times["floor"]
    lines = [
        f"# LoRA, DoRA, LoKr, LoHa: one training step against the floor ({datetime.date.today()})",
        "",
        f"{DEPTH} residual MLP blocks {WIDTH}->{HIDDEN}->{WIDTH}, batch {BATCH}, rank "
        f"{RANK}, float32, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"median of {args.runs}",
        "",
        "| variant | ms | × floor |",
        "|---|---:|---:|",
    ]
    for k, m in times.items():
        lines.append(f"| {k} | {1e3 * m:.2f} | {m / floor:.3f} |")
    if args.jaxpr:
        shapes = {(HIDDEN, WIDTH), (WIDTH, HIDDEN)}
        lines.append("")
        for k, make in jaxprs.items():
            transposes, full = inspect(make(), shapes)
            lines.append(f"- {k}: transposes {transposes}; full-size intermediates {full}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
