"""What to keep for the backward pass when a block is rematerialised.

A LoRA step needs, for the factors' gradients, the inputs of every adapted layer (`b`'s
gradient is `(aᵀ·dy)ᵀ·x`), which the plain model's backward pass never needs: in a
transformer or MLP block those inputs are activations (`gelu(u)` before a down
projection, say), and plain JAX keeps them all. Under `jax.checkpoint` with
`remat_policy`, only the adapted layers' outputs and the thin rank-sized products are
kept; everything elementwise between them (activations, norms, residual sums) is
recomputed from those in the backward pass, which costs one cheap elementwise pass.
"""

import jax


# Names the rules give their results with `jax.ad_checkpoint.checkpoint_name`.
OUTPUT_NAME = "lora_jax.output"  # an adapted product (full size)
THIN_NAME = "lora_jax.thin"  # the rank-sized intermediate `b·x`


_save_named = jax.checkpoint_policies.save_only_these_names(OUTPUT_NAME, THIN_NAME)


def remat_policy(prim, *args, **params) -> bool:
    """A `jax.checkpoint` policy for adapted models: keep the adapted layers' outputs
    and their thin `b·x` products, recompute the rest.

    Checkpoint each block (not the whole model), so that the backward pass recomputes the
    block's elementwise work from the saved products instead of storing every activation.
    Pass the block as an argument of the checkpointed function rather than closing over it
    (JAX caches a checkpointed function's trace together with what it closes over):

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora

        blocks = [eqx.nn.MLP(16, 16, 64, 1, key=jr.key(i)) for i in range(3)]
        blocks = lora.loraify(blocks, rank=2, key=jr.key(3))
        params, frozen = lora.partition(blocks)

        def apply(block, x):  # the block is an argument, not a closed-over constant
            return jax.vmap(block)(x)

        checkpointed = eqx.filter_checkpoint(apply, policy=lora.remat_policy)

        def loss(params, x, remat):
            for block in eqx.combine(params, frozen):
                x = quax.quaxify(checkpointed if remat else apply)(block, x)
            return jnp.mean(x**2)

        x = jr.normal(jr.key(4), (8, 16))
        g = jax.grad(loss)(params, x, True)  # the same gradients, less memory
        g_plain = jax.grad(loss)(params, x, False)
        assert all(
            jnp.allclose(a, b, atol=1e-6)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain))
        )
        ```

    On the GPU benchmark shapes (8 blocks 2048→8192→2048, 8192 tokens, bfloat16, an H100)
    this takes a LoRA step's memory from 1.75× the floor's to 0.77× of it, at about the
    same time (1.27× the floor against 1.26×; `benchmarks/results/step_h100.md`). On a
    CPU, where XLA already fuses the elementwise work into its consumers, it saves
    nothing and costs time: use it on accelerators. Plain layers inside the block are
    recomputed in the backward pass (their products are not named), and DoRA layers keep
    their product both before and after the magnitudes.
    """
    return _save_named(prim, *args, **params)
