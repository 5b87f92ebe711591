"""The structures of structures.py ported to Flax NNX with the same weights (Flax keeps a
kernel as (in, out), so Equinox's (out, in) weights are transposed in), for the `nnx`
(`nnx.LoRALinear`) and `qwix` (`qwix.apply_lora_to_model`) rows of benchmarks/matrix.py.

    model, x, loss = port(structure, lora_rank=8)   # every Linear an nnx.LoRALinear
    model, x, loss = port(structure)                # plain nnx.Linear, for qwix

`loss(model, x)` is the structure's loss, vmapped where the Equinox model is (the
modelvmap, attention and conv structures), so the port runs the same computation.
`x` is the structure's batch, channels last for conv (NNX's layout), so the step
does not transpose it. Flax NNX has no LoRA conv or embedding layer: with `lora_rank`,
conv raises `Unsupported`, and embedding adapts its head only.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from structures import cross_entropy, mean_square, next_tokens


class Unsupported(Exception):
    """The structure has no NNX LoRA equivalent."""


def _set(variable, value):
    variable.set_value(jnp.asarray(value))


class Port:
    """Builds NNX layers holding an Equinox layer's weights: an `nnx.LoRALinear` for
    every Linear when `lora_rank` is given, else an `nnx.Linear`."""

    def __init__(self, lora_rank, dtype):
        self.lora_rank, self.dtype = lora_rank, dtype
        self.rngs = nnx.Rngs(0)

    def linear(self, layer, stack=None):
        *_, out, fan_in = layer.weight.shape
        kw = dict(
            use_bias=layer.bias is not None,
            dtype=self.dtype,
            param_dtype=self.dtype,
            rngs=self.rngs,
        )
        if self.lora_rank is None:
            new = nnx.Linear(fan_in, out, **kw)
        else:
            new = nnx.LoRALinear(
                fan_in, out, lora_rank=self.lora_rank, lora_param_dtype=self.dtype, **kw
            )
        _set(new.kernel, jnp.swapaxes(layer.weight, -1, -2))
        if layer.bias is not None:
            _set(new.bias, layer.bias)
        if stack is not None and self.lora_rank is not None:  # scan: one adapter per block
            for v in (new.lora.lora_a, new.lora.lora_b):
                _set(v, jnp.broadcast_to(v[...], (stack, *v[...].shape)))
        return new

    def layer_norm(self, norm):
        new = nnx.LayerNorm(
            norm.shape[0],
            epsilon=norm.eps,
            dtype=self.dtype,
            param_dtype=self.dtype,
            rngs=self.rngs,
        )
        _set(new.scale, norm.weight)
        _set(new.bias, norm.bias)
        return new

    def rms_norm(self, norm):
        new = nnx.RMSNorm(
            norm.shape[0],
            epsilon=norm.eps,
            dtype=self.dtype,
            param_dtype=self.dtype,
            rngs=self.rngs,
        )
        _set(new.scale, norm.weight)
        return new


# ---------------------------------------------------------------------------- blocks


class Mlp(nnx.Module):
    def __init__(self, block, port, stack=None):
        self.up = port.linear(block.up, stack)
        self.down = port.linear(block.down, stack)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class Swiglu(nnx.Module):
    def __init__(self, block, port):
        self.norm = port.rms_norm(block.norm)
        self.gate = port.linear(block.gate)
        self.up = port.linear(block.up)
        self.down = port.linear(block.down)

    def __call__(self, x):
        n = self.norm(x)
        return x + self.down(jax.nn.silu(self.gate(n)) * self.up(n))


class Attention(nnx.Module):
    """Equinox's MultiheadAttention over one sequence (seq, d), with four Linears."""

    def __init__(self, attn, port):
        self.heads = attn.num_heads
        self.query = port.linear(attn.query_proj)
        self.key = port.linear(attn.key_proj)
        self.value = port.linear(attn.value_proj)
        self.output = port.linear(attn.output_proj)

    def __call__(self, x):
        seq, d = x.shape
        q, k, v = (f(x).reshape(seq, self.heads, -1) for f in (self.query, self.key, self.value))
        logits = jnp.einsum("shd,Shd->hsS", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
        weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(logits.dtype)
        return self.output(jnp.einsum("hsS,Shd->shd", weights, v).reshape(seq, d))


class AttentionBlock(nnx.Module):
    def __init__(self, block, port):
        self.ln1 = port.layer_norm(block.ln1)
        self.attn = Attention(block.attn, port)
        self.ln2 = port.layer_norm(block.ln2)
        self.mlp = Mlp(block.mlp, port)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return self.mlp(self.ln2(x))


class Sequential(nnx.Module):
    def __init__(self, blocks):
        self.blocks = nnx.List(blocks)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Scanned(nnx.Module):
    """One Mlp whose parameters are stacked on a leading axis, run with `jax.lax.scan`
    over its state (`nnx.split`, `nnx.merge` per block: `nnx.scan` over a module merged
    inside `jax.grad` fails with "Cannot extract graph node from different trace
    level")."""

    def __init__(self, blocks, port, layers):
        self.blocks = Mlp(blocks, port, stack=layers)

    def __call__(self, x):
        # The stacked parameters are scanned over; any other state (qwix keeps an
        # nnx.Rngs on every module while it builds) goes to each block whole.
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)

        def body(x, block_params):
            return nnx.merge(graphdef, block_params, rest)(x), None

        x, _ = jax.lax.scan(body, x, params)
        return x


