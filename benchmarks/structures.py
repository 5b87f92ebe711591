"""Small Equinox models of the structures users write, for benchmarks and tests that run
one training step over each (benchmarks/matrix.py).

    from structures import build, SHAPES
    s = build("swiglu", **SHAPES["tiny"], dtype="float32", key=jr.key(0))
    s.loss(s.model, s.x)            # float32 scalar
    s.input_grad(s.model, s.x)      # the floor's work: forward + gradient wrt the input
    lora.loraify(s.model, rank=4, key=k, where=s.where("lora"))

Structures (`STRUCTURES`):

- `mlp-bias`, `mlp-nobias`: residual blocks `x + down(gelu(up(x)))`, each Linear
  vmapped over the tokens inside the block (`jax.vmap(self.up)(x)`); x is (tokens, d).
- `mlp-bias-modelvmap`, `mlp-nobias-modelvmap`: the same blocks written for one token,
  the whole model vmapped over the tokens once, in the loss (`jax.vmap(model)(x)`).
- `swiglu`: Llama's block, `x + down(silu(gate(n)) * up(n))` with `n = RMSNorm(x)`,
  Linears without bias.
- `attention`: pre-LN blocks `x + mha(ln(x))`, `x + mlp(ln(x))` with
  `eqx.nn.MultiheadAttention` (query/key/value/output Linears, no bias) and an MLP with
  bias; x is (tokens // seq, seq, d), the model vmapped over the sequences in the loss.
- `scan`: the `mlp-nobias` blocks made with `eqx.filter_vmap` over keys (each weight
  stacked on a leading `layers` axis) and run with `jax.lax.scan` over the stacked
  arrays (`eqx.partition(blocks, eqx.is_array)`).
- `conv`: `x + gelu(conv(x))` residual 3×3 `eqx.nn.Conv2d` layers at `d // 4` channels
  on `image`×`image` images (tokens // image² of them, so as many pixels as tokens),
  mean-pooled into a Linear head (channels → d); the model vmapped over the images in
  the loss.
- `embedding`: `eqx.nn.Embedding(hidden, d)` feeding a Linear head (d → hidden) over
  integer tokens, cross-entropy against the next token; `layers` is not used.

The loss is the mean of the squared output in float32, or for `embedding` the mean
cross-entropy in float32. Every contender of a benchmark trains on the same loss.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr


STRUCTURES = (
    "mlp-bias",
    "mlp-nobias",
    "mlp-bias-modelvmap",
    "mlp-nobias-modelvmap",
    "swiglu",
    "attention",
    "scan",
    "conv",
    "embedding",
)
# `seq`: the attention structure's sequence length (tokens // seq sequences); `image`:
# the conv structure's image side (tokens // image² images).
SHAPES = {
    "tiny": dict(layers=2, d=32, hidden=64, tokens=32, heads=2, seq=16, image=4),
    "cpu": dict(layers=4, d=512, hidden=2048, tokens=512, heads=8, seq=128, image=16),
    "gpu": dict(layers=8, d=2048, hidden=8192, tokens=8192, heads=16, seq=1024, image=16),
}
DTYPES = ("float32", "bfloat16")
ALL_LAYERS = lambda name, layer: True  # noqa: E731  (loraify's `where`: every kind)


@dataclasses.dataclass(frozen=True)
class Structure:
    """A built structure.

    - `name`: one of `STRUCTURES`.
    - `model`: the plain Equinox model.
    - `x`: an input batch (integer tokens for `embedding`).
    - `loss`: `loss(model, x)`, a float32 scalar; the model may be a LoRA'd copy called
      under `quax.quaxify`.
    - `input_grad`: `input_grad(model, x)`, the floor's work: the forward pass and the
      gradient wrt the input (for `embedding`, wrt the looked-up rows, since the
      tokens are integers).
    - `kinds`: the layer kinds in the model that an adapter may target (`"linear"`,
      `"conv"`, `"embedding"`).
    - `shapes`: the keyword arguments it was built with.
    """

    name: str
    model: Any
    x: jax.Array
    loss: Callable
    input_grad: Callable
    kinds: tuple[str, ...]
    shapes: dict

    def where(self, method: str = "lora"):
        """loraify's `where` for this structure and `method`: every Linear (`None`,
        loraify's default), and every Conv and Embedding where the structure has them
        and `method` adapts them (LoRA all three; DoRA, LoKr, LoHa Linear and Conv).
        An Embedding left out here is adapted with LoRA by `embedding_where`."""
        if self.kinds == ("linear",):
            return None
        if method == "lora" or "embedding" not in self.kinds:
            return ALL_LAYERS
        return lambda name, layer: not isinstance(layer, eqx.nn.Embedding)

    def embedding_where(self, method: str = "lora"):
        """`where` for a second, `method="lora"` loraify call that adapts the Embedding
        a method other than LoRA cannot, or `None` when there is nothing left."""
        if "embedding" not in self.kinds or method == "lora":
            return None
        return lambda name, layer: isinstance(layer, eqx.nn.Embedding)


# ---------------------------------------------------------------------------- losses


def mean_square(y):
    return jnp.mean(jnp.square(y.astype(jnp.float32)))


def cross_entropy(logits, labels):
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def next_tokens(tokens):
    """The labels of the embedding structure: each token's successor (wrapping)."""
    return jnp.roll(tokens, -1)


