"""The structures of structures.py written by hand in plain JAX: pure functions over a
params dict, each adapted matmul written as `x @ w.T + s * (x @ b.T) @ a.T`. The
reference a LoRA library's step is held to: what plain JAX takes to do the same LoRA
step (benchmarks/matrix.py's `handwritten` row).

    frozen, adapters = split(structure.model, rank=8, key=k)
    loss(structure.name, frozen, adapters, structure.x, scale=2.0)

`frozen` mirrors the model as nested dicts and lists of arrays (a Linear is
`{"w", "bias"}`, a norm `{"weight", "bias"}`); `adapters` holds `{"a", "b"}` at the
same place for every Linear, Conv and Embedding (lora_jax's layouts: a Linear's `a` is
(out, rank) and `b` (rank, in); a Conv's `b` is a conv kernel (rank, in, kh, kw) and
`a` (out, rank), PEFT's form; an Embedding's `a` is (num, rank) and `b` (rank, dim)),
stacked on a leading axis where the weight is (the scan structure's blocks).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from structures import cross_entropy, mean_square, next_tokens


def split(model, *, rank, key):
    """`(frozen, adapters)`: the model's arrays as nested dicts, and fresh factors for
    each of its Linear, Conv and Embedding layers (`a` small, `b` of unit scale, so no
    factor is zero)."""
    counter = iter(jr.split(key, 4096))

    def factors(a_shape, b_shape, dtype, fan_in):
        ka, kb = jr.split(next(counter))
        a = 0.01 * jr.normal(ka, a_shape, dtype)
        b = jr.normal(kb, b_shape, dtype) / jnp.sqrt(fan_in).astype(dtype)
        return {"a": a, "b": b}

    def walk(node):
        if isinstance(node, eqx.nn.Linear):
            w = node.weight
            *stack, out, fan_in = w.shape
            p = {"w": w} | ({} if node.bias is None else {"bias": node.bias})
            return p, factors((*stack, out, rank), (*stack, rank, fan_in), w.dtype, fan_in)
        if isinstance(node, eqx.nn.Conv):
            w = node.weight
            out, cin, *kernel = w.shape
            p = {"w": w} | ({} if node.bias is None else {"bias": node.bias})
            fan_in = cin * int(jnp.prod(jnp.array(kernel)))
            return p, factors((out, rank), (rank, cin, *kernel), w.dtype, fan_in)
        if isinstance(node, eqx.nn.Embedding):
            w = node.weight
            num, dim = w.shape
            return {"w": w}, factors((num, rank), (rank, dim), w.dtype, rank)
        if isinstance(node, (eqx.nn.LayerNorm, eqx.nn.RMSNorm)):
            p = {"weight": node.weight}
            return p | ({} if node.bias is None else {"bias": node.bias}), None
        if isinstance(node, list):
            pairs = [walk(n) for n in node]
            return [p for p, _ in pairs], [a for _, a in pairs]
        if isinstance(node, eqx.Module):
            fields = {}
            for name in type(node).__dataclass_fields__:
                value = getattr(node, name)
                if isinstance(value, (eqx.Module, list)):
                    fields[name] = walk(value)
            return {k: p for k, (p, _) in fields.items()}, {k: a for k, (_, a) in fields.items()}
        raise TypeError(f"handwritten.split: no rule for a {type(node).__name__}.")

    return walk(model)


# --------------------------------------------------------------------------- layers


def linear(p, ad, x, s):
    """`x @ w.T + s·(x @ b.T) @ a.T + bias`, x of shape (..., in)."""
    y = x @ p["w"].T
    if ad is not None:
        y = y + s * ((x @ ad["b"].T) @ ad["a"].T)
    if "bias" in p:
        y = y + p["bias"]
    return y


def conv(p, ad, x, s):
    """A 3×3 'same' conv of one image (c, h, w), and its LoRA: the `b` conv, then `a`
    as a 1×1 conv (an einsum over the rank)."""

    def run(x, w):
        return jax.lax.conv_general_dilated(x[None], w, (1, 1), ((1, 1), (1, 1)))[0]

    y = run(x, p["w"])
    if ad is not None:
        y = y + s * jnp.einsum("or,rhw->ohw", ad["a"], run(x, ad["b"]))
    if "bias" in p:
        y = y + p["bias"]  # Equinox keeps a conv's bias as (out, 1, 1)
    return y


def embed(p, ad, tokens, s):
    rows = p["w"][tokens]
    if ad is not None:
        rows = rows + s * (ad["a"][tokens] @ ad["b"])
    return rows


def layer_norm(p, x, eps=1e-5):
    """Equinox's LayerNorm over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.var(xf, axis=-1, keepdims=True)
    out = (xf - mean) * jax.lax.rsqrt(var + eps) * p["weight"].astype(jnp.float32)
    return (out + p["bias"].astype(jnp.float32)).astype(x.dtype)


