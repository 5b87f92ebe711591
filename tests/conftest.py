import os


os.environ.setdefault("JAX_CHECK_TRACER_LEAKS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh key on every call: `getkey()`."""
    counter = iter(range(10**9))

    def _getkey():
        return jr.fold_in(jr.key(0), next(counter))

    return _getkey
