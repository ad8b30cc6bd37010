"""A griffe extension for the docs build: show docstring doctests as code blocks.

Docstrings here are written for ``pytest --doctest-modules``: ``>>>`` lines and their
output, ``rST`` roles such as ``:class:`Graph```. Markdown would read ``>>>`` as nested
quotes, so each doctest run (its prompt lines and the output lines up to a blank line)
is fenced as ``pycon`` and roles become plain code spans. Nothing else changes.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


def fence_doctests(text: str) -> str:
    """Wrap every doctest run of ``text`` in a ``pycon`` fence; roles become code spans."""
    out, block, fenced = [], [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        if not fenced and stripped.startswith(">>>") and not block:
            block = [line]
            continue
        if block:
            if stripped:
                block.append(line)
                continue
            out += ["```pycon", *block, "```"]
            block = []
        out.append(line)
    if block:
        out += ["```pycon", *block, "```"]
    return ROLE.sub(lambda m: f"`{m[1]}`", "\n".join(out))


class Doctests(griffe.Extension):
    """Rewrite docstrings as they are loaded (see :func:`fence_doctests`)."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