def rms_norm(p, x, eps=1e-5):
    """Equinox's RMSNorm over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    out = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (out * p["weight"].astype(jnp.float32)).astype(x.dtype)


def mlp(p, ad, x, s):
    return x + linear(p["down"], ad["down"], jax.nn.gelu(linear(p["up"], ad["up"], x, s)), s)


def swiglu(p, ad, x, s):
    n = rms_norm(p["norm"], x)
    h = jax.nn.silu(linear(p["gate"], ad["gate"], n, s)) * linear(p["up"], ad["up"], n, s)
    return x + linear(p["down"], ad["down"], h, s)


def attention(p, ad, x, s, heads):
    """Equinox's MultiheadAttention over one sequence (seq, d)."""
    seq, d = x.shape
    proj = lambda name, x: linear(p[name], ad[name], x, s).reshape(seq, heads, -1)
    q, k, v = proj("query_proj", x), proj("key_proj", x), proj("value_proj", x)
    logits = jnp.einsum("shd,Shd->hsS", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
    weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(logits.dtype)
    o = jnp.einsum("hsS,Shd->shd", weights, v).reshape(seq, d)
    return linear(p["output_proj"], ad["output_proj"], o, s)


def attention_block(p, ad, x, s, heads):
    n = layer_norm(p["ln1"], x)
    x = x + attention(p["attn"], ad["attn"], n, s, heads)
    return mlp(p["mlp"], ad["mlp"], layer_norm(p["ln2"], x), s)


# ----------------------------------------------------------------------------- loss


def loss(structure, frozen, adapters, x, *, scale):
    """The structure's loss (structures.py's, on the same batch), computed from
    `frozen` and `adapters` as split by `split`."""
    name, s = structure.name, scale
    heads = structure.shapes["heads"]
    if name == "embedding":
        rows = embed(frozen["embed"], adapters["embed"], x, s)
        logits = linear(frozen["head"], adapters["head"], rows, s)
        return cross_entropy(logits, next_tokens(x))
    if name == "scan":

        def body(x, pa):
            return mlp(*pa, x, s), None

        y, _ = jax.lax.scan(body, x, (frozen["blocks"], adapters["blocks"]))
        return mean_square(y)
    if name == "conv":

        def one(image):
            for p, ad in zip(frozen["convs"], adapters["convs"]):
                image = image + jax.nn.gelu(conv(p, ad, image, s))
            return linear(frozen["head"], adapters["head"], jnp.mean(image, axis=(1, 2)), s)

        return mean_square(jax.vmap(one)(x))
    block = {
        "mlp-bias": mlp,
        "mlp-nobias": mlp,
        "mlp-bias-modelvmap": mlp,
        "mlp-nobias-modelvmap": mlp,
        "swiglu": swiglu,
        "attention": lambda p, ad, x, s: attention_block(p, ad, x, s, heads),
    }[name]

    def model(x):
        for p, ad in zip(frozen["blocks"], adapters["blocks"]):
            x = block(p, ad, x, s)
        return x

    if name.endswith("modelvmap") or name == "attention":
        return mean_square(jax.vmap(model)(x))
    return mean_square(model(x))
