"""ConvNeXt-tiny with LoRA rank 2 on the MLP of every block, as tfimm's LoRA example.

tfimm (TensorFlow) reports for `lora.create_model("convnext_tiny", lora_rank=2)`:

    Total params: 28,721,608
    Trainable params: 132,480

This script builds ConvNeXt-tiny as tfimm defines it (depths (3, 3, 9, 3), dims
(96, 192, 384, 768), depthwise 7x7 convolution, LayerNorm, pointwise MLP with 4x
expansion as Linear layers, layer scale), randomly initialised, adapts the two MLP
layers of every block with `where=` (a regex), prints the summary and PEFT's line, and
runs one forward pass on a small image. It saves a bar chart of the trainable
parameters per stage to `examples/out/convnext_lora.png`.

    python examples/convnext_lora.py          # about a minute on a CPU (compilation)
    python examples/convnext_lora.py --quick  # smaller image and no table
"""

import argparse
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import quax  # noqa: E402


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lora_jax as lora  # noqa: E402


OUT = os.path.join(os.path.dirname(__file__), "out")


def channels_last(fn, x):
    """Applies a per-pixel layer `fn` (LayerNorm, Linear) to `x` of shape (C, H, W)."""
    return jnp.moveaxis(jax.vmap(jax.vmap(fn))(jnp.moveaxis(x, 0, -1)), -1, 0)


class Block(eqx.Module):
    dwconv: eqx.nn.Conv2d
    norm: eqx.nn.LayerNorm
    mlp_fc1: eqx.nn.Linear
    mlp_fc2: eqx.nn.Linear
    gamma: jax.Array  # layer scale

    def __init__(self, dim, key):
        k1, k2, k3 = jr.split(key, 3)
        self.dwconv = eqx.nn.Conv2d(dim, dim, 7, padding=3, groups=dim, key=k1)
        self.norm = eqx.nn.LayerNorm(dim, eps=1e-6)
        self.mlp_fc1 = eqx.nn.Linear(dim, 4 * dim, key=k2)
        self.mlp_fc2 = eqx.nn.Linear(4 * dim, dim, key=k3)
        self.gamma = jnp.full(dim, 1e-6)

    def __call__(self, x):  # x: (dim, H, W)
        h = channels_last(self.norm, self.dwconv(x))
        h = channels_last(lambda v: self.mlp_fc2(jax.nn.gelu(self.mlp_fc1(v))), h)
        return x + self.gamma[:, None, None] * h


class Downsample(eqx.Module):
    norm: eqx.nn.LayerNorm
    conv: eqx.nn.Conv2d

    def __init__(self, c_in, c_out, key):
        self.norm = eqx.nn.LayerNorm(c_in, eps=1e-6)
        self.conv = eqx.nn.Conv2d(c_in, c_out, 2, stride=2, key=key)

    def __call__(self, x):
        return self.conv(channels_last(self.norm, x))


class ConvNeXt(eqx.Module):
    stem: eqx.nn.Conv2d
    stem_norm: eqx.nn.LayerNorm
    downsamples: list[Downsample]
    stages: list[list[Block]]
    head_norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), classes=1000, *, key):
        keys = iter(jr.split(key, 3 + len(dims) + sum(depths)))
        self.stem = eqx.nn.Conv2d(3, dims[0], 4, stride=4, key=next(keys))
        self.stem_norm = eqx.nn.LayerNorm(dims[0], eps=1e-6)
        self.downsamples = [
            Downsample(dims[i - 1], dims[i], next(keys)) for i in range(1, len(dims))
        ]
        self.stages = [[Block(d, next(keys)) for _ in range(n)] for d, n in zip(dims, depths)]
        self.head_norm = eqx.nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = eqx.nn.Linear(dims[-1], classes, key=next(keys))

    def __call__(self, x):  # x: (3, H, W), H and W multiples of 32
        x = channels_last(self.stem_norm, self.stem(x))
        for i, blocks in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            for block in blocks:
                x = block(x)
        return self.head(self.head_norm(x.mean(axis=(1, 2))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="image side (a multiple of 32)")
    p.add_argument("--quick", action="store_true", help="32x32 image, no table")
    args = p.parse_args()
    size = 32 if args.quick else args.size

    model = ConvNeXt(key=jr.key(0))
    base = lora.summary(model)
    # Every block's two MLP layers: `stages.<i>.<j>.mlp_fc1` and `...mlp_fc2`.
    model = lora.loraify(model, rank=2, key=jr.key(1), where=r"stages\.\d+\.\d+\.mlp_fc[12]")
    s = lora.summary(model)
    if not args.quick:
        print(s)
    print(s.peft_line)
    print(
        f"base ConvNeXt-tiny: {base.total:,} parameters; LoRA adds {s.trainable:,} "
        f"(tfimm: Total 28,721,608 / Trainable 132,480)"
    )

    image = jr.uniform(jr.key(2), (3, size, size))
    logits = eqx.filter_jit(quax.quaxify(model))(image)
    # The adapters start as no-ops (b = 0): the merged model gives the same logits.
    same = jnp.allclose(logits, eqx.filter_jit(lora.materialise(model))(image), atol=1e-4)
    print(
        f"forward pass on a {size}x{size} image: logits {logits.shape}, "
        f"top class {int(jnp.argmax(logits))}; same as merged: {bool(same)}"
    )

    # Trainable parameters per stage (the deep third stage holds most of them).
    per_stage = [0, 0, 0, 0]
    for module, _, _, trainable in s.rows:
        if module.startswith("stages."):
            per_stage[int(module.split(".")[1])] += trainable
    os.makedirs(OUT, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([f"stage {i}\n(dim {d})" for i, d in enumerate((96, 192, 384, 768))], per_stage)
    ax.set_title(f"LoRA rank 2 trainable parameters: {s.trainable:,}")
    fig.tight_layout()
    path = os.path.join(OUT, "convnext_lora.png")
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
