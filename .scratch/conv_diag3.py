import sys
B, W, S = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.argv = [sys.argv[0], str(B), str(W), str(S)]
exec(open(".scratch/conv_diag.py").read().split("cases = {")[0])

def merged_fn(rank=8):
    """The same LoRA step with each kernel formed as w + s·Δ inside the loss (plain JAX)."""
    model = lora.loraify(net, rank=rank, key=jr.key(3), where=lambda n, l: isinstance(l, eqx.nn.Conv), init="peft")
    params, frozen = lora.partition(model)
    opt = optax.adam(1e-3); state = opt.init(params)
    def loss_fn(p, x):
        m = eqx.combine(p, frozen)
        m = jax.tree.map(lambda v: v.w + v.delta() if lora.is_adapter(v) else v, m, is_leaf=lora.is_adapter)
        y = jax.vmap(m)(x)
        return jnp.mean((y - target) ** 2)
    def step(carry, _):
        p, s, x = carry
        g = jax.grad(loss_fn)(p, x)
        u, s = opt.update(g, s, p)
        return (eqx.apply_updates(p, u), s, x), None
    return jax.jit(lambda p, s, x: jax.lax.scan(step, (p, s, x), None, length=STEPS)[0]), (params, state, x)

cases = {"floor": floor_fn(), "full-ft": full_fn(), "lora r8": run("lora", 8, init="peft"),
         "merged r8": merged_fn(8), "merged r32": merged_fn(32)}
res = {}
for name, (f, args) in cases.items():
    res[name] = bench(f, args)
    print(f"{W}ch b{B}: {name:10s} {res[name]:7.3f} ms/step  x{res[name]/res['floor']:.3f}", flush=True)