# ---------------------------------------------------------------------------- blocks


class MlpBlock(eqx.Module):
    """`x + down(gelu(up(x)))` over (tokens, d), each Linear vmapped over the tokens."""

    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, d, hidden, *, bias, dtype, key):
        k1, k2 = jr.split(key)
        self.up = eqx.nn.Linear(d, hidden, use_bias=bias, dtype=dtype, key=k1)
        self.down = eqx.nn.Linear(hidden, d, use_bias=bias, dtype=dtype, key=k2)

    def __call__(self, x):
        return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(x)))


class TokenMlpBlock(MlpBlock):
    """The same block written for one token, x of shape (d,)."""

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class SwigluBlock(eqx.Module):
    norm: eqx.nn.RMSNorm
    gate: eqx.nn.Linear
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, d, hidden, *, dtype, key):
        k1, k2, k3 = jr.split(key, 3)
        self.norm = eqx.nn.RMSNorm(d, use_bias=False, dtype=dtype)
        self.gate = eqx.nn.Linear(d, hidden, use_bias=False, dtype=dtype, key=k1)
        self.up = eqx.nn.Linear(d, hidden, use_bias=False, dtype=dtype, key=k2)
        self.down = eqx.nn.Linear(hidden, d, use_bias=False, dtype=dtype, key=k3)

    def __call__(self, x):
        n = jax.vmap(self.norm)(x)
        h = jax.nn.silu(jax.vmap(self.gate)(n)) * jax.vmap(self.up)(n)
        return x + jax.vmap(self.down)(h)


class AttentionBlock(eqx.Module):
    """Pre-LN: `x + mha(ln1(x))`, then `x + mlp(ln2(x))`, over one sequence (seq, d)."""

    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: MlpBlock

    def __init__(self, d, hidden, heads, *, dtype, key):
        k1, k2 = jr.split(key)
        self.ln1 = eqx.nn.LayerNorm(d, dtype=dtype)
        self.attn = eqx.nn.MultiheadAttention(heads, d, inference=True, dtype=dtype, key=k1)
        self.ln2 = eqx.nn.LayerNorm(d, dtype=dtype)
        self.mlp = MlpBlock(d, hidden, bias=True, dtype=dtype, key=k2)

    def __call__(self, x):
        n = jax.vmap(self.ln1)(x)
        x = x + self.attn(n, n, n)
        return self.mlp(jax.vmap(self.ln2)(x))  # the MLP block adds its own residual


class Sequential(eqx.Module):
    """Blocks applied in order."""

    blocks: list

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Scanned(eqx.Module):
    """One block's arrays stacked on a leading axis, run with `jax.lax.scan`."""

    blocks: MlpBlock  # each array with a leading `layers` axis

    def __call__(self, x):
        arrays, static = eqx.partition(self.blocks, eqx.is_array)

        def body(x, block_arrays):
            return eqx.combine(block_arrays, static)(x), None

        x, _ = jax.lax.scan(body, x, arrays)
        return x


