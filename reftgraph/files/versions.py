"""Graph folders that readers always see whole: versions and a pointer.

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "g"
>>> for text in ("first", "second"):
...     _ = write_version(path, lambda folder: (folder / "a.txt").write_text(text))
>>> (current_folder(path) / "a.txt").read_text(), sorted(p.name for p in path.iterdir())
('second', ['CURRENT', 'versions'])

A saved graph ``path/`` holds ``versions/<name>/`` folders and ``CURRENT``, a small file
that names the current version. A writer writes a new version completely (and fsyncs
it), then replaces ``CURRENT`` with ``os.replace`` (atomic for one file on POSIX), then
removes the versions other than the new one and the one it replaced. A reader reads
``CURRENT`` once and then that version; the previous version is kept so a reader that
read the old pointer still finds it, and one that loses the race with two newer saves
reads the pointer again (:func:`reftgraph.load_graph` does). Writers to one folder take
turns: each holds an exclusive ``flock`` on the parent folder while it writes, so two
writers at once both succeed (the last pointer wins), and leftovers of a writer that was
killed (an unfinished version, a pointer being written) are removed by the next writer,
which knows from the lock, not from process ids, that nobody else is writing.

Folders from before (``graph.json`` directly in ``path/``) are still read; the first save
over one turns it into the layout above.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from ..errors import GraphFileError

__all__ = ["atomic_dir", "current_folder", "locked", "read_pointer", "write_version"]

POINTER = "CURRENT"
VERSIONS = "versions"
VERSION_NAME = r"[0-9]{8}-[0-9]{6}-[0-9a-f]{12}"  # what _new_name makes
OLD_LAYOUT = ("graph.json", "weights.safetensors")


@contextlib.contextmanager
def locked(folder: Path, wait: bool = True):
    """Hold an exclusive ``flock`` on ``folder`` (a directory) while the block runs; yields
    whether to go ahead: False only when ``wait`` is False and another writer holds it.

    >>> import tempfile
    >>> with locked(Path(tempfile.mkdtemp())) as held:
    ...     held
    True

    Where no lock can be taken (Windows, a filesystem without locks) a writer (``wait``)
    goes ahead unlocked and a reader (not ``wait``) does not: see docs/loading.md.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield wait
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield wait
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            held = False
        except OSError:  # e.g. a network filesystem without flock
            held = wait
        else:
            held = True
        yield held
    finally:
        os.close(fd)  # releases the lock; a killed process's lock is released by the kernel


def _fsync(path: Path) -> None:
    if os.name != "posix":
        return  # best effort there: directories (and read-only handles) cannot be synced
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_pointer(path: Path):
    """The version ``path/CURRENT`` names, or None when there is no ``CURRENT``.

    >>> import tempfile
    >>> read_pointer(Path(tempfile.mkdtemp())) is None
    True
    """
    try:
        with open(path / POINTER, "rb") as f:
            text = f.read(100)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise GraphFileError(f"{path / POINTER} cannot be read ({e.strerror})") from None
    name = text.decode("ascii", "replace").strip()
    if not re.fullmatch(VERSION_NAME, name):
        raise GraphFileError(f"{path / POINTER} holds {name[:50]!r}, not the name of a saved version "
                             "(YYYYmmdd-HHMMSS-<12 hex digits>)")
    return name


def _pointer_or_none(path: Path):
    try:
        return read_pointer(path)
    except GraphFileError:
        return None


def current_folder(path) -> Path:
    """The folder holding the saved graph's ``graph.json`` and ``weights.safetensors``: the
    version ``CURRENT`` names, or ``path`` itself for a folder of the old layout.

    >>> import tempfile, reftgraph as rg
    >>> path = rg.save(rg.Graph(), tempfile.mkdtemp() + "/g")
    >>> sorted(p.name for p in current_folder(path).iterdir())
    ['graph.json', 'weights.safetensors']

    Read both files from the folder this returns once: a later save may remove it (after the
    next one); :func:`reftgraph.load_graph` does this and reads the pointer again then.
    """
    path = Path(path)
    name = read_pointer(path)
    if name is not None:
        return path / VERSIONS / name
    if not path.exists() and path.parent.is_dir() and any(path.parent.glob(f".{glob.escape(path.name)}.old-*")):
        with locked(path.parent, wait=False) as held:  # no writer at work: a killed one's leftovers
            if held:
                _recover_legacy(path)
    if not (path / OLD_LAYOUT[0]).is_file():
        raise GraphFileError(f"{path} is not a saved graph: {OLD_LAYOUT[0]} is missing (and no {POINTER} "
                             "names a saved version)")
    return path


