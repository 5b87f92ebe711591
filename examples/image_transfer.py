"""Transfer learning on scikit-learn's digits: LoRA vs full fine-tuning vs head only.

A small CNN is pretrained to tell the digits 0-4 apart, then adapted to tell 5-9 apart
(the same five outputs, new meanings) in three ways:

- LoRA: rank-4 adapters on both convolutions and both Linear layers, plus the biases of
  the adapted layers. `loraify` adapts only Linear layers unless `where` names others,
  so `where` lists the convolutions too (their kernels become `LoraConvArray`s);
- full fine-tuning: every parameter trains;
- head only: only the last Linear layer trains.

It prints a table of test accuracy and trainable parameters, and saves a bar plot to
`examples/out/image_transfer.png`.

    python examples/image_transfer.py            # about a minute on a laptop CPU
    python examples/image_transfer.py --quick    # a few seconds: a smoke test
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
import numpy as np  # noqa: E402
import optax  # noqa: E402
import quax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tqdm import tqdm  # noqa: E402


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lora_jax as lora  # noqa: E402


OUT = os.path.join(os.path.dirname(__file__), "out")
# The layers LoRA adapts: both convolutions and both Linear layers.
LORA_LAYERS = ["conv1", "conv2", "hidden", "head"]


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    hidden: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, padding=1, key=k2)
        self.hidden = eqx.nn.Linear(32 * 4 * 4, 64, key=k3)
        self.head = eqx.nn.Linear(64, 5, key=k4)

    def __call__(self, x):  # x: (1, 8, 8)
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = x.reshape(32, 4, 2, 4, 2).mean(axis=(2, 4))  # 2x2 average pooling
        x = jax.nn.relu(self.hidden(x.reshape(-1)))
        return self.head(x)


def digits(lo, key):
    """Images and labels (0-4) of the digits lo..lo+4, split 75/25 into train/test."""
    data = load_digits()
    keep = (data.target >= lo) & (data.target < lo + 5)
    x = jnp.asarray(data.images[keep, None] / 16.0, jnp.float32)
    y = jnp.asarray(data.target[keep] - lo)
    perm = jr.permutation(key, len(y))
    x, y = x[perm], y[perm]
    n = int(0.75 * len(y))
    return (x[:n], y[:n]), (x[n:], y[n:])


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@eqx.filter_jit
def accuracy(model, x, y):
    logits = jax.vmap(quax.quaxify(model))(x)
    return jnp.mean(jnp.argmax(logits, -1) == y)


def train(model, mask, data, steps, lr, desc, seed=0):
    """Adam on the leaves where `mask` is True; everything else stays frozen."""
    params, frozen = eqx.partition(model, mask)
    optim = optax.adam(lr)
    opt_state = optim.init(params)

    @eqx.filter_jit
    def step(params, opt_state, x, y):
        # quaxify the loss of the *recombined* model, inside grad: the gradient then
        # flows only into `params` (the adapters' factors), never into a dense `w + Δ`.
        grad_fn = jax.value_and_grad(lambda p: quax.quaxify(loss_fn)(eqx.combine(p, frozen), x, y))
        value, grads = grad_fn(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    x, y = data
    rng = np.random.default_rng(seed)
    for i in (bar := tqdm(range(steps), desc=desc, leave=False)):
        idx = rng.choice(len(y), 64, replace=False)
        params, opt_state, value = step(params, opt_state, x[idx], y[idx])
        if i % 20 == 0:
            bar.set_postfix(loss=f"{float(value):.3f}")
    return eqx.combine(params, frozen)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="training steps per phase")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = p.parse_args()
    steps = 5 if args.quick else args.steps

    k_model, k_data, k_lora = jr.split(jr.key(0), 3)
    old_train, old_test = digits(0, k_data)
    new_train, new_test = digits(5, k_data)

    # 1. Pretrain on 0-4.
    base = CNN(k_model)
    base = train(base, eqx.is_inexact_array, old_train, steps, 3e-3, "pretrain 0-4")
    print(
        f"pretrained on 0-4: test accuracy {accuracy(base, *old_test):.3f} on 0-4, "
        f"{accuracy(base, *new_test):.3f} on 5-9 (before adapting)"
    )

    # 2. Adapt to 5-9, three ways. LoRA on the convolutions as well as the linears:
    # `where` names them all (by default only `eqx.nn.Linear` layers are adapted).
    adapted = lora.loraify(base, rank=args.rank, key=k_lora, where=LORA_LAYERS)
    runs = {
        "LoRA": (adapted, lora.trainable_mask(adapted, train_bias="lora_only")),
        "full fine-tuning": (base, eqx.is_inexact_array),
        "head only": (base, lora.trainable_mask(base, trainable=["head"])),
    }
    results = {}
    for name, (model, mask) in runs.items():
        model = train(model, mask, new_train, steps, 3e-3, name)
        n_train = sum(x.size for x in jax.tree.leaves(eqx.filter(model, mask)))
        results[name] = (float(accuracy(model, *new_test)), n_train)
        if name == "LoRA":
            print(lora.summary(model, train_bias="lora_only"))
            # Merged, the adapted model is a plain CNN again, with the same outputs.
            merged = lora.materialise(model)
            assert abs(float(accuracy(merged, *new_test)) - results[name][0]) < 1e-6

    print(f"\n{'adaptation to 5-9':<18} {'test accuracy':>13} {'trainable params':>17}")
    for name, (acc, n) in results.items():
        print(f"{name:<18} {acc:>13.3f} {n:>17,}")

    os.makedirs(OUT, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(results)
    colors = ["C0", "C1", "C2"]
    bars = ax1.bar(names, [results[n][0] for n in names], color=colors)
    ax1.bar_label(bars, fmt="%.3f")
    ax1.set_ylim(0, 1.1)
    ax1.set_title("test accuracy on digits 5-9")
    bars = ax2.bar(names, [results[n][1] for n in names], color=colors)
    ax2.bar_label(bars, labels=[f"{results[n][1]:,}" for n in names])
    ax2.set_yscale("log")
    ax2.set_title("trainable parameters (log scale)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path = os.path.join(OUT, "image_transfer.png")
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
