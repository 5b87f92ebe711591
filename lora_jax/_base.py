"""The abstract adapter value that every method (LoRA, DoRA, LoKr, LoHa, ...) extends."""

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import quax
from jaxtyping import Array, Shaped


_REFUSE = (
    "Refusing to materialise `{}` with `allow_materialise=False`: an operation with no "
    "rule for adapters (one that is not a product, a transpose or a cast) met it. "
    "Build the adapter with `allow_materialise=True` to let such operations form "
    "`w + Δ` densely."
)
_OUTSIDE = (
    "A `{}` was used outside `quax.quaxify`: call the model through it, "
    "`quax.quaxify(model)(x)`, so that the adapter's rules compute the product."
)


class AbstractAdapter(quax.ArrayValue):
    """An array that behaves as `w + Δ` for a frozen weight `w` and a trainable update
    `Δ` held in factored form.

    Subclasses store their factors as fields and implement `delta()` (the dense update,
    used only for merging and for the materialise fallback) plus whatever quax rules
    compute with the factors directly.

    The class attribute `trainable_fields` names the fields an optimiser trains;
    `frozen_fields` names the fields holding the (frozen) base weight. Every other array
    leaf (the scaling, for example) is a hyperparameter: never trained, never counted as
    a parameter.

    !!! Example

        A new method in a few lines: a trainable diagonal update `w + diag(d)`. Without
        its own `dot_general`, a product materialises `w + Δ` (which the adapter must
        allow); override the hooks to compute it factored instead.

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import jax.random as jr
        import quax
        import lora_jax as lora


        class DiagArray(lora.AbstractAdapter):
            _w: jax.Array
            d: jax.Array
            stop_gradient: bool = eqx.field(static=True, default=True)
            allow_materialise: bool = eqx.field(static=True, default=True)

            trainable_fields = ("d",)

            def delta(self):
                return jnp.diag(self.d)


        w = jr.normal(jr.key(0), (3, 3))
        dw = DiagArray(w, jnp.full(3, 0.5))
        x = jnp.ones(3)
        assert jnp.allclose(quax.quaxify(jnp.matmul)(dw, x), (w + 0.5 * jnp.eye(3)) @ x)
        ```
    """

    _w: eqx.AbstractVar[Shaped[Array, "*batch out in"]]
    stop_gradient: eqx.AbstractVar[bool]
    allow_materialise: eqx.AbstractVar[bool]

    trainable_fields: ClassVar[tuple[str, ...]]
    frozen_fields: ClassVar[tuple[str, ...]] = ("_w",)

    @property
    def w(self):
        """The base weight, as the model sees it (gradient stopped if `stop_gradient`)."""
        if self.stop_gradient:
            # Leaf by leaf, so a nested quax value (a quantised `w`) stays one.
            return jtu.tree_map(lax.stop_gradient, self._w)
        return self._w

    def aval(self):
        if self._w is None:
            raise ValueError(
                f"This `{type(self).__name__}` has no base weight: it is the trainable "
                "half of `lora_jax.partition` (or the adapters of `unloraify`). "
                "Recombine it with `eqx.combine(params, frozen)` inside the quaxified "
                "function: `jax.grad(quax.quaxify(loss))`, not `quax.quaxify(jax.grad(loss))`."
            )
        return jax.core.ShapedArray(self._w.shape, self._w.dtype)

    @abc.abstractmethod
    def delta(self) -> Array:
        """The dense update `Δ`, in the adapter's dtype. Used only for merging."""

    def merge(self) -> Array:
        """`w + Δ` as a plain array in the base weight's dtype, whatever
        `allow_materialise` says. This is what [`lora_jax.materialise`][] uses."""
        return _merge(self._w, self.delta())

    def materialise(self):
        if self.allow_materialise:
            return _merge(self.w, self.delta())
        raise RuntimeError(_REFUSE.format(type(self).__name__))

    def __matmul__(self, other):
        raise TypeError(_OUTSIDE.format(type(self).__name__))

    def __rmatmul__(self, other):
        raise TypeError(_OUTSIDE.format(type(self).__name__))

    def __getitem__(self, index):
        raise TypeError(_OUTSIDE.format(type(self).__name__))

    # Hooks for the shared rules in `_rules.py`. The defaults materialise (which
    # refuses unless `allow_materialise=True`); variants override what they can do
    # without forming `w + Δ`.

    def dot_general(self, other, dims, params):
        """`lax.dot_general` with this value on the side `dims.adapter_lhs` says."""
        from ._rules import join_dims

        dn = join_dims(*dims)
        if dims.adapter_lhs:
            return quax.quaxify(lax.dot_general)(self.materialise(), other, dn, **params)
        return quax.quaxify(lax.dot_general)(other, self.materialise(), dn, **params)

    def transpose(self, permutation: tuple[int, ...], *, swap: bool):
        """`lax.transpose` by a `permutation` that keeps the matrix dimensions last
        (`swap`: whether it exchanges them)."""
        return quax.quaxify(lax.transpose)(self.materialise(), permutation)

    def factor_specs(self, spec: tuple) -> dict[str, tuple]:
        """How the trainable factors are laid out on a device mesh when the base weight
        has the layout `spec` (one `PartitionSpec` entry per dimension of `w`):
        `{field: entries}`. Fields left out are replicated; that is the default."""
        del spec
        return {}

    def astype_base(self, dtype):
        """`convert_element_type` of the whole value: the base weight is cast; the
        factors keep the adapter dtype they were given."""
        w = quax.quaxify(lambda x: x.astype(dtype))(self._w)
        return eqx.tree_at(lambda v: v._w, self, w)


@quax.quaxify
def _merge(w, delta):
    return w + delta.astype(w.dtype)


def is_adapter(x) -> bool:
    """Whether `x` is an adapter value (a [`lora_jax.LoraArray`][] or another method's).

    **Arguments:**

    - `x`: anything.

    **Returns:**

    `True` for an instance of [`lora_jax.AbstractAdapter`][]. Useful as `is_leaf` in
    `jax.tree_util` functions, so that an adapter is visited whole.

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.random as jr
        import lora_jax as lora

        mlp = lora.loraify(eqx.nn.MLP(4, 2, 8, 1, key=jr.key(0)), rank=2, key=jr.key(1))
        adapters = [x for x in jax.tree.leaves(mlp, is_leaf=lora.is_adapter)
                    if lora.is_adapter(x)]
        assert len(adapters) == 2
        ```
    """
    return isinstance(x, AbstractAdapter)


def as_scaling(value, batch_shape: tuple[int, ...] = ()) -> Array:
    """Scalings are float32 array leaves, so changing one never recompiles. A stacked
    weight `(*batch, out, in)` gets one scaling per matrix, shape `batch`, so that
    every leaf of the adapter has the stacking dimensions (`lax.scan` slices them)."""
    return jnp.full(batch_shape, value, dtype=jnp.float32)


def expand_scaling(scaling, like) -> Array:
    """`scaling` of shape `batch` cast and broadcastable against `like`
    `(*batch, m, n)`."""
    return scaling.astype(like.dtype)[..., None, None]
