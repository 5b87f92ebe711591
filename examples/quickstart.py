"""Quickstart: LoRA fine-tuning of a small Equinox model with optax, under jit.

A classifier is trained on scikit-learn's handwritten digits (shipped inside the
package: nothing is downloaded), then adapted with LoRA to a new task: the same digits
mirrored left to right, which the pretrained model reads badly. Only the
low-rank factors train; the pretrained weights stay bitwise frozen.

    python examples/quickstart.py            # about a minute on a laptop CPU
    python examples/quickstart.py --steps 50 # quicker
"""

import argparse
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import quax
from sklearn.datasets import load_digits
from tqdm import tqdm

import lora_jax as lora


def load(mirror: bool):
    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    if mirror:
        x = x[:, :, ::-1]
    x = x.reshape(len(x), 64)
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    return (jnp.asarray(x[:n]), jnp.asarray(y[:n])), (jnp.asarray(x[n:]), jnp.asarray(y[n:]))


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model, x, y):
    return float(jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y))


def train(params, static, data, steps, lr, desc, adapted: bool):
    """Adam on `params`; `static` holds everything frozen. With `adapted`, the model is
    called through quax.quaxify, which dispatches the LoRA matmuls."""
    (x, y), _ = data
    opt = optax.adam(lr)
    state = opt.init(params)

    def loss(params, x, y):
        model = eqx.combine(params, static)
        f = quax.quaxify(loss_fn) if adapted else loss_fn
        return f(model, x, y)

    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    key = jr.key(1)
    with tqdm(range(steps), desc=desc) as bar:
        for i in bar:
            key, sub = jr.split(key)
            idx = jr.choice(sub, len(x), (256,), replace=False)
            params, state, value = step(params, state, x[idx], y[idx])
            losses.append(float(value))
            if i % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses


def main(steps: int, out: pathlib.Path):
    key_model, key_lora = jr.split(jr.key(0))
    model = eqx.nn.MLP(64, 10, width_size=128, depth=2, key=key_model)

    # 1. Pretrain on the digits as they are.
    original, mirrored = load(mirror=False), load(mirror=True)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params, _ = train(params, static, original, 2 * steps, 3e-3, "pretrain", False)
    model = eqx.combine(params, static)
    print(
        f"pretrained: accuracy {accuracy(model, *original[1]):.3f} on digits, "
        f"{accuracy(model, *mirrored[1]):.3f} on mirrored digits"
    )

    # 2. LoRA: every Linear's weight becomes a LoraArray; only its factors train.
    adapted = lora.loraify(model, rank=4, alpha=8.0, init="peft", key=key_lora)
    print(lora.summary(adapted))
    lora.print_trainable_parameters(adapted)
    params, frozen = lora.partition(adapted)
    params, losses = train(params, frozen, mirrored, steps, 3e-3, "LoRA fine-tune", True)
    adapted = eqx.combine(params, frozen)
    print(f"LoRA loss: first step {losses[0]:.3f} -> last step {losses[-1]:.3f}")

    # 3. Merge for export: plain eqx.nn.MLP again, same outputs.
    merged = lora.materialise(adapted)
    print(f"after LoRA: accuracy {accuracy(merged, *mirrored[1]):.3f} on mirrored digits")
    with jax.default_matmul_precision("highest"):  # a GPU's default, TF32, keeps ~3 digits
        same = jnp.allclose(
            quax.quaxify(lambda m, x: jax.vmap(m)(x))(adapted, mirrored[1][0]),
            jax.vmap(merged)(mirrored[1][0]),
            atol=1e-4,
        )
    print(f"merged model matches the adapted one: {bool(same)}")
    unchanged = all(
        bool(jnp.array_equal(a.weight._w, b.weight)) for a, b in zip(adapted.layers, model.layers)
    )
    print(f"pretrained weights bitwise unchanged: {unchanged}")

    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("LoRA fine-tuning on mirrored digits")
    fig.tight_layout()
    fig.savefig(out / "quickstart_loss.png", dpi=120)
    print(f"loss curve saved to {out / 'quickstart_loss.png'}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/out"))
    args = parser.parse_args()
    main(args.steps, args.out)