class ConvNet(nnx.Module):
    """Residual 3×3 convolutions over one image (h, w, channels), mean-pooled into a
    Linear head."""

    def __init__(self, model, port):
        convs = []
        for conv in model.convs:
            out, cin, kh, kw = conv.weight.shape
            new = nnx.Conv(
                cin,
                out,
                (kh, kw),
                padding="SAME",
                dtype=port.dtype,
                param_dtype=port.dtype,
                rngs=port.rngs,
            )
            _set(new.kernel, conv.weight.transpose(2, 3, 1, 0))
            _set(new.bias, conv.bias.reshape(out))
            convs.append(new)
        self.convs = nnx.List(convs)
        self.head = port.linear(model.head)

    def __call__(self, x):
        for conv in self.convs:
            x = x + jax.nn.gelu(conv(x))
        return self.head(jnp.mean(x, axis=(0, 1)))


class EmbeddingHead(nnx.Module):
    def __init__(self, model, port):
        num, dim = model.embed.weight.shape
        self.embed = nnx.Embed(num, dim, dtype=port.dtype, param_dtype=port.dtype, rngs=port.rngs)
        _set(self.embed.embedding, model.embed.weight)
        self.head = port.linear(model.head)

    def __call__(self, tokens):
        return self.head(self.embed(tokens))


# ----------------------------------------------------------------------------- port


def vmapped(structure):
    """Whether the loss vmaps the model over the batch's leading axis (the model is
    written for one token, sequence or image)."""
    return structure.name.endswith("modelvmap") or structure.name in ("attention", "conv")


def port(structure, *, lora_rank=None):
    """`(model, x, loss)`: the NNX port of `structure` on its weights, its batch, and
    its loss `loss(model, x)`. With `lora_rank`, every Linear is an `nnx.LoRALinear` of
    that rank (the conv structure raises `Unsupported`)."""
    name, model, x = structure.name, structure.model, structure.x
    p = Port(lora_rank, x.dtype if name != "embedding" else model.head.weight.dtype)
    if name in ("mlp-bias", "mlp-nobias", "mlp-bias-modelvmap", "mlp-nobias-modelvmap"):
        new = Sequential([Mlp(b, p) for b in model.blocks])
    elif name == "swiglu":
        new = Sequential([Swiglu(b, p) for b in model.blocks])
    elif name == "attention":
        new = Sequential([AttentionBlock(b, p) for b in model.blocks])
    elif name == "scan":
        new = Scanned(model.blocks, p, structure.shapes["layers"])
    elif name == "conv":
        if lora_rank is not None:
            raise Unsupported("flax.nnx has no LoRA conv layer")
        new = ConvNet(model, p)
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC, once, outside the step
    else:
        new = EmbeddingHead(model, p)

        def loss(model, tokens):
            return cross_entropy(model(tokens), next_tokens(tokens))

        return new, x, loss

    if vmapped(structure):
        loss = lambda model, x: mean_square(jax.vmap(model)(x))  # noqa: E731
    else:
        loss = lambda model, x: mean_square(model(x))  # noqa: E731
    return new, x, loss
