"""GPU diagnosis of the conv LoRA step: timing inside one jit (fori_loop of steps),
so that Python dispatch does not count, and the compiled HLO's transposes/copies."""
import sys, time, pathlib, re
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import equinox as eqx, jax, jax.numpy as jnp, jax.random as jr, numpy as np, optax, quax
import lora_jax as lora
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from conv_step import Net

B, W, S, STEPS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 20
net = Net(W, 4, jr.key(0))
x = jr.normal(jr.key(1), (B, W, S, S))
target = jr.normal(jr.key(2), x.shape)

def run(method, rank, **opts):
    model = lora.loraify(net, rank=rank, key=jr.key(3), where=lambda n, l: isinstance(l, eqx.nn.Conv), method=method, **opts)
    params, frozen = lora.partition(model)
    opt = optax.adam(1e-3)
    state = opt.init(params)
    def loss_fn(p, x):
        y = quax.quaxify(lambda m, x: jax.vmap(m)(x))(eqx.combine(p, frozen), x)
        return jnp.mean((y - target) ** 2)
    def step(carry, _):
        p, s, x = carry
        g = jax.grad(loss_fn)(p, x)
        u, s = opt.update(g, s, p)
        return (eqx.apply_updates(p, u), s, x), None
    f = jax.jit(lambda p, s, x: jax.lax.scan(step, (p, s, x), None, length=STEPS)[0])
    return f, (params, state, x)

def floor_fn():
    def body(x, _):
        y, vjp = jax.vjp(lambda x: jax.vmap(net)(x), x)
        (dx,) = vjp(2 * (y - target) / y.size)
        return x + 1e-9 * dx, None
    return jax.jit(lambda x: jax.lax.scan(body, x, None, length=STEPS)[0]), (x,)

def full_fn():
    params, frozen = eqx.partition(net, eqx.is_inexact_array)
    opt = optax.adam(1e-3); state = opt.init(params)
    def loss_fn(p, x):
        y = jax.vmap(eqx.combine(p, frozen))(x)
        return jnp.mean((y - target) ** 2)
    def step(carry, _):
        p, s, x = carry
        g = jax.grad(loss_fn)(p, x)
        u, s = opt.update(g, s, p)
        return (eqx.apply_updates(p, u), s, x), None
    return jax.jit(lambda p, s, x: jax.lax.scan(step, (p, s, x), None, length=STEPS)[0]), (params, state, x)

def bench(f, args, n=7):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return np.median(ts) / STEPS * 1e3

def hlo_stats(f, args):
    txt = f.lower(*args).compile().as_text()
    convs = re.findall(r"custom_call_target=\"__cudnn\$conv\w*\"", txt)
    return dict(transpose=len(re.findall(r"= \S+ transpose\(", txt)), copy=len(re.findall(r"= \S+ copy\(", txt)), cudnn_convs=len(convs), convolution=len(re.findall(r" convolution\(", txt)))

cases = {"floor": floor_fn(), "full-ft": full_fn(),
         "lora r8": run("lora", 8, init="peft"), "lora r32": run("lora", 32, init="peft"),
         "dora r8": run("dora", 8, init="peft"), "loha r4": run("loha", 4), "lokr r8": run("lokr", 8),
         "lokr r2": run("lokr", 2)}
res = {}
for name, (f, args) in cases.items():
    res[name] = bench(f, args)
    print(f"{name:10s} {res[name]:7.3f} ms/step  x{res[name]/res['floor']:.3f}  {hlo_stats(f, args)}", flush=True)
