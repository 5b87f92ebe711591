"""A character-level transformer, pretrained on Python's help texts and adapted with
LoRA, DoRA and LoKr to the Zen of Python.

Both texts ship with Python: `pydoc_data.topics` (the `help()` pages) and the `this`
module (`import this`). The script

1. pretrains a two-block transformer (`eqx.nn.MultiheadAttention`) on the help texts;
2. adapts it to the Zen three times, with LoRA, DoRA and LoKr (`loraify(method=...)`),
   training only the adapters of the attention and MLP layers;
3. plots the loss curves to `examples/out/char_transformer.png` and prints samples;
4. saves the LoRA adapter with `save_adapter`, reloads it, merges it with `materialise`
   and exports it in PEFT's format with `save_peft`.

    python examples/char_transformer.py            # a few minutes on a laptop CPU
    python examples/char_transformer.py --quick    # a few seconds: a smoke test
"""

import argparse
import codecs
import contextlib
import io
import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib


matplotlib.use("Agg")
from pydoc_data.topics import topics  # noqa: E402


with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
    import this  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import quax  # noqa: E402
from tqdm import tqdm  # noqa: E402


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import lora_jax as lora  # noqa: E402


OUT = os.path.join(os.path.dirname(__file__), "out")
CONTEXT = 64
# The adapter methods to compare: `loraify(model, rank=..., key=..., **options)`. LoKr
# takes PEFT's LoKrConfig options under their own names; with `alpha=None` its scaling
# is 1 (PEFT's `alpha == r`). Its update `w1 ⊗ w2` starts at zero (`init_weights=True`:
# `w1 = 0`), and it has far fewer parameters, so it gets a larger learning rate.
METHODS = {
    "LoRA": dict(method="lora", lr=3e-3),
    "DoRA": dict(method="dora", lr=3e-3),
    "LoKr": dict(
        method="lokr",
        decompose_both=False,
        decompose_factor=-1,
        init_weights=True,
        rank_dropout=0.0,
        module_dropout=0.0,
        lr=1e-2,
    ),
}
# The layers to adapt: the attention projections and the MLP of every block.
WHERE = ["query_proj", "key_proj", "value_proj", "output_proj", "up", "down"]

# --------------------------------------------------------------------------------------
# Data: characters as integers, shared vocabulary (printable ASCII).
# --------------------------------------------------------------------------------------

VOCAB = [chr(i) for i in range(32, 127)] + ["\n"]
INDEX = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> np.ndarray:
    return np.array([INDEX.get(c, INDEX["?"]) for c in text], np.int32)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def batches(data: np.ndarray, batch: int, seed: int):
    """Random windows: inputs `data[i:i+CONTEXT]`, targets shifted by one."""
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, len(data) - CONTEXT - 1, batch)
        x = np.stack([data[s : s + CONTEXT] for s in start])
        y = np.stack([data[s + 1 : s + CONTEXT + 1] for s in start])
        yield jnp.asarray(x), jnp.asarray(y)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, dim, heads, key):
        k1, k2, k3 = jr.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(dim)
        self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k1)
        self.norm2 = eqx.nn.LayerNorm(dim)
        self.up = eqx.nn.Linear(dim, 4 * dim, key=k2)
        self.down = eqx.nn.Linear(4 * dim, dim, key=k3)

    def __call__(self, x):  # x: (seq, dim)
        causal = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h, mask=causal)
        h = jax.vmap(self.norm2)(x)
        return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))


