"""Every public function and class opens its docstring with a short runnable example.

The rule, checked on every module of the ``reftgraph`` package (``__main__`` aside):

- The public names of a module are its ``__all__`` when it has one (re-exports included,
  checked where they are defined), otherwise the functions and classes defined in the
  module whose names do not start with ``_``. Everything else is internal.
- A public function or class has a docstring whose first paragraph (paragraphs are
  separated by blank lines) is a short summary of at most three lines, and whose second
  paragraph starts with ``>>>``: the example comes right after the summary, before any
  other prose.
- So do the public methods and properties of a public class (names in the class's own
  ``__dict__`` not starting with ``_``), except one that overrides a method or property of
  a base class whose docstring follows the rule (e.g. each op's ``forward`` or ``config``
  overriding :class:`reftgraph.core.ops.Op`'s). Dunder methods, dataclass-generated ones
  included, are not checked.

The examples themselves run as doctests (``--doctest-modules`` in pyproject.toml), on tiny
models, offline.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import reftgraph

MAX_SUMMARY_LINES = 3


def problem(doc) -> str:
    """Why ``doc`` breaks the rule ('' when it follows it)."""
    if not doc or not doc.strip():
        return "no docstring"
    paragraphs = re.split(r"\n[ \t]*\n", inspect.cleandoc(doc).strip())
    summary = paragraphs[0]
    if summary.startswith(">>>"):
        return "no summary before the example"
    if len(summary.splitlines()) > MAX_SUMMARY_LINES:
        return f"summary longer than {MAX_SUMMARY_LINES} lines"
    if len(paragraphs) < 2 or not paragraphs[1].startswith(">>>"):
        return "no example (>>>) right after the summary"
    return ""


def public_names(module) -> list:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module.__name__]


def member_doc(member):
    """The docstring of a class attribute that is a method or property, else None."""
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    if isinstance(member, property) or inspect.isfunction(member):
        return member.__doc__ or ""
    return None


def overrides_documented(cls, name: str) -> bool:
    for base in cls.__mro__[1:]:
        if name in vars(base):
            doc = member_doc(vars(base)[name])
            return doc is not None and not problem(doc)
    return False


def offenders() -> list:
    found, seen = [], set()
    modules = [reftgraph] + [importlib.import_module(m.name)
                             for m in pkgutil.walk_packages(reftgraph.__path__, "reftgraph.")
                             if m.name.rsplit(".", 1)[-1] != "__main__"]
    for module in modules:
        for name in public_names(module):
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj in seen:
                continue
            seen.add(obj)
            where = f"{obj.__module__}.{obj.__qualname__}"
            why = problem(obj.__doc__)
            if why:
                found.append(f"{where}: {why}")
            if not inspect.isclass(obj):
                continue
            for attr, member in vars(obj).items():
                doc = member_doc(member)
                if attr.startswith("_") or doc is None or overrides_documented(obj, attr):
                    continue
                why = problem(doc)
                if why:
                    found.append(f"{where}.{attr}: {why}")
    return sorted(found)


def test_every_public_function_and_class_opens_with_an_example():
    bad = offenders()
    assert not bad, (f"{len(bad)} public names break the docstring rule (see tests/test_docstrings.py):\n  "
                     + "\n  ".join(bad))


def test_the_rule():
    assert problem("Add one.\n\n    >>> 1 + 1\n    2\n    \n    More.") == ""   # indented, as in source
    assert problem("Add one.\n\nMore prose.\n\n>>> 1") == "no example (>>>) right after the summary"
    assert problem(">>> 1\n1") == "no summary before the example"
    assert problem("a\nb\nc\nd\n\n>>> 1") == "summary longer than 3 lines"
    assert problem(None) == "no docstring"
