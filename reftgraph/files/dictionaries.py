"""Read sparse autoencoders from the folders their trainers write: sae-lens, sparsify, Gemma Scope, dictionary_learning.

>>> import json, tempfile, torch, reftgraph as rg
>>> from pathlib import Path
>>> from safetensors.torch import save_file
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "standard",
...     "metadata": {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny"}}))
>>> save_file({"W_enc": torch.randn(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.randn(8, 4),
...            "b_dec": torch.zeros(4)}, folder / "sae_weights.safetensors")
>>> sae = load(folder)
>>> sae.activation, sae.trained_at, sae.apply_b_dec_to_input
('relu', 'resid_post[1]', True)

The format is told by the files (:data:`FORMATS`); every dictionary becomes a
:class:`~reftgraph.Dictionary` in float32 whose ``encode`` gives the numbers its trainer's
own code gives. Nothing is unpickled: ``.safetensors`` and ``.npz`` are read as arrays,
and dictionary_learning's ``ae.pt`` (a pickle) with ``torch.load(weights_only=True)``.
Transcoders (sae-lens ``transcoder`` / ``jumprelu_transcoder``, Gemma Scope 2's, sparsify's
``transcode``) load with ``reads="mlp"``: they read the MLP's own input and write at
``mlp_out``. What reftgraph cannot run exactly (gated SAEs, skip connections, per-token input
norms) is refused with the reason, never loaded approximately.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from ..core.ops.dictionary import Dictionary
from ..errors import DictionaryFileError

FORMATS = {
    "sae-lens": "cfg.json + sae_weights.safetensors (sae-lens's SAE.save_model / save_inference_model)",
    "sparsify": "cfg.json + sae.safetensors (EleutherAI sparsify, one folder per hookpoint)",
    "gemma-scope-2": "config.json + params.safetensors (Gemma Scope 2)",
    "gemma-scope": "params.npz (Gemma Scope 1)",
    "dictionary-learning": "ae.pt + config.json (saprmarks/dictionary_learning)",
}
_HEADS = "reftgraph's head_out keeps heads apart and does not take such a dictionary yet"
# TransformerLens / sae-lens hook names of the components reftgraph has
_TL_HOOKS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
             "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out"}


def load(path, *, strict: bool = True, name: Optional[str] = None) -> Dictionary:
    """The dictionary in folder (or file) ``path``, or a live sae-lens ``SAE`` object.

    >>> load("/nonexistent")
    Traceback (most recent call last):
    ...
    reftgraph.errors.DictionaryFileError: no dictionary at /nonexistent: it does not exist

    The dictionary records where it was trained (``trained_at``, e.g. ``"resid_post[15]"``,
    from the format's hook name) and a graph refuses it at another site unless
    ``strict=False`` (then it warns). ``name`` labels it in messages (default: the folder's name).
    """
    if not isinstance(path, (str, Path)):
        return _live(path, strict, name)
    path = Path(path)
    if not path.exists():
        raise DictionaryFileError(f"no dictionary at {path}: it does not exist")
    folder = path if path.is_dir() else path.parent
    files = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    label = name if name is not None else folder.name
    if path.is_file() and path.suffix == ".npz" or "params.npz" in files:
        return _gemma_scope(path if path.is_file() else folder / "params.npz", strict, label)
    if "sae_weights.safetensors" in files and "cfg.json" in files:
        return _sae_lens(folder, strict, label)
    if "sae.safetensors" in files and "cfg.json" in files:
        return _sparsify(folder, strict, label)
    if "params.safetensors" in files and "config.json" in files:
        return _gemma_scope_2(folder, strict, label)
    if "ae.pt" in files:
        return _dictionary_learning(folder, strict, label)
    inner = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(
        (p / f).exists() for f in ("cfg.json", "config.json", "params.npz", "ae.pt")))
    hint = f"; it holds dictionaries in {inner[:8]}: load one of them" if inner else ""
    known = "\n".join(f"  {k}: {v}" for k, v in FORMATS.items())
    raise DictionaryFileError(f"no dictionary format matches {folder}: it holds {sorted(files)[:20]}{hint}. "
                              f"Formats read:\n{known}")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DictionaryFileError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise DictionaryFileError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - whatever the reader says: the file's fault
        raise DictionaryFileError(f"cannot read {path}: {e}") from None


def _build(tensors: dict, where: str, **config) -> Dictionary:
    """A Dictionary from its weights (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``,
    ``b_dec``, ``threshold``), every shape checked against the others."""
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if config["activation"] == "jumprelu" else [])
    missing = [k for k in need if k not in tensors]
    if missing:
        raise DictionaryFileError(f"{where}: missing tensors {missing} (found {sorted(tensors)})")
    w_enc = tensors["W_enc"]
    if w_enc.dim() != 2:
        raise DictionaryFileError(f"{where}: the encoder must be a matrix, got shape {list(w_enc.shape)}")
    d_in, d_sae = w_enc.shape
    d_out = tensors["W_dec"].shape[-1]
    want = {"b_enc": [d_sae], "W_dec": [d_sae, d_out], "b_dec": [d_out], "threshold": [d_sae]}
    for key, shape in want.items():
        if key in need and list(tensors[key].shape) != shape:
            raise DictionaryFileError(f"{where}: {key} has shape {list(tensors[key].shape)}; with the encoder "
                                      f"[{d_in}, {d_sae}] it must be {shape}")
    if d_out != d_in and not config.get("reads"):
        raise DictionaryFileError(f"{where}: it reads width {d_in} and writes {d_out}, but its files do not say it "
                                  "is a transcoder (what it reads and writes)")
    try:
        with torch.device("meta"):
            d = Dictionary(int(d_in), int(d_sae), d_out=int(d_out), **config)
    except ValueError as e:
        raise DictionaryFileError(f"{where}: {e}") from None
    d.load_state_dict({k: tensors[k].detach().to(torch.float32).contiguous() for k in need}, assign=True)
    for key in need:
        if not bool(torch.isfinite(getattr(d, key)).all()):
            raise DictionaryFileError(f"{where}: tensor {key} holds NaN or infinite values")
    return d


def _site_of_tl_hook(hook: str) -> str:
    """``"resid_post[5]"`` for ``"blocks.5.hook_resid_post"``; refusals for hooks reftgraph cannot read."""
    m = re.fullmatch(r"blocks\.(\d+)\.(hook_\w+)", hook or "")
    if m and m.group(2) in _TL_HOOKS:
        return f"{_TL_HOOKS[m.group(2)]}[{int(m.group(1))}]"
    if hook and "hook_z" in hook:
        raise DictionaryFileError(f"trained on {hook} (each head's attention output, heads concatenated); {_HEADS}")
    return ""


def _sae_lens(folder: Path, strict: bool, label: str) -> Dictionary:
    cfg = _json(folder / "cfg.json")
    where = f"sae-lens folder {folder}"
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or ""
    arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn") == "topk"
                                       or cfg.get("activation_fn_str") == "topk" else "standard")
    norm = cfg.get("normalize_activations", "none")
    if norm is True:
        norm = "expected_average_only_in"
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise DictionaryFileError(f"{where}: normalize_activations={norm!r} rescales each token by its own norm, "
                                  "so its features are not a fixed basis of the site; reftgraph refuses it")
    tensors = _tensors(folder / "sae_weights.safetensors")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "batchtopk" or (arch == "jumprelu" and "threshold" not in tensors and "topk_threshold" in tensors):
        tensors["threshold"] = tensors["topk_threshold"].reshape(()).expand(tensors["b_enc"].shape).clone()
        arch = "jumprelu"
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors["log_threshold"].exp()
    activations = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk",
                   "transcoder": "relu", "jumprelu_transcoder": "jumprelu"}
    if arch not in activations:
        raise DictionaryFileError(f"{where}: architecture {arch!r}; reftgraph reads {sorted(activations)} and "
                                  "batchtopk (as jumprelu, the way sae-lens runs it at inference)")
    if arch.endswith("transcoder"):
        out = meta.get("hook_name_out") or cfg.get("hook_name_out") or ""
        if not re.fullmatch(r"blocks\.\d+\.(hook_mlp_in|ln2\.hook_normalized)", hook or "") or not re.fullmatch(
                r"blocks\.\d+\.hook_mlp_out", out):
            raise DictionaryFileError(f"{where}: a transcoder from {hook or '?'} to {out or '?'}; reftgraph runs "
                                      "transcoders from the MLP's input (hook_mlp_in, ln2.hook_normalized) to its "
                                      "output (hook_mlp_out)")
        return _build(tensors, where, activation=activations[arch], reads="mlp", name=label,
                      model=str(meta.get("model_name") or ""), trained_at=_site_of_tl_hook(out), strict=strict)
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):   # fold the norms in, as sae-lens does when saving
        n = tensors["W_dec"].norm(dim=-1)
        tensors["W_enc"], tensors["b_enc"], tensors["W_dec"] = (tensors["W_enc"] * n, tensors["b_enc"] * n,
                                                                tensors["W_dec"] / n[:, None])
    return _build(tensors, where, activation=activations[arch], k=k if arch == "topk" else None,
                  apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), name=label,
                  model=str(meta.get("model_name") or cfg.get("model_name") or ""), trained_at=_site_of_tl_hook(hook),
                  strict=strict)


def _sparsify(folder: Path, strict: bool, label: str) -> Dictionary:
    cfg = _json(folder / "cfg.json")
    where = f"sparsify folder {folder}"
    if cfg.get("activation", "topk") != "topk":
        raise DictionaryFileError(f"{where}: activation {cfg.get('activation')!r}; reftgraph reads topk")
    t = _tensors(folder / "sae.safetensors")
    if "W_skip" in t:
        raise DictionaryFileError(f"{where}: a skip connection (W_skip) adds x @ W_skip^T to the reconstruction; "
                                  "reftgraph does not run it yet")
    tensors = {"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]} \
        if "encoder.weight" in t else t
    hook = folder.name if not folder.name.startswith("seed") else folder.parent.name
    m = re.fullmatch(r"(?:layers|h|blocks)\.(\d+)(\.mlp|\.self_attn|\.attn)?", hook)   # a module's output
    components = {None: "resid_post", ".mlp": "mlp_out", ".self_attn": "attn_out", ".attn": "attn_out"}
    trained = f"{components[m.group(2)]}[{int(m.group(1))}]" if m else ""
    if cfg.get("transcode"):   # reads the module's input, writes its output: an MLP's, for reftgraph
        if not m or m.group(2) != ".mlp":
            raise DictionaryFileError(f"{where}: a transcoder of {hook}; reftgraph runs transcoders of an MLP "
                                      "(hookpoint layers.N.mlp)")
        return _build(tensors, where, activation="topk", k=int(cfg.get("k", 0)), reads="mlp", name=label,
                      trained_at=trained, strict=strict)
    # (sparsify applies ReLU before top-k, sae-lens after: the same features)
    return _build(tensors, where, activation="topk", k=int(cfg.get("k", 0)), apply_b_dec_to_input=True, name=label,
                  trained_at=trained, strict=strict)


def _hf_hook_site(hook: str) -> str:
    """reftgraph's site for a Hugging Face module hook such as ``model.layers.5.output``."""
    m = re.fullmatch(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)\.(.+)", hook or "")
    if not m:
        return ""
    layer, rest = int(m.group(1)), m.group(2)
    if rest == "output":
        return f"resid_post[{layer}]"
    if rest == "post_feedforward_layernorm.output":
        return f"mlp_out[{layer}]"
    if rest == "post_attention_layernorm.output":
        return f"attn_out[{layer}]"
    if rest.endswith("o_proj.input"):
        raise DictionaryFileError(f"trained on {hook} (the heads concatenated before the output projection); {_HEADS}")
    return ""


def _gemma_scope_2(folder: Path, strict: bool, label: str) -> Dictionary:
    cfg = _json(folder / "config.json")
    where = f"Gemma Scope 2 folder {folder}"
    if cfg.get("architecture", "jump_relu") not in ("jump_relu", "jumprelu"):
        raise DictionaryFileError(f"{where}: architecture {cfg.get('architecture')!r}; Gemma Scope 2 is jump_relu")
    t = _tensors(folder / "params.safetensors")
    tensors = {big: t.get(small, t.get(big)) for small, big in
               (("w_enc", "W_enc"), ("b_enc", "b_enc"), ("w_dec", "W_dec"), ("b_dec", "b_dec"), ("threshold", "threshold"))}
    tensors = {k: v for k, v in tensors.items() if v is not None}
    hook_in, hook_out = cfg.get("hf_hook_point_in", ""), cfg.get("hf_hook_point_out") or cfg.get("hf_hook_point_in", "")
    common = dict(activation="jumprelu", name=label, model=str(cfg.get("model_name") or ""), strict=strict)
    if hook_out == hook_in:
        return _build(tensors, where, trained_at=_hf_hook_site(hook_in), **common)
    if cfg.get("affine_connection") or "affine_skip_connection" in t:
        raise DictionaryFileError(f"{where}: an affine transcoder (it adds x @ affine_skip_connection); reftgraph "
                                  "does not run skip connections yet")
    if not hook_in.endswith("pre_feedforward_layernorm.output"):
        raise DictionaryFileError(f"{where}: a transcoder from {hook_in}; reftgraph runs transcoders from the MLP's "
                                  "input (pre_feedforward_layernorm.output) to its output")
    return _build(tensors, where, reads="mlp", trained_at=_hf_hook_site(hook_out), **common)


def _gemma_scope(path: Path, strict: bool, label: str) -> Dictionary:
    import numpy as np

    where = f"Gemma Scope file {path}"
    try:
        with np.load(path, allow_pickle=False) as z:   # arrays only: never unpickles
            arrays = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except Exception as e:  # noqa: BLE001 - the file's fault
        raise DictionaryFileError(f"cannot read {path}: {e}") from None
    tensors = {k[0].upper() + k[1:] if k.startswith("w_") else k: v for k, v in arrays.items()}
    m = re.search(r"layer_(\d+)", str(path))
    site = "mlp_out" if "-mlp" in str(path) else "attn_out" if "-att" in str(path) else "resid_post"
    return _build(tensors, where, activation="jumprelu", name=label,
                  trained_at=f"{site}[{int(m.group(1))}]" if m else "", strict=strict)


def _dictionary_learning(folder: Path, strict: bool, label: str) -> Dictionary:
    where = f"dictionary_learning folder {folder}"
    try:
        state = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True)   # tensors only: no code runs
    except Exception as e:  # noqa: BLE001 - refused by the safe unpickler or unreadable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DictionaryFileError(f"{where}: ae.pt cannot be read with torch.load(weights_only=True) ({first}); "
                                  "it holds more than tensors, and reftgraph never unpickles arbitrary objects") from None
    if isinstance(state, dict) and "ae" in state and isinstance(state["ae"], dict):
        state = state["ae"]   # a backup checkpoint: {"step", "ae", "optimizer", ...}
    trainer = (_json(folder / "config.json").get("trainer") or {}) if (folder / "config.json").exists() else {}
    cls = str(trainer.get("dict_class", ""))
    if "r_mag" in state or "Gated" in cls:
        raise DictionaryFileError(f"{where}: a gated SAE; reftgraph reads ReLU, JumpReLU and (Batch)TopK dictionaries")
    if "W_enc" in state:          # JumpReluAutoEncoder, Matryoshka
        tensors = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k in state}
        if "k" in state and "threshold" in state and state["threshold"].dim() == 0:   # Matryoshka BatchTopK
            tensors["threshold"] = state["threshold"].expand(state["b_enc"].shape).clone()
            config = dict(activation="jumprelu", apply_b_dec_to_input=True)
        else:
            tensors["threshold"] = state["threshold"]
            config = dict(activation="jumprelu")
    elif "b_dec" in state and "k" in state:   # AutoEncoderTopK / BatchTopKSAE
        tensors = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                   "W_dec": state["decoder.weight"].T, "b_dec": state["b_dec"]}
        threshold = float(state.get("threshold", torch.tensor(-1.0)))
        if "BatchTopK" in cls and threshold >= 0:
            tensors["threshold"] = torch.full_like(state["encoder.bias"], threshold)
            config = dict(activation="jumprelu", apply_b_dec_to_input=True)
        else:
            config = dict(activation="topk", k=int(state["k"]), apply_b_dec_to_input=True)
    elif "bias" in state:         # AutoEncoder: relu(encoder(x - bias))
        tensors = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                   "W_dec": state["decoder.weight"].T, "b_dec": state["bias"]}
        config = dict(activation="relu", apply_b_dec_to_input=True)
    else:
        raise DictionaryFileError(f"{where}: ae.pt holds {sorted(state)[:12]}, not a dictionary class reftgraph knows")
    layer, sub = trainer.get("layer"), str(trainer.get("submodule_name", ""))
    site = "mlp_out" if "mlp" in sub else "attn_out" if "attn" in sub else "resid_post"
    return _build(tensors, where, name=label, model=str(trainer.get("lm_name") or ""),
                  trained_at=f"{site}[{int(layer)}]" if isinstance(layer, int) else "", strict=strict, **config)


