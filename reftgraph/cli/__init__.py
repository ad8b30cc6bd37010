"""The command line: ``reftgraph demo | train SPEC | generate GRAPH | ...`` (see docs/cli.md)."""

from .main import caps_experiment, main

__all__ = ["main"]