def _is_graph_folder(path: Path) -> bool:
    """Whether ``save`` may write into ``path``: missing, empty, or a saved graph (either layout)."""
    if path.is_symlink() or path.exists() and not path.is_dir():
        return False
    return (not path.exists() or (path / POINTER).is_file() or (path / VERSIONS).is_dir()
            or (path / OLD_LAYOUT[0]).is_file() or not any(path.iterdir()))


def _new_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:12]


def _tidy(path: Path, keep: set) -> None:
    """Under the lock: remove versions not in ``keep``, pointers being written by dead writers
    and (once a pointer exists) the files of the old layout."""
    for p in path.glob(f".{POINTER}-*"):
        p.unlink(missing_ok=True)
    for p in (path / VERSIONS).iterdir() if (path / VERSIONS).is_dir() else ():
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    if (path / POINTER).is_file():
        for name in OLD_LAYOUT:
            (path / name).unlink(missing_ok=True)


def write_version(path, write) -> Path:
    """Write a new version of ``path`` with ``write(folder)`` and make it current; returns
    its folder.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "g"
    >>> folder = write_version(path, lambda folder: (folder / "a.txt").write_text("v1"))
    >>> folder == current_folder(path), folder.parent == path / "versions"
    (True, True)

    Refuses a ``path`` that is a file, a link or a folder of something else. If ``write``
    raises, its version is removed and the current one stays current (a ``path`` this call
    created is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        _recover_legacy(path)
        if not _is_graph_folder(path):
            raise GraphFileError(f"{path} exists and is not a saved graph (no graph.json): not replacing it; "
                                 "pick another path or remove it")
        previous = _pointer_or_none(path)  # a damaged pointer: the new one replaces it
        name, created = _new_name(), not path.exists()
        folder, pointer = path / VERSIONS / name, path / f".{POINTER}-{name}"
        folder.mkdir(parents=True)
        try:
            write(folder)
            for p in [*folder.iterdir(), folder, folder.parent]:
                _fsync(p)
            pointer.write_text(name + "\n")
            _fsync(pointer)
            os.replace(pointer, path / POINTER)
        except BaseException:  # leave path as it was, unless the new pointer is in place already
            pointer.unlink(missing_ok=True)
            if _pointer_or_none(path) != name:
                shutil.rmtree(path if created else folder, ignore_errors=True)
                with contextlib.suppress(OSError):
                    (path / VERSIONS).rmdir()  # if this save made it (it is empty then)
            raise
        _fsync(path)
        _tidy(path, {name, previous})
    return folder


# -- folders written once, renamed into place (training checkpoints) --------------------------

def _recover_legacy(path: Path) -> None:
    """Put back a folder that a killed :func:`atomic_dir` (or a save before versions) had
    moved aside (``.name.old-*/g``) when ``path`` is missing, and remove its temporary
    folders. Call it holding the parent's lock: then no writer is alive to own them."""
    name = glob.escape(path.name)
    old = sorted(path.parent.glob(f".{name}.old-*"), key=lambda d: d.stat().st_mtime)
    if not path.exists() and old and (old[-1] / "g").is_dir():
        os.replace(old[-1] / "g", path)
    for d in old + list(path.parent.glob(f".{name}.tmp-*")):
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` by renames,
    on any failure it is removed and ``path`` is left as it was.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out"
    >>> with atomic_dir(target) as tmp:
    ...     _ = (tmp / "a.txt").write_text("done")
    >>> (target / "a.txt").read_text()
    'done'

    For folders written once (checkpoints): replacing an existing one moves it aside for a
    moment, so use :func:`write_version` for folders that others read while they change.
    Writers hold the parent folder's lock; a writer killed between the two renames leaves
    the previous folder in ``.name.old-*``, put back by the next writer or reader.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        _recover_legacy(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _replace_dir(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / "g")
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / "g", path)  # put the previous folder back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
