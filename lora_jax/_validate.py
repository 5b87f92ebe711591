"""Argument checks shared by the public functions: each raises a ValueError or
TypeError that names the argument and says what would be valid."""

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def check_rank(rank, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"`{name}` must be a positive integer, got {rank!r}.")
    if rank <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {rank}.")
    return int(rank)


def check_scalar(value, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if positive and value <= 0:
        raise ValueError(f"`{name}` must be positive, got {value}.")
    return float(value)


def check_probability(value, name: str) -> float:
    value = check_scalar(value, name)
    if not 0 <= value < 1:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
    return value


def check_key(key, name: str = "key"):
    if key is None:
        raise TypeError(f"`{name}` must be a JAX PRNG key (jax.random.key(...)), got None.")
    if isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        return key
    if isinstance(key, jax.core.Tracer):
        return key
    raise TypeError(
        f"`{name}` must be a JAX PRNG key (jax.random.key(...)), got {type(key).__name__}."
    )


def check_weight(weight, name: str = "weight"):
    shape = getattr(weight, "shape", None)
    dtype = getattr(weight, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"`{name}` must be an array, got {type(weight).__name__}.")
    if len(shape) < 2:
        raise ValueError(
            f"`{name}` must have at least two dimensions (*batch, out, in), got shape "
            f"{tuple(shape)}."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype, got {dtype}.")
    check_not_empty(shape, name)


def check_dtype(dtype, default):
    if dtype is None:
        return jnp.dtype(default)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype!r}.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
    return dtype


def check_bool(value, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"`{name}` must be True or False, got {value!r}.")


def check_flags(**flags) -> None:
    """`check_bool` for each keyword: `check_flags(stop_gradient=..., ...)`."""
    for name, value in flags.items():
        check_bool(value, name)


def check_not_empty(shape, name: str = "weight") -> None:
    if 0 in tuple(shape):
        raise ValueError(f"`{name}` must not be empty, got shape {tuple(shape)}.")


def check_names(value, name: str) -> list[str]:
    """A list of strings (not one string)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be a list of strings, got {value!r}.")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"`{name}` must be a list of strings; got an entry {item!r}.")
    return list(value)


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {valid}; got {value!r}.")
    return value
