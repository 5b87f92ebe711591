"""The `!!! Example` blocks of the public docstrings run, and so does the code of the
docs pages (each page's ```python blocks in order, in one namespace). A fragment
that is not meant to run is fenced as ```py."""

import inspect
import pathlib
import re
import textwrap

import jax
import pytest

import lora_jax


_FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _public():
    names = [n for n in dir(lora_jax) if not n.startswith("_")]
    return [(n, getattr(lora_jax, n)) for n in names if callable(getattr(lora_jax, n))]


def _docstrings(obj):
    yield inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        # `__init__` and the public methods and properties the class defines itself
        # (`Int8Array.from_array`, say).
        for name, member in vars(obj).items():
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(member, (classmethod, staticmethod)):
                member = member.__func__
            elif isinstance(member, property):
                member = member.fget
            if callable(member) and member.__doc__:
                yield inspect.getdoc(member)


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


DOCS = pathlib.Path(__file__).parent.parent / "docs"


def _pages():
    pages = sorted(DOCS.rglob("*.md")) if DOCS.is_dir() else []
    return [
        pytest.param(p, id=str(p.relative_to(DOCS))) for p in pages if _FENCE.search(p.read_text())
    ]


@pytest.mark.parametrize("page", _pages())
def test_docs_page(page, capsys):
    namespace = {"__name__": "__docs__"}
    # Users run with JAX's default promotion; optax's updates need it.
    with jax.numpy_dtype_promotion("standard"):
        for block in _FENCE.findall(page.read_text()):
            exec(compile(textwrap.dedent(block), str(page), "exec"), namespace)