class CharTransformer(eqx.Module):
    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: list[Block]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, dim=64, heads=4, depth=2, *, key):
        keys = jr.split(key, depth + 3)
        self.embed = eqx.nn.Embedding(len(VOCAB), dim, key=keys[0])
        self.pos = 0.02 * jr.normal(keys[1], (CONTEXT, dim))
        self.blocks = [Block(dim, heads, k) for k in keys[2:-1]]
        self.norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, len(VOCAB), key=keys[-1])

    def __call__(self, ids):  # ids: (seq,) -> logits (seq, vocab)
        x = jax.vmap(self.embed)(ids) + self.pos[: ids.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model, mask, data, steps, lr, desc):
    """AdamW on the leaves where `mask` is True. Returns the model and its losses."""
    params, frozen = eqx.partition(model, mask)
    optim = optax.adamw(lr)
    opt_state = optim.init(params)

    @eqx.filter_jit
    def step(params, opt_state, x, y):
        # quaxify inside grad, around the recombined model (docs: freezing page).
        value, grads = jax.value_and_grad(
            lambda p: quax.quaxify(loss_fn)(eqx.combine(p, frozen), x, y)
        )(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _, (x, y) in zip(bar := tqdm(range(steps), desc=desc, leave=False), data):
        params, opt_state, value = step(params, opt_state, x, y)
        losses.append(float(value))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return eqx.combine(params, frozen), losses


@eqx.filter_jit
def next_logits(model, window, length):
    # The window is padded to CONTEXT so that one compilation serves every length; the
    # attention is causal, so the padding never reaches position `length - 1`.
    return quax.quaxify(model)(window)[length - 1]


def sample(model, prompt: str, n: int, key) -> str:
    """Samples `n` characters after `prompt` (temperature 0.8)."""
    ids = list(encode(prompt))
    for i in range(n):
        window = ids[-CONTEXT:]
        padded = jnp.asarray(window + [0] * (CONTEXT - len(window)))
        logits = next_logits(model, padded, jnp.asarray(len(window)))
        ids.append(int(jr.categorical(jr.fold_in(key, i), logits / 0.8)))
    return decode(ids)


@eqx.filter_jit
def eval_loss(model, x, y):
    return quax.quaxify(loss_fn)(model, x, y)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="pretraining steps")
    p.add_argument("--adapt-steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="a few steps: a smoke test")
    args = p.parse_args()
    steps, adapt_steps = (5, 5) if args.quick else (args.steps, args.adapt_steps)
    n_sample = 20 if args.quick else 150

    help_text = encode("\n".join(topics[k] for k in sorted(topics)))
    zen = encode(codecs.decode(this.s, "rot13"))
    print(
        f"pretraining text: {len(help_text):,} characters of help(); "
        f"adaptation text: the Zen of Python, {len(zen):,} characters"
    )
    zen_eval = next(batches(zen, 256, seed=123))

    k_model, k_lora, k_sample = jr.split(jr.key(0), 3)
    model = CharTransformer(key=k_model)
    model, pre_losses = train(
        model, eqx.is_inexact_array, batches(help_text, 32, 0), steps, 3e-3, "pretrain"
    )
    print(f"pretrained: loss on the Zen {float(eval_loss(model, *zen_eval)):.3f}")
    print("sample before adapting:\n" + sample(model, "Beautiful is", n_sample, k_sample))

    curves, adapted = {}, {}
    for name, options in METHODS.items():
        options = dict(options)
        lr = options.pop("lr")
        m = lora.loraify(model, rank=args.rank, key=k_lora, where=WHERE, **options)
        print(f"{name}: ", end="")
        lora.print_trainable_parameters(m)
        m, curves[name] = train(
            m, lora.trainable_mask(m), batches(zen, 32, 1), adapt_steps, lr, name
        )
        adapted[name] = m
        print(f"{name}: loss on the Zen {float(eval_loss(m, *zen_eval)):.3f}")
        print(f"sample after {name}:\n" + sample(m, "Beautiful is", n_sample, k_sample))

    # The adapter on its own: a small file, reloaded into a freshly adapted model.
    tuned = adapted["LoRA"]
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "zen_adapter.safetensors")
    lora.save_adapter(path, tuned)
    fresh = lora.loraify(model, rank=args.rank, key=jr.key(1), where=WHERE)
    reloaded = lora.load_adapter(path, fresh)
    merged = lora.materialise(reloaded)  # plain arrays again: no quax needed to run it
    x = zen_eval[0][0]
    # Full float32 products for the comparison: a GPU's default (TF32) keeps ~3 digits.
    with jax.default_matmul_precision("highest"):
        assert jnp.allclose(merged(x), quax.quaxify(tuned)(x), atol=1e-4)
    print(f"saved {path} ({os.path.getsize(path):,} bytes); reloaded and merged: same logits")
    peft_dir = os.path.join(OUT, "zen_adapter_peft")
    lora.save_peft(peft_dir, tuned)
    print(f"PEFT format: {peft_dir}/ {sorted(os.listdir(peft_dir))}")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(pre_losses)
    ax1.set_title("pretraining on help() texts")
    for name, losses in curves.items():
        ax2.plot(losses, label=name)
    ax2.set_title("adapting to the Zen of Python")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy")
    fig.tight_layout()
    path = os.path.join(OUT, "char_transformer.png")
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
