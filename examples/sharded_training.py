"""LoRA training on a device mesh: data parallel x FSDP x tensor parallel.

A stack of Megatron MLP blocks (column-parallel `up`, row-parallel `down`, weights
FSDP-sharded and gathered before use) is adapted with `lora_jax.loraify`, laid out with
`lora_jax.shard_model`, and trained with optax under `jax.jit`. Runs on simulated CPU
devices (the default when no accelerator is present) and on GPUs.

    python examples/sharded_training.py                       # 8 CPU devices, mesh 2x2x2
    python examples/sharded_training.py --devices 1 --batch 32 --mesh 1,1,1
    python examples/sharded_training.py --devices 2 --batch 64 --mesh 2,1,1
    python examples/sharded_training.py --explicit            # explicit axis types

Data-parallel scaling: step time on 1 device over step time on 2 devices with twice
the batch (`--mesh 2,1,1`): ideally 1.0 (weak scaling).
"""

import argparse
import os
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes (default: fit)")
    p.add_argument("--batch", type=int, default=32, help="global batch size")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--explicit", action="store_true", help="explicit mesh axis types")
    p.add_argument("--cpu-devices", type=int, default=8, help="simulated CPU devices")
    return p.parse_args()


args = parse()
# Simulated devices must be requested before JAX starts; harmless on GPUs.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.cpu_devices}")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import optax  # noqa: E402
import quax  # noqa: E402
from jax.sharding import AxisType, PartitionSpec as P  # noqa: E402


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lora_jax as lora  # noqa: E402


def place(x, spec):
    """Pin a layout inside jit: `reshard` on an explicit mesh, a constraint on an auto
    one (where `out_sharding` may not name axes either)."""
    if jax.sharding.get_abstract_mesh().explicit_axes:
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def out(spec):
    return spec if jax.sharding.get_abstract_mesh().explicit_axes else None


class Block(eqx.Module):
    norm: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, dim, hidden, key):
        k1, k2 = jr.split(key)
        self.norm = eqx.nn.LayerNorm(dim)
        self.up = eqx.nn.Linear(dim, hidden, key=k1)
        self.down = eqx.nn.Linear(hidden, dim, key=k2)

    def __call__(self, x):  # x: (batch, dim), batch over "data"
        h = jax.vmap(self.norm)(x)
        w = place(self.up.weight, P("tensor", None))  # FSDP all-gather
        h = jnp.einsum("bd,hd->bh", h, w, out_sharding=out(P("data", "tensor")))
        h = jax.nn.gelu(h + self.up.bias[None])
        w = place(self.down.weight, P(None, "tensor"))
        # Row parallel: the contraction is sharded over "tensor"; on an explicit mesh
        # the result's sharding must be given, and LoRA's products derive theirs.
        y = jnp.einsum("bh,dh->bd", h, w, out_sharding=out(P("data", None)))
        return x + y + self.down.bias[None]


class Model(eqx.Module):
    blocks: list[Block]
    head: eqx.nn.Linear

    def __init__(self, dim, hidden, layers, key):
        keys = jr.split(key, layers + 1)
        self.blocks = [Block(dim, hidden, k) for k in keys[:-1]]
        self.head = eqx.nn.Linear(dim, dim, key=keys[-1])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x @ self.head.weight.T


def main():
    devices = jax.devices()[: args.devices]
    n = len(devices)
    if args.mesh:
        shape = tuple(int(s) for s in args.mesh.split(","))
    else:
        shape = {1: (1, 1, 1), 2: (2, 1, 1), 4: (2, 1, 2), 8: (2, 2, 2)}.get(n, (n, 1, 1))
    if len(shape) != 3 or shape[0] * shape[1] * shape[2] != n:
        raise SystemExit(f"--mesh {shape} does not use the {n} devices")
    types = (AxisType.Explicit if args.explicit else AxisType.Auto,) * 3
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=types, devices=devices)
    print(f"{n} x {devices[0].platform}, mesh {dict(mesh.shape)}, {types[0]}")

    rules = [
        lora.tensor_parallel(column=["up"], row=["down"]),
        lora.fsdp("fsdp", min_size=2**12),
    ]
    key_model, key_lora, key_data = jr.split(jr.key(0), 3)
    with jax.set_mesh(mesh):
        model = Model(args.dim, args.hidden, args.layers, key_model)
        model = lora.loraify(model, rank=args.rank, key=key_lora, exclude=["head"])
        model = lora.shard_model(model, mesh, rules)
        params, frozen = lora.partition(model)
        specs = lora.trainable_partition_specs(model, mesh, rules)
        optim = optax.adamw(1e-3)
        opt_state = optim.init(params)
        lora.print_trainable_parameters(model)

        # A fixed random teacher: learn y = tanh(x @ t).
        teacher = jr.normal(key_data, (args.dim, args.dim)) / args.dim**0.5

        # Each device draws its own shard of the batch: no host round trip and no
        # cross-device copy inside the timed step.
        @jax.jit
        def batch(i):
            x = jr.normal(jr.fold_in(key_data, i), (args.batch, args.dim))
            x = place(x, P("data", None))
            return x, place(jnp.tanh(x @ teacher), P("data", None))

        @eqx.filter_jit(donate="all-except-first")
        def step(frozen, params, opt_state, x, y):
            def loss(params):
                m = eqx.combine(params, frozen)
                return jnp.mean((quax.quaxify(m)(x) - y) ** 2)

            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = optim.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            params = jax.tree.map(place, params, specs, is_leaf=lambda s: isinstance(s, P))
            return params, opt_state, value

        times = []
        for i in range(args.steps):
            x, y = jax.block_until_ready(batch(i))
            t0 = time.perf_counter()
            params, opt_state, value = step(frozen, params, opt_state, x, y)
            value = float(value)  # waits for the step
            times.append(time.perf_counter() - t0)
            if i % 5 == 0 or i == args.steps - 1:
                print(f"step {i:3d}  loss {value:.5f}  {times[-1] * 1e3:8.2f} ms")
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    print(
        f"compile+first step {times[0]:.2f} s; median step {steady * 1e3:.2f} ms "
        f"(batch {args.batch}, {args.batch / steady:.0f} samples/s)"
    )


if __name__ == "__main__":
    main()