def _live(sae, strict: bool, name: Optional[str]) -> Dictionary:
    """A live sae-lens ``SAE`` (duck-typed: ``cfg`` and ``W_enc``/``W_dec``/``b_enc``/``b_dec``)."""
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not all(hasattr(sae, k) for k in ("W_enc", "W_dec", "b_dec")):
        raise DictionaryFileError(f"load takes a folder, a file or a live sae-lens SAE; got {type(sae).__name__}")
    arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else getattr(cfg, "architecture", "")
    tensors = {k: getattr(sae, k).detach().cpu() for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
               if isinstance(getattr(sae, k, None), torch.Tensor)}
    norm = getattr(cfg, "normalize_activations", "none")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise DictionaryFileError(f"the SAE's normalize_activations={norm!r} rescales each token by its own norm; "
                                  "reftgraph refuses it")
    activations = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
    if arch not in activations:
        raise DictionaryFileError(f"a live SAE of architecture {arch!r}; reftgraph reads {sorted(activations)}")
    meta = getattr(cfg, "metadata", None)
    hook = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", "") or ""
    return _build(tensors, f"the live {type(sae).__name__}", activation=activations[arch],
                  k=getattr(cfg, "k", None) if arch == "topk" else None,
                  apply_b_dec_to_input=bool(getattr(cfg, "apply_b_dec_to_input", True)),
                  name=name or "", model=str(getattr(meta, "model_name", "") or ""), trained_at=_site_of_tl_hook(hook),
                  strict=strict)
