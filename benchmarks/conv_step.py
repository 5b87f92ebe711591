"""A conv LoRA training step against a conv floor.

The model: 4 × `eqx.nn.Conv2d(64, 64, 3, padding=1)` with ReLUs, on a batch of 32
images 32×32; LoRA rank 8 on every conv. The step is forward + gradient of the factors
+ an Adam update. The floor is what any training step must at least do: the plain
model's forward plus the gradient with respect to its input (`jax.vjp` wrt the input
only; no weight gradients). With `--inner N` each timed call runs N steps (floors)
in one `lax.scan` under one `jax.jit`, so that Python's dispatch does not count (it
would on a GPU, where a step takes a millisecond; on a CPU XLA runs these convs inside
a loop many times slower, so there the default `--inner 1` times one step per call);
calls are interleaved and the median per step is reported.

    PYTHONPATH=. python benchmarks/conv_step.py [--form peft|balanced]
        [--method lora|dora|loha|lokr] [--conv-path factored|merged] [--tucker]
        [--runs 20]

DoRA and LoHa (`--method dora|loha`) take the "peft" form (LoHa: a rank-r² one; its
`--rank 4` trains as many parameters as LoRA's rank 8). LoKr (`--method lokr`) splits
64 channels as 8 × 8: at rank 8 its `w2` is whole (8 × 8 × 3 × 3) and it runs as a
conv LoRA of rank 64 whose first conv is grouped 8 ways. `--conv-path merged` forms
each kernel `w + s·Δ` for the step and runs one conv per pass instead of the thin
factor convs. `--tucker` (LoHa, LoKr) takes PEFT's Tucker form,
`use_effective_conv2d=True`: LoHa's factors, and LoKr's `w2` where it is decomposed
(at 64 channels, rank below 4: `--rank 2`), hold an `r × r × 3 × 3` core.
"""

import argparse
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import quax


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout
import lora_jax as lora  # noqa: E402


class Net(eqx.Module):
    convs: list

    def __init__(self, width, depth, key):
        self.convs = [
            eqx.nn.Conv2d(width, width, 3, padding=1, key=k) for k in jr.split(key, depth)
        ]

    def __call__(self, x):
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return x


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--form", default="peft", choices=["peft", "balanced"])
    parser.add_argument("--method", default="lora", choices=["lora", "dora", "loha", "lokr"])
    parser.add_argument("--conv-path", default="factored", choices=["factored", "merged"])
    parser.add_argument("--tucker", action="store_true")
    parser.add_argument("--runs", type=int, default=20)
    # Steps per jitted call: 1 (the default) calls the step itself; more run a
    # `lax.scan` of steps, for a GPU (XLA's CPU runs these convs far slower in a loop).
    parser.add_argument("--inner", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    key = jr.key(0)
    net = Net(args.width, 4, key)
    x = jr.normal(jr.key(1), (args.batch, args.width, args.size, args.size))
    target = jr.normal(jr.key(2), x.shape)

    options = {
        "lora": {"init": "peft", "conv_form": args.form},
        "dora": {"init": "peft"},
        "loha": {},  # PEFT's init_weights=True: a no-op, as the others' "peft" init
        "lokr": {},
    }[args.method]
    if args.tucker:
        if args.method not in ("loha", "lokr"):
            parser.error("--tucker is PEFT's use_effective_conv2d, for --method loha or lokr")
        options["use_effective_conv2d"] = True
    model = lora.loraify(
        net,
        rank=args.rank,
        key=jr.key(3),
        where=lambda name, layer: isinstance(layer, eqx.nn.Conv),
        method=args.method,
        conv_path=args.conv_path,
        **options,
    )
    params, frozen = lora.partition(model)
    opt = optax.adam(1e-3)
    state = opt.init(params)

    # Everything is an argument: a closed-over array would be a constant XLA may fold.
    def loss_fn(params, frozen, x, target):
        m = eqx.combine(params, frozen)
        y = quax.quaxify(lambda m, x: jax.vmap(m)(x))(m, x)
        return jnp.mean((y - target) ** 2)

    def lora_step(params, state, frozen, x, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, frozen, x, target)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    def floor(net, x, target):
        y, vjp = jax.vjp(lambda x: jax.vmap(net)(x), x)
        (dx,) = vjp(2 * (y - target) / y.size)
        return y, dx

    @eqx.filter_jit
    def lora_steps(params, state, frozen, x, target):
        if args.inner == 1:
            return lora_step(params, state, frozen, x, target)

        def one(carry, _):
            params, state, _ = lora_step(*carry, frozen, x, target)
            return (params, state), None

        return jax.lax.scan(one, (params, state), None, length=args.inner)[0]

    @eqx.filter_jit
    def floors(net, x, target):
        if args.inner == 1:
            return floor(net, x, target)

        def one(x, _):
            _, dx = floor(net, x, target)
            return x + 1e-9 * dx, None  # each floor depends on the last

        return jax.lax.scan(one, x, None, length=args.inner)[0]

    def timed(fn):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t

    step = lambda: lora_steps(params, state, frozen, x, target)
    base = lambda: floors(net, x, target)
    for _ in range(3):  # compile and warm up
        timed(step)
        timed(base)
    t_step, t_floor = [], []
    for _ in range(args.runs):
        t_step.append(timed(step))
        t_floor.append(timed(base))
    s, f = np.median(t_step) / args.inner, np.median(t_floor) / args.inner
    print(
        f"method={args.method}{' (Tucker)' if args.tucker else ''} form={args.form} "
        f"conv_path={args.conv_path} "
        f"batch={args.batch} {args.width}ch {args.size}x{args.size} rank={args.rank} "
        f"devices={jax.devices()[0].platform}"
    )
    print(f"{args.method} step  median {s * 1e3:8.2f} ms")
    print(f"conv floor median {f * 1e3:8.2f} ms")
    print(f"ratio {s / f:.3f}")


if __name__ == "__main__":
    main()
