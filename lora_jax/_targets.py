"""Dotted module names from PyTree paths, and PEFT's rules for matching them."""

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.tree_util as jtu


def path_name(path) -> str:
    """`(GetAttrKey('layers'), SequenceKey(0), GetAttrKey('linear'))` -> `layers.0.linear`."""
    parts = []
    for k in path:
        if isinstance(k, jtu.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jtu.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jtu.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jtu.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return ".".join(parts)


def name_matches(name: str, pattern: str) -> bool:
    """PEFT's list semantics: an exact match, or `name` ends with `.pattern`."""
    return name == pattern or name.endswith("." + pattern)


def pattern_key_matches(name: str, key: str) -> bool:
    """PEFT's `rank_pattern`/`alpha_pattern` keys: the key, as a regex, matches the
    end of the name at a dot boundary."""
    return re.fullmatch(rf"(.*\.)?(?:{key})", name) is not None


_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str, layers_pattern: Sequence[str] | None) -> int | None:
    """The layer number in a name (`blocks.3.attn` -> 3), as PEFT's
    `layers_to_transform` reads it: the integer after one of `layers_pattern`, or the
    first integer component."""
    parts = name.split(".")
    if layers_pattern:
        for i, p in enumerate(parts[:-1]):
            if p in layers_pattern and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


Where = str | Sequence[str] | Callable[[str, Any], bool] | None


def describe_where(where) -> str:
    if callable(where):
        return "a callable"
    return repr(where)


def make_matcher(where: Where, argname: str):
    """A predicate `(name, node) -> bool` for `where`, plus the list patterns (each
    must match something) or `None`."""
    if where is None:
        return (lambda name, node: True), None
    if callable(where):
        try:
            inspect.signature(where).bind("name", None)
        except TypeError:
            raise TypeError(
                f"`{argname}` as a callable must take two arguments `(name, layer)` and "
                f"return a bool; {where!r} does not take them."
            ) from None
        except ValueError:  # no signature to read (a builtin): trust it
            pass
        return where, None
    if isinstance(where, str):
        if where == "all-linear":
            raise AssertionError("handled by the caller")
        try:
            regex = re.compile(where)
        except re.error as e:
            raise ValueError(f"`{argname}` is not a valid regular expression: {e}") from None
        return (lambda name, node: regex.fullmatch(name) is not None), None
    if isinstance(where, Sequence):
        items = list(where)
        for item in items:
            if not isinstance(item, str):
                raise TypeError(
                    f"`{argname}` must be a list of module names, a regex string, "
                    f"'all-linear' or a callable; got an entry {item!r}."
                )
        return (lambda name, node: any(name_matches(name, p) for p in items)), items
    raise TypeError(
        f"`{argname}` must be a list of module names, a regex string, 'all-linear' or "
        f"a callable `(path, node) -> bool`; got {type(where).__name__}."
    )


def lookup_pattern(name: str, patterns: dict | None, default):
    if not patterns:
        return default
    for key, value in patterns.items():
        if pattern_key_matches(name, key):
            return value
    return default
