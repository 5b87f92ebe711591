import os


os.environ.setdefault("JAX_CHECK_TRACER_LEAKS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def float32_products_on_a_gpu(request):
    """The dense references are float32 products compared at float32 tolerances, and a
    GPU's default is TF32 (about 3 decimal digits) on both sides: on a GPU, products
    run at full precision. Not for the fused kernel's tests, which compare bf16 paths
    and whose kernel a product with a stated precision does not take."""
    if jax.default_backend() != "gpu" or request.module.__name__.endswith("test_mosaic"):
        yield
        return
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def getkey():
    """A fresh key on every call: `getkey()`."""
    counter = iter(range(10**9))

    def _getkey():
        return jr.fold_in(jr.key(0), next(counter))

    return _getkey


# ---------------------------------------------------------------------------------------
# Property-case counting (tests/test_properties.py): how many checked value draws ran.
# ---------------------------------------------------------------------------------------


class CaseCounter:
    """Cases checked by the property tests, by test name; `total` over all."""

    def __init__(self):
        self.by_test: dict[str, int] = {}

    def add(self, test: str, n: int) -> None:
        self.by_test[test] = self.by_test.get(test, 0) + n

    @property
    def total(self) -> int:
        return sum(self.by_test.values())


_CASES = pytest.StashKey[CaseCounter]()


def pytest_configure(config):
    config.stash[_CASES] = CaseCounter()
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistCases(config.stash[_CASES]))


class _XdistCases:
    """Workers send their counts to the controller, which adds them up."""

    def __init__(self, counter: CaseCounter):
        self.counter = counter

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["property_cases"] = dict(self.counter.by_test)

    def pytest_testnodedown(self, node, error):
        for test, n in getattr(node, "workeroutput", {}).get("property_cases", {}).items():
            self.counter.add(test, n)


@pytest.fixture(scope="session")
def property_cases(request) -> CaseCounter:
    """The session's counter of property cases (see tests/test_properties.py)."""
    return request.config.stash[_CASES]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        item._failed = True  # read by fixtures' teardown
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workeroutput"):
        return
    counter = config.stash.get(_CASES, None)
    if counter is None or not counter.by_test:
        return
    parts = ", ".join(f"{k} {v}" for k, v in sorted(counter.by_test.items()))
    terminalreporter.write_line(f"property cases run: {counter.total} ({parts})")
