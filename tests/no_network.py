"""Tests of model names must never reach for the network: :func:`forbid_network` makes any
connection attempt fail the test and the Hugging Face Hub look unreachable."""

import socket
import sys

import pytest

import reftgraph  # noqa: F401 - loads the hub module

UNREACHABLE = "test: huggingface.co:443 does not answer"


def forbid_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        pytest.fail("the test reached for the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # the module under its own name and, where something imported it, its old one (reftgraph.hub):
    # one object, or two when pytest imported the file again to collect its doctests
    names = ("reftgraph.arch.hub", "reftgraph.hub")
    for hub in {id(m): m for m in (sys.modules.get(name) for name in names) if m is not None}.values():
        monkeypatch.setattr(hub, "hub_unreachable", lambda *a, **k: UNREACHABLE)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
