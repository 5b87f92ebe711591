"""The `!!! Example` blocks of the public docstrings run."""

import inspect
import re
import textwrap

import pytest

import lora_jax


_FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _public():
    names = [n for n in dir(lora_jax) if not n.startswith("_")]
    return [(n, getattr(lora_jax, n)) for n in names if callable(getattr(lora_jax, n))]


def _docstrings(obj):
    yield inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        init = obj.__dict__.get("__init__")
        if init is not None and init.__doc__:
            yield inspect.getdoc(init)


def _examples():
    cases = []
    for name, obj in _public():
        blocks = [b for doc in _docstrings(obj) for b in _FENCE.findall(doc)]
        for i, block in enumerate(blocks):
            cases.append(pytest.param(textwrap.dedent(block), id=f"{name}-{i}"))
    return cases


EXAMPLES = _examples()


def test_examples_found():
    # loraify, LoraArray, materialise, partition, summary, save_adapter, ... have one.
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("code", EXAMPLES)
def test_docstring_example(code, capsys):
    exec(compile(code, "<docstring>", "exec"), {"__name__": "__docstring__"})
