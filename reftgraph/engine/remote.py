"""Remote execution through nnsight: on NDIF (``remote=True``, or a host URL) or in nnsight's
local simulation (``remote="local"``), which serialises each trace as the server would.

>>> import torch, reftgraph as rg
>>> lm, g = rg.models.tiny("llama"), rg.Graph()
>>> _ = g.add(rg.Site("mlp_out", layer=1, positions="last"), rg.Collect(), name="m")
>>> here, there = g.run(lm, ["ab"]), g.run(lm, ["ab"], remote="local")
>>> torch.equal(here["m"], there["m"]), torch.equal(here.logits, there.logits)
(True, True)

:func:`check` runs before anything is sent: every op of the graph must serialise (a custom
op holding a lock or an open file is refused, naming its node), and for NDIF the model
must be known by a Hugging Face id, an API key must be set and the host must answer
within a few seconds. reftgraph itself is shipped with each request (by value), so the
server needs only nnsight, torch and transformers.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from typing import Optional, Union
from urllib.parse import urlparse

from ..core.sites import KEY_COMPONENTS
from ..errors import RemoteError, SiteError

Remote = Union[None, bool, str]
CONNECT_TIMEOUT_S = 5.0

__all__ = ["CONNECT_TIMEOUT_S", "INSIDE", "api_key", "check", "host", "is_remote", "shipped"]


def is_remote(remote: Remote) -> bool:
    """Whether ``remote`` asks for remote execution (``True``, ``"local"`` or a host URL).

    >>> is_remote(None), is_remote(False), is_remote("local"), is_remote(True)
    (False, False, True, True)
    """
    if remote is None or remote is False:
        return False
    if remote is True or isinstance(remote, str):
        return True
    raise RemoteError(f"remote must be None, False, True (NDIF), 'local' (nnsight's simulation) or a host URL, "
                      f"got {remote!r}")


def api_key() -> Optional[str]:
    """The NDIF API key nnsight will send: ``$NDIF_API_KEY``, else ``nnsight.CONFIG.API.APIKEY``.

    >>> import nnsight
    >>> old, nnsight.CONFIG.API.APIKEY = nnsight.CONFIG.API.APIKEY, "abc"
    >>> api_key() if not os.environ.get("NDIF_API_KEY") else "abc"
    'abc'
    >>> nnsight.CONFIG.API.APIKEY = old
    """
    from nnsight import CONFIG

    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def host(remote: Remote) -> str:
    """The server a remote call goes to: ``remote`` itself when it is a URL, else nnsight's
    ``CONFIG.API.HOST`` (``$NDIF_HOST``; NDIF by default).

    >>> host("http://127.0.0.1:9")
    'http://127.0.0.1:9'
    """
    from nnsight import CONFIG

    return remote if isinstance(remote, str) and remote != "local" else CONFIG.API.HOST


def _reachable(url: str) -> None:
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (80 if parsed.scheme in ("http", "ws") else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RemoteError(f"cannot reach the NDIF server at {url} ({type(e).__name__}: {e}); nothing was sent. "
                          "Check the network, or point nnsight at another host: nnsight.CONFIG.API.HOST = ... "
                          "(or $NDIF_HOST). remote='local' runs nnsight's simulation on this machine.") from None


def _ship_reftgraph() -> None:
    """Serialise reftgraph by value, so that a server without it can run what it sends."""
    import nnsight

    nnsight.register(__name__.split(".")[0])   # the package, by name (no import of the layers above)


def _live_types() -> tuple:
    import io
    import mmap
    import select
    import subprocess
    import threading
    import types

    kinds = [io.IOBase, socket.socket, mmap.mmap, types.GeneratorType, types.AsyncGeneratorType, types.CoroutineType,
             type(threading.Lock()), type(threading.RLock()), threading.Condition, threading.Semaphore,
             threading.Event, threading.Thread, subprocess.Popen]
    kinds += [getattr(select, name) for name in ("epoll", "poll", "kqueue") if hasattr(select, name)]
    return tuple(k for k in kinds if isinstance(k, type))


# modules whose classes and functions are known not to hold a user's live handles
_LIBRARIES = ("builtins", "torch", "nnsight", "transformers", "reftgraph", "typing", "collections", "abc",
              "functools", "numpy", "enum", "dataclasses")


def live_handle(value, limit: int = 100_000) -> Optional[str]:
    """The path to a live handle (open file, socket, lock, generator, thread ...) inside
    ``value``, or None: what a remote request must not carry (nnsight's serialiser would
    embed a file's contents, or fail on the server).

    >>> import threading, torch, reftgraph as rg
    >>> op = rg.Add(torch.ones(2))
    >>> live_handle(op) is None
    True
    >>> op.guard = threading.Lock()
    >>> live_handle(op)
    '.guard (a lock)'

    Follows attributes, containers, submodules, closures, default arguments and the
    globals a function names, up to ``limit`` objects; tensors are data, never handles.
    """
    import torch

    kinds = _live_types()
    seen, stack = set(), [(value, "")]
    while stack and len(seen) < limit:
        obj, path = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.Tensor)):
            continue
        seen.add(id(obj))
        if isinstance(obj, kinds):
            name = type(obj).__name__.lower()
            what = ("an open file" if "io" in type(obj).__module__ or "file" in name else
                    "a lock" if "lock" in name else "a generator" if "generator" in name or "coroutine" in name
                    else f"a {type(obj).__name__}")
            return f"{path or 'the op'} ({what})"
        if isinstance(obj, dict):
            stack += [(v, f"{path}[{k!r}]") for k, v in obj.items()] + [(k, f"{path} key") for k in obj]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += [(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        elif isinstance(obj, type):
            if not str(obj.__module__).startswith(_LIBRARIES):
                stack += [(v, f"{obj.__name__}.{k}") for k, v in vars(obj).items() if not k.startswith("__")]
                stack += [(base, path) for base in obj.__mro__[1:]]
        elif callable(obj) and hasattr(obj, "__code__"):   # a function: what it closes over and names
            if str(getattr(obj, "__module__", "")).startswith(_LIBRARIES):
                continue
            cells = [c.cell_contents for c in (obj.__closure__ or ()) if _filled(c)]
            named = [obj.__globals__[n] for n in obj.__code__.co_names if n in obj.__globals__]
            stack += [(v, f"{path} (in {obj.__name__})") for v in cells + named + list(obj.__defaults__ or ())]
            stack += [(v, f"{path} (in {obj.__name__})") for v in (obj.__kwdefaults__ or {}).values()]
        elif hasattr(obj, "__self__") and hasattr(obj, "__func__"):   # a bound method
            stack += [(obj.__self__, path), (obj.__func__, path)]
        elif not isinstance(obj, type(os)):   # modules are imported on the server, not shipped
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict):
                stack += [(v, f"{path}.{k}") for k, v in state.items() if k not in ("_forward_hooks",)]
                stack.append((type(obj), path))
            for slot in getattr(type(obj), "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    stack.append((getattr(obj, slot), f"{path}.{slot}"))
    return None


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _check_ops(graph) -> None:
    from nnsight.intervention.serialization import dumps

    for node in graph.nodes:
        if node.site.component in KEY_COMPONENTS:
            raise RemoteError(f"node {node.name!r} at {node.site}: {node.site.component} needs eager attention, "
                              "which the engine switches on for the call, and a remote model's attention "
                              "implementation is the server's; nothing was sent. Run it locally")
        handle = live_handle(node.op)
        if handle is not None:
            raise SiteError(f"node {node.name!r} at {node.site}: its op {type(node.op).__name__} holds a live handle, "
                            f"{handle}, which cannot be sent to a remote server; nothing was sent. Keep files, "
                            "sockets, locks and generators out of ops (read what they hold into tensors first)")
        try:
            dumps(node.op)
        except Exception as e:
            raise SiteError(f"node {node.name!r} at {node.site}: its op {type(node.op).__name__} cannot be sent to "
                            f"a remote server ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "ops are serialised with their code and tensors: keep locks, files and other "
                            "live handles out of them") from None


def check(remote: Remote, model, graph=None) -> bool:
    """Everything that can be checked before a remote call; returns :func:`is_remote`.

    >>> import reftgraph as rg
    >>> check(None, rg.models.tiny("llama")), check("local", rg.models.tiny("llama"))
    (False, True)
    >>> check(True, rg.models.tiny("llama"))          # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.RemoteError: remote execution on NDIF needs the model's Hugging Face id; ...
    """
    if not is_remote(remote):
        return False
    if graph is not None:
        _check_ops(graph)
    if remote != "local":
        repo = getattr(model.nn, "repo_id", None) or ""
        if "/" not in repo or os.path.exists(repo):
            raise RemoteError(
                f"remote execution on NDIF needs the model's Hugging Face id; {model.name or 'this model'} was built "
                f"from {repo or 'a model object'!r}. Load it by its id without weights: "
                "rg.load('meta-llama/Llama-3.1-8B', dispatch=False)")
        if not api_key():
            raise RemoteError("remote execution on NDIF needs an API key (get one at https://login.ndif.us): "
                              "export NDIF_API_KEY=... or set nnsight.CONFIG.API.APIKEY = '...' before the call "
                              "(nnsight.CONFIG.set_default_api_key('...') saves it for later sessions)")
        _reachable(host(remote))
    _ship_reftgraph()
    return True


INSIDE = "inside a session"   # forward(remote=INSIDE): a trace of a remote session, run by the server


def shipped(model):
    """The parts of ``model`` a trace needs on the server (its nnsight envoy and architecture):
    what a remote session carries instead of the local weights and tokenizer.

    >>> import reftgraph as rg
    >>> light = shipped(rg.models.tiny("llama"))
    >>> light.hf is None, light.tokenizer is None, light.arch.n_layers
    (True, True, 2)
    """
    return dataclasses.replace(model, hf=None, tokenizer=None)