class ConvNet(eqx.Module):
    """Residual 3×3 convolutions over one image (channels, h, w), mean-pooled into a
    Linear head."""

    convs: list
    head: eqx.nn.Linear

    def __init__(self, channels, d, layers, *, dtype, key):
        keys = jr.split(key, layers + 1)
        self.convs = [
            eqx.nn.Conv2d(channels, channels, 3, padding=1, dtype=dtype, key=k) for k in keys[:-1]
        ]
        self.head = eqx.nn.Linear(channels, d, dtype=dtype, key=keys[-1])

    def __call__(self, x):
        for conv in self.convs:
            x = x + jax.nn.gelu(conv(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


class EmbeddingHead(eqx.Module):
    """Token ids (tokens,) → embedding rows → Linear head → logits (tokens, vocab)."""

    embed: eqx.nn.Embedding
    head: eqx.nn.Linear

    def __init__(self, vocab, d, *, dtype, key):
        k1, k2 = jr.split(key)
        self.embed = eqx.nn.Embedding(vocab, d, dtype=dtype, key=k1)
        self.head = eqx.nn.Linear(d, vocab, use_bias=False, dtype=dtype, key=k2)

    def __call__(self, tokens):
        return self.logits(jax.vmap(self.embed)(tokens))

    def logits(self, rows):
        return jax.vmap(self.head)(rows)


# ---------------------------------------------------------------------------- build


def build(
    name: str,
    *,
    d: int,
    hidden: int,
    tokens: int,
    layers: int,
    heads: int = 8,
    seq: int = 128,
    image: int = 16,
    dtype: str = "float32",
    key,
) -> Structure:
    """The plain Equinox model of structure `name` and an input batch.

    **Arguments:**

    - `name`: one of `STRUCTURES`.
    - `d`, `hidden`: the model width and the MLP's hidden width (the vocabulary of
      `embedding`).
    - `tokens`: tokens in the batch (pixels for `conv`).
    - `layers`: blocks (conv layers for `conv`).
    - `heads`, `seq`: the attention structure's heads and sequence length.
    - `image`: the conv structure's image side (tokens // image² images).
    - `dtype`: `"float32"` or `"bfloat16"`, for every weight and the input.
    - `key`: randomness for the weights and the input.

    **Returns:**

    A `Structure`.
    """
    if name not in STRUCTURES:
        raise ValueError(f"`name` must be one of {', '.join(STRUCTURES)}; got {name!r}.")
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    shapes = dict(
        d=d, hidden=hidden, tokens=tokens, layers=layers, heads=heads, seq=seq, image=image
    )
    dt = jnp.dtype(dtype)
    kmodel, kx = jr.split(key)
    keys = jr.split(kmodel, layers)
    x = jr.normal(kx, (tokens, d), dt)
    kinds = ("linear",)
    vmapped = False  # the loss vmaps the model over x's leading axis

    if name in ("mlp-bias", "mlp-nobias"):
        bias = name == "mlp-bias"
        model = Sequential([MlpBlock(d, hidden, bias=bias, dtype=dt, key=k) for k in keys])
    elif name in ("mlp-bias-modelvmap", "mlp-nobias-modelvmap"):
        bias = name.startswith("mlp-bias")
        model = Sequential([TokenMlpBlock(d, hidden, bias=bias, dtype=dt, key=k) for k in keys])
        vmapped = True
    elif name == "swiglu":
        model = Sequential([SwigluBlock(d, hidden, dtype=dt, key=k) for k in keys])
    elif name == "attention":
        if tokens % seq or d % heads:
            raise ValueError(
                f"`tokens` ({tokens}) must be a multiple of `seq` ({seq}) and `d` ({d}) "
                f"of `heads` ({heads})."
            )
        model = Sequential([AttentionBlock(d, hidden, heads, dtype=dt, key=k) for k in keys])
        x = x.reshape(tokens // seq, seq, d)
        vmapped = True
    elif name == "scan":
        make = lambda k: MlpBlock(d, hidden, bias=False, dtype=dt, key=k)
        model = Scanned(eqx.filter_vmap(make)(keys))
    elif name == "conv":
        channels, pixels = d // 4, image * image
        if tokens % pixels or channels < 1:
            raise ValueError(
                f"conv: `tokens` ({tokens}) must be a multiple of {pixels} and `d` ({d}) at "
                "least 4."
            )
        model = ConvNet(channels, d, layers, dtype=dt, key=kmodel)
        x = jr.normal(kx, (tokens // pixels, channels, image, image), dt)
        kinds = ("linear", "conv")
        vmapped = True
    else:  # embedding
        model = EmbeddingHead(hidden, d, dtype=dt, key=kmodel)
        x = jr.randint(kx, (tokens,), 0, hidden)
        kinds = ("linear", "embedding")

        def loss(model, x):
            return cross_entropy(model(x), next_tokens(x))

        def input_grad(model, x):
            rows = jax.vmap(model.embed)(x)
            return jax.grad(lambda r: cross_entropy(model.logits(r), next_tokens(x)))(rows)

        return Structure(name, model, x, loss, input_grad, kinds, shapes)

    if vmapped:
        loss = lambda model, x: mean_square(jax.vmap(model)(x))  # noqa: E731
    else:
        loss = lambda model, x: mean_square(model(x))  # noqa: E731
    input_grad = jax.grad(loss, argnums=1)
    return Structure(name, model, x, loss, input_grad, kinds, shapes)
