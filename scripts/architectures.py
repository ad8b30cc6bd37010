"""Every causal-LM type in the installed transformers: build a tiny instance, prove its
components, check each accepted one against plain PyTorch hooks, and write
docs/architectures.md.

    .venv/bin/python scripts/architectures.py            # writes docs/architectures.md
    .venv/bin/python scripts/architectures.py --types llama gpt2 --no-write

For each accepted component the oracle adds a fixed random vector there (one head for head
components) through a compiled graph, and the same addition through a plain forward hook on
the module the resolver chose; the logits must agree (atol 1e-4). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reftgraph as rg  # noqa: E402
from reftgraph.arch.shrink import (causal_lm_types, encoder_types, seq2seq_types, tiny_config_of,  # noqa: E402
                                   vision_language_types)
from reftgraph.arch import proofs  # noqa: E402
from reftgraph.arch.structure import Hook  # noqa: E402
from reftgraph.core.sites import KEY_COMPONENTS  # noqa: E402

BASIC = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_INPUTS = ("q_in", "k_in", "v_in")
IDS = torch.tensor([[5, 17, 42, 99, 7, 250]])


def _hook_edit(lm, component, layer, delta, head, positions, arch):
    """Plain hooks that add ``delta`` to ``component`` (independent of the compiled engine)."""
    hook = arch.hook(component, layer)
    if hook.inner:   # the sum of the MLP and a module beside it, inside the block: moved through the MLP's output
        hook = Hook(layer, 0, arch.blocks[layer].mlp_out, "output")
    module = arch.envoy(lm.hf, hook)
    get, put = arch.view(component, layer)
    handles, seen = [], {}
    block = arch.envoy(lm.hf, Hook(layer, 0, "", "input"))

    def remember(m, args, kwargs):
        seen["pre"] = args[0] if args else kwargs["hidden_states"]

    handles.append(block.register_forward_pre_hook(remember, with_kwargs=True))

    if component == "mlp_in" and "mlp_in_shared" in arch.blocks[layer].reads:
        # one norm for attention and MLP: the MLP alone reads the norm of the moved block input
        norm = arch.envoy(lm.hf, Hook(layer, 0, arch.blocks[layer].reads["mlp_in"], "output"))
        handles.append(module.register_forward_pre_hook(
            lambda m, args: (norm.forward(seen["pre"] + delta),) + tuple(args[1:])))
        return handles
    if component in HEAD_INPUTS:   # head `head`'s q/k/v recomputed from its own moved copy of the block input
        reader = component[0]
        q_get, q_put = arch.view(reader, layer)
        norm_path = arch.blocks[layer].reads[component]
        norm = arch.envoy(lm.hf, Hook(layer, 0, norm_path, "output")) if norm_path else None

        def recompute(m, args, out):
            x = seen["pre"] + delta
            fresh = q_get(module.forward(norm.forward(x) if norm is not None else x), None)
            value = q_get(out, None).clone()
            at = slice(None) if positions == "all" else positions
            value[:, at, head] = fresh[:, at, head]
            return q_put(out, value, None)
        handles.append(module.register_forward_hook(recompute))
        return handles

    def change(raw):
        value = get(raw, seen.get("pre")).clone()
        at = slice(None) if positions == "all" else positions
        if head is None:
            value[:, at] = value[:, at] + delta
        else:
            value[:, at, head, :] = value[:, at, head, :] + delta
        return put(raw, value, seen.get("pre"))

    if hook.io == "output":
        handles.append(module.register_forward_hook(lambda m, a, out: change(out)))
    else:
        def pre(m, args, kwargs):
            if args:
                return (change(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


class Sharpen(rg.Op):
    """An edit of an attention pattern that keeps it a distribution: p^2, renormalised over the keys."""

    def forward(self, h, source=None, valid=None):
        squared = h * h
        return squared / squared.sum(-1, keepdim=True).clamp_min(1e-30)


def _softmax_edit(lm, layer, head, fn, arch):
    """Plain PyTorch for an edit of head ``head``'s attention probabilities at ``layer``:
    torch's softmax, wrapped while that layer's attention module runs. Returns an undo."""
    attn = arch.envoy(lm.hf, Hook(layer, 0, arch.blocks[layer].paths.attn, "output"))
    inside = {"on": False}
    real = (torch.nn.functional.softmax, torch.softmax)

    def wrap(original):
        def softmax(*args, **kwargs):
            out = original(*args, **kwargs)
            if inside["on"] and out.dim() == 4:
                out = out.clone()
                out[:, head] = fn(out[:, head])
            return out
        return softmax

    handles = [attn.register_forward_pre_hook(lambda m, a: inside.update(on=True)),
               attn.register_forward_hook(lambda m, a, o: inside.update(on=False))]
    torch.nn.functional.softmax, torch.softmax = (wrap(f) for f in real)

    def undo():
        torch.nn.functional.softmax, torch.softmax = real
        for h in handles:
            h.remove()
    return undo


def pattern_oracle(lm, layer, arch) -> str:
    """'' when a compiled edit of head 0's attention pattern equals the same edit made by
    plain PyTorch inside the eager attention, else why not."""
    from reftgraph.arch.components.pattern import eager

    g = rg.Graph()
    g.add(rg.Site("attn_pattern", layer=layer, head=0, stack=_stack(arch)), Sharpen(), name="n")
    ours = g.run(lm, _inputs(lm)).logits
    with eager(lm.hf):
        clean = rg.Graph().run(lm, _inputs(lm)).logits
        undo = _softmax_edit(lm, layer, 0, Sharpen(), arch)
        try:
            ref = rg.Graph().run(lm, _inputs(lm)).logits
        finally:
            undo()
    if not torch.allclose(ours, ref, atol=1e-4, rtol=1e-4):
        return f"compiled edit differs from the plain edit by {(ours - ref).abs().max().item():.2g}"
    if torch.allclose(ref, clean, atol=0, rtol=0):
        return "the edit changed nothing"
    return ""


def _stack(arch):
    """The stack a site names for ``arch`` (None for a model with one)."""
    return arch.stack or None


def _inputs(lm):
    """The prompt, and for an encoder-decoder the same tokens as its decoder's (teacher-forced)."""
    if not lm.arch.stacks:
        return [PROMPT]
    ids = torch.tensor([lm.tokenizer(PROMPT)["input_ids"]])
    return {"input_ids": ids, "decoder_input_ids": ids}


def oracle(lm, component, layer, arch=None) -> str:
    """'' when a compiled Add at ``component`` (of ``arch``, a stack: default the model's)
    equals the same plain-hook edit, else why not."""
    arch = arch or lm.arch
    if component in KEY_COMPONENTS:
        return pattern_oracle(lm, layer, arch)
    head = 0 if component in ("head_out", "q", "k", "v") + HEAD_INPUTS else None
    positions = [0] if component in ("k", "k_in") else "all"   # one key moved: the same shift of every key cancels
    delta = torch.randn(arch.width(component, layer), generator=torch.Generator().manual_seed(7))
    g = rg.Graph()
    g.add(rg.Site(component, layer=layer, positions=positions, head=head, stack=_stack(arch)), rg.Add(delta), name="n")
    ours = g.run(lm, _inputs(lm)).logits
    # the reference runs the same inputs through an empty graph, with the edit as plain hooks
    clean = rg.Graph().run(lm, _inputs(lm)).logits
    handles = _hook_edit(lm, component, layer, delta, head, positions, arch)
    try:
        ref = rg.Graph().run(lm, _inputs(lm)).logits
    finally:
        for h in handles:
            h.remove()
    if not torch.allclose(ours, ref, atol=1e-4, rtol=1e-4):
        return f"compiled edit differs from the hook edit by {(ours - ref).abs().max().item():.2g}"
    if torch.allclose(ref, clean, atol=0, rtol=0):
        return "the edit changed nothing"
    return ""


def survey(model_type: str, with_oracle: bool = True, kind: str = "causal") -> dict:
    """One type's row: build time, proof time, and per component 'verified' or the reason;
    ``kind``: "causal" (its causal LM class), "encoder" (its masked LM class), "vlm" (its
    image-text-to-text class: the text tower, run on text) or "seq2seq" (its encoder-decoder
    class: the row holds both stacks, each component of the encoder under ``encoder.``)."""
    row = {"type": model_type}
    try:
        from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMaskedLM,
                                  AutoModelForSeq2SeqLM)

        config = tiny_config_of(model_type)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = {"causal": AutoModelForCausalLM, "encoder": AutoModelForMaskedLM,
                    "vlm": AutoModelForImageTextToText, "seq2seq": AutoModelForSeq2SeqLM}[kind]
            hf = auto.from_config(config, dtype=torch.float32)
        proofs.randomise_zero_maps(hf)    # (a zero-initialised projection would make every edit through it a no-op)
    except Exception as err:  # noqa: BLE001 - reported in the table
        row["error"] = f"does not build from a small config: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    proofs.forget()
    start = time.perf_counter()
    try:
        lm = rg.wrap(hf, rg.models.tiny_tokenizer(), name=f"tiny-{model_type}")
    except Exception as err:  # noqa: BLE001
        row["error"] = f"wrap failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    row["wrap_s"] = time.perf_counter() - start
    if kind == "seq2seq" and not lm.arch.stacks:
        row["error"] = ("not a text encoder-decoder: its encoder reads audio (transformers' get_encoder / "
                        "get_decoder do not give two text stacks)")
        return row
    try:
        rg.Graph().run(lm, _inputs(lm))
    except Exception as err:  # noqa: BLE001 - the model cannot run through the engine's forward at all
        row["error"] = f"proven, but its forward fails with reftgraph's inputs: {type(err).__name__}: " \
                       f"{str(err).splitlines()[0][:160]}"
        return row
    stacks = [lm.arch.stacks["encoder"], lm.arch] if lm.arch.stacks else [lm.arch]
    row["style"] = sorted({b.style or "-" for arch in stacks for b in arch.blocks})
    row["layout"] = sorted({b.qkv_layout or "-" for arch in stacks for b in arch.blocks if b.paths.attn})
    for arch in stacks:
        prefix = "encoder." if arch.stack == "encoder" else ""
        for component, verdict in arch.table().items():
            if verdict != "verified" and not verdict.startswith("on layers"):
                row[prefix + component] = verdict.split(": ", 1)[-1].split(". If the module exists under another name")[0]
                continue
            layer = next(i for i in range(arch.n_layers) if arch.refusal(component, i) is None)
            bad = ""
            if with_oracle:
                try:
                    bad = oracle(lm, component, layer, arch)
                except Exception as err:  # noqa: BLE001
                    bad = f"the compiled edit raised {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            row[prefix + component] = f"ORACLE FAILED: {bad}" if bad else verdict
    return row


PROMPT = "the cat sat on"


def _cell(value) -> str:
    if value == "verified":
        return "yes"
    if isinstance(value, str) and value.startswith("on layers"):
        return value.replace("on layers ", "layers ").replace(" only", "")
    return "no"


def _ok(r, components) -> bool:
    return all(_cell(r.get(c)) != "no" for c in components)


def _sublayers(r) -> bool:
    """The stream and what each sub-layer adds: attn_out and mlp_out, a mixer standing for either."""
    mixer = _cell(r.get("mixer_out")) != "no"
    return _ok(r, ("resid_pre", "resid_post")) and all(_ok(r, (c,)) or mixer for c in ("attn_out", "mlp_out"))


def _table(rows: list, reasons: list, label: str = "") -> list:
    """The markdown table of ``rows``; each refusal's reason is appended to ``reasons`` (``label`` after the type)."""
    from reftgraph.core.sites import COMPONENTS

    lines = ["| type | style | q/k/v | " + " | ".join(COMPONENTS) + " |", "|" + "---|" * (3 + len(COMPONENTS))]
    for r in rows:
        if "error" in r:
            reasons.append(f"- `{r['type']}`{label}: {r['error']}")
            continue
        cells = [_cell(r.get(c)) for c in COMPONENTS]
        lines.append(f"| {r['type']} | {', '.join(r['style'])} | {', '.join(r['layout'])} | " + " | ".join(cells) + " |")
        for c in COMPONENTS:
            # not listed: a block with attention has no mixer_out, a block of one stack no cross-attention
            expected = (c == "mixer_out" and "has attention, not a" in str(r.get(c))) or (
                c == "cross_attn_out" and "has no cross-attention" in str(r.get(c)))
            if _cell(r.get(c)) == "no" and not expected:
                reasons.append(f"- `{r['type']}`{label} {c}: {r.get(c)}")
    return lines


def _kind_totals(rows: list, prefix: str) -> dict:
    built = [r for r in rows if "error" not in r]
    stacks = ("", "encoder.") if prefix == "seq2seq" else ("",)   # (an encoder-decoder: both stacks)

    def ok(r, components):
        return _ok(r, [s + c for s in stacks for c in components])

    out = {f"{prefix}_types": len(rows), f"{prefix}_built": len(built),
           f"{prefix}_resid_attn_mlp": sum(ok(r, ("resid_pre", "resid_post", "attn_out", "mlp_out")) for r in built),
           f"{prefix}_heads": sum(ok(r, ("head_out", "q", "k", "v")) for r in built),
           f"{prefix}_oracle_failures": sum(any(str(v).startswith("ORACLE") for v in r.values()) for r in built)}
    if prefix == "seq2seq":
        out["seq2seq_cross"] = sum(_ok(r, ("cross_attn_out",)) for r in built)
    return out


SECTIONS = {   # kind -> (heading, what the section covers)
    "encoder": ("Encoders", ["Every encoder type that transformers builds as a masked LM (`AutoModelForMaskedLM`), "
                             "wrapped and", "proven the same way; attention runs both ways, so a key or value edit "
                             "moves every position."]),
    "vlm": ("Vision-language text towers", ["Every type that transformers builds as an image-text-to-text model "
                                            "(`AutoModelForImageTextToText`):", "its text tower, found through "
                                            "`get_decoder()`, wrapped and proven on text (image tokens are "
                                            "positions of that tower)."]),
    "seq2seq": ("Encoder-decoders", ["Every type that transformers builds as a text encoder-decoder "
                                     "(`AutoModelForSeq2SeqLM`): both stacks", "wrapped and proven, each "
                                     "component checked in each stack (`stack=\"encoder\"` / the decoder);",
                                     "`cross_attn_out` is what a decoder block's cross-attention adds. Run "
                                     "teacher-forced: the decoder reads the prompt's tokens too."]),
}


def _stack_rows(rows: list, stack: str) -> list:
    """Encoder-decoder rows as one stack's: the ``encoder.`` components, or the decoder's."""
    if stack == "decoder":
        return [{k: v for k, v in r.items() if not k.startswith("encoder.")} for r in rows]
    return [{k.removeprefix("encoder."): v for k, v in r.items() if k.startswith("encoder.") or k in (
        "type", "style", "layout", "error")} for r in rows]


def write_markdown(rows: list, path: Path, others: dict = None, tl: dict = None) -> dict:
    from reftgraph.core.sites import COMPONENTS

    built = [r for r in rows if "error" not in r]
    ok = _ok
    totals = {
        "types": len(rows), "built": len(built),
        "resid_attn_mlp": sum(ok(r, ("resid_pre", "resid_post", "attn_out", "mlp_out")) for r in built),
        "sublayers": sum(_sublayers(r) for r in built),
        "all_resid": sum(ok(r, ("resid_pre", "resid_post")) for r in built),
        "heads": sum(ok(r, ("head_out",)) for r in built),
        "qkv": sum(ok(r, ("q", "k", "v")) for r in built),
        "pattern": sum(ok(r, ("attn_pattern",)) for r in built),
        "head_inputs": sum(ok(r, ("q_in", "k_in", "v_in")) for r in built),
        "mlp_in": sum(ok(r, ("mlp_in",)) for r in built),
        "mixer": sum(_cell(r.get("mixer_out")) != "no" for r in built),
        "ends": sum(ok(r, ("embed", "logits_in", "logits")) for r in built),
        "oracle_failures": sum(any(str(r.get(c, "")).startswith("ORACLE") for c in COMPONENTS) for r in built),
    }
    lines = [
        "# Architectures",
        "",
        "Generated by `scripts/architectures.py` from the installed transformers: every causal-LM type is built",
        "from a tiny config (`reftgraph.arch.shrink`), its components are found from the module tree and proven",
        "on it (`reftgraph.arch.proofs`), and every accepted component is checked against a plain-hook edit.",
        "See [concepts](concepts.md#components) for what each component means in each block style. Below the",
        "causal LMs: [encoders](#encoders), [vision-language text towers](#vision-language-text-towers) and the",
        "[comparison with TransformerLens 4.3](#against-transformerlens-43).",
        "",
        f"- types: {totals['types']}; build from a small config and run: {totals['built']}",
        f"- `resid_pre`/`resid_post`/`attn_out`/`mlp_out` verified: {totals['resid_attn_mlp']}; with `mixer_out` "
        f"standing for a missing `attn_out` or `mlp_out` (state-space and recurrent blocks): {totals['sublayers']}",
        f"- `resid_pre`/`resid_post` verified: {totals['all_resid']}",
        f"- `head_out` verified: {totals['heads']}; `q`/`k`/`v` verified: {totals['qkv']}; "
        f"`attn_pattern` verified: {totals['pattern']}",
        f"- receiver inputs: `q_in`/`k_in`/`v_in` verified: {totals['head_inputs']}; `mlp_in` verified: "
        f"{totals['mlp_in']}",
        f"- the stream's ends: `embed`/`logits_in`/`logits` verified: {totals['ends']}",
        f"- `mixer_out` (state-space blocks) verified on some or all layers: {totals['mixer']}",
        f"- oracle failures: {totals['oracle_failures']}",
        "",
    ]
    reasons = []
    lines += _table(rows, reasons)
    for kind, kind_rows in (others or {}).items():
        if not kind_rows:
            continue
        got = _kind_totals(kind_rows, kind)
        totals.update(got)
        heading, about = SECTIONS[kind]
        both = " in both stacks" if kind == "seq2seq" else ""
        lines += ["", f"## {heading}", ""] + about + [
            "", f"- types: {got[kind + '_types']}; build from a small config and run: {got[kind + '_built']}",
            f"- `resid_pre`/`resid_post`/`attn_out`/`mlp_out` verified{both}: {got[kind + '_resid_attn_mlp']}",
            f"- `head_out`/`q`/`k`/`v` verified{both}: {got[kind + '_heads']}",
            f"- oracle failures: {got[kind + '_oracle_failures']}", ""]
        if kind == "seq2seq":
            lines += [f"- `cross_attn_out` verified: {got['seq2seq_cross']}", ""]
            for stack in ("encoder", "decoder"):
                lines += [f"### The {stack} stack", ""] + _table(_stack_rows(kind_rows, stack), reasons,
                                                                  f" ({stack})") + [""]
        else:
            lines += _table(kind_rows, reasons, f" ({kind})")
    if tl:
        table, counts = comparison(tl, {"causal": rows, **(others or {})})
        totals.update(counts)
        lines += ["", "## Against TransformerLens 4.3", "",
                  "Every architecture TransformerLens 4.3's `TransformerBridge` lists in its model registry",
                  "(`supported_models.json`, read from its own venv: a benchmark-only peer), and what reftgraph does",
                  "with the same transformers class here. A refusal names its reason.", "",
                  f"- architectures: {counts['tl_architectures']}; built here as a causal LM, encoder or "
                  f"vision-language model: {counts['tl_built_here']}",
                  f"- verified by reftgraph: {counts['tl_verified_here']}; refused (reason in the table): "
                  f"{counts['tl_refused_here']}", ""] + table
    lines += ["", "## Why components are refused", "",
              "- **Norm after the addition** (`post_ln`: BERT, RoBERTa, BART, Marian, OpenAI GPT, ...): defined, not",
              "  refused: `attn_out`/`mlp_out` are what the sub-layers add before the norms and `resid_mid` is the",
              "  first norm's output; edge circuits refuse these blocks (no head writes a term of the stream).",
              "  XLM keeps its sub-layers in lists outside any block module, so only its stream is found.",
              "- **Scaled additions** (`scaled`: Granite's `residual_multiplier`, MiniCPM3's depth scale): defined",
              "  as the scaled outputs, the scale read from each real block's own attribute; Granite 4.0",
              "  (GraniteMoeHybrid) scales its Mamba mixers the same way, and adds its experts' output and a shared",
              "  MLP's as one sum: `mlp_out` is read at the operation inside the block that adds them.",
              "- **Weighted additions** (`weighted`: `alpha * stream + beta * sublayer`, one weight per dimension:",
              "  Beam, Ergo, Dory, MiniMax, Gemma 4): defined as `beta *` the sub-layer, the weights measured on",
              "  each real block when the model is wrapped; `resid_mid` and edge circuits are refused there.",
              "- **No attention module** (Mamba, Mamba2, Falcon-Mamba, Zamba, Nemotron-H mixer layers, xLSTM,",
              "  RecurrentGemma, Jamba's Mamba layers): stream components, and `mixer_out` where the block's one",
              "  module besides its norms (and its MLP) is added to the stream (proven: `resid_pre + mixer_out`",
              "  is `resid_post`, or with an MLP `resid_mid`, and an addition to it moves that stream by exactly",
              "  the addition); hybrids have attention components on their attention layers.",
              "- **Mixture of experts**: `mlp_act` has no single down projection; `mlp_out` is verified.",
              "- **Streams laid out otherwise**: XLNet's tokens-first stream, the `n` vectors per token of",
              "  hyper-connections (DeepSeek V4, HunYuan V4, Qwen4-exp) and AltUp (Gemma 3n), ProphetNet's",
              "  predicting streams after the main one: `resid_pre`/`resid_post` are the token's vectors side by",
              "  side (width `n * d_model`, `n` from the model's config); the components inside those blocks are",
              "  refused with the layout as the reason.",
              "- **Blocks that do not see the input tokens** (CPM-Ant's prompt tokens, BLT's patches) or that run",
              "  several times per forward (HRM, Inkling's loop), or whose output is a named tuple (Reformer,",
              "  whose reversible layers also recompute their inputs in the backward): every component is refused.",
              "- **q/k norms over all heads** (OLMo2, ...): one head's `q`/`k` is not local; refused by locality.",
              "- **Compressed attention** (DeepSeek MLA, MiniCPM3): no `k`/`v` projections per head.",
              "- **Receiver inputs** (`q_in`/`k_in`/`v_in`, `mlp_in`) need their reader to read the stream itself or",
              "  one norm of it; a head input also needs its `q`/`k`/`v` (a q/k norm over all heads breaks locality).",
              "- **The stream's ends**: `embed` is refused where a norm or mixing lies between the embedding and the",
              "  first block (BLOOM's embedding norm); `logits` where the model changes the logits after its output",
              "  layer (Gemma 2's soft cap).",
              "", "## Refusals and failures, with the check that failed", ""] + reasons + [""]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return totals


TL_CACHE = ROOT / "benchmarks" / "results" / "transformer_lens_architectures.json"
TL_DATA = "transformer_lens/tools/model_registry/data/supported_models.json"


def transformer_lens_architectures(site: str = "") -> dict:
    """``{architecture class: (models, verified models)}`` that TransformerLens 4.3's bridge supports,
    read from its registry (``supported_models.json`` under ``site``, its site-packages; benchmark-only:
    it lives in a venv of its own) and kept in benchmarks/results; {} when neither is there."""
    found = sorted(Path(site).glob(f"lib/python*/site-packages/{TL_DATA}")) if site else []
    if found:
        registry = json.loads(found[0].read_text())
        out = {}
        for m in registry["models"]:
            n, v = out.get(m["architecture_id"], (0, 0))
            out[m["architecture_id"]] = (n + 1, v + (m.get("status") == 1))
        TL_CACHE.write_text(json.dumps({"source": f"transformer-lens {registry.get('generated_at', '')} registry",
                                        "architectures": out}, indent=1, sort_keys=True))
        return out
    return {k: tuple(v) for k, v in json.loads(TL_CACHE.read_text())["architectures"].items()} \
        if TL_CACHE.is_file() else {}


def _class_types() -> dict:
    """transformers class name -> (model type, kind: causal / encoder / vlm / seq2seq / other)."""
    from transformers.models.auto import modeling_auto

    kinds = {"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "causal", "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "encoder",
             "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "vlm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "seq2seq"}
    out = {}
    for name in sorted(n for n in dir(modeling_auto) if n.startswith("MODEL_") and n.endswith("_MAPPING_NAMES")):
        for model_type, classes in getattr(modeling_auto, name).items():
            for cls in classes if isinstance(classes, (tuple, list)) else (classes,):
                if kinds.get(name) or cls not in out:
                    out[cls] = (model_type, kinds.get(name, out.get(cls, (None, "other"))[1]))
    return out


def comparison(tl: dict, rows: dict) -> tuple[list, dict]:
    """Markdown lines comparing TransformerLens's architectures with this survey, and counts."""
    classes = _class_types()
    lines = ["| TransformerLens architecture | models (verified) | transformers type | reftgraph |", "|---|---|---|---|"]
    counts = {"tl_architectures": len(tl), "tl_built_here": 0, "tl_verified_here": 0, "tl_refused_here": 0}
    for arch, (n, verified) in sorted(tl.items()):
        model_type, kind = classes.get(arch, (None, None))
        row = next((r for r in rows.get(kind, []) if r["type"] == model_type), None)
        bare = kind == "other" and any(r["type"] == model_type for r in rows["causal"])
        if bare:   # the bare decoder (BloomModel): judged as its causal LM class, which reftgraph wraps
            row = next(r for r in rows["causal"] if r["type"] == model_type)
        if model_type is None:
            status = "not in this transformers (a remote-code class)"
        elif row is None:
            status = {"seq2seq": "an encoder-decoder: not wrapped yet", "other": "not a text model: not wrapped"}.get(
                kind, f"not surveyed as {kind}")
        elif "error" in row:
            status = f"does not build here: {row['error']}"
        elif _ok(row, ("resid_pre", "resid_post", "attn_out", "mlp_out")) or _cell(row.get("mixer_out")) != "no":
            status = "verified" + ("" if _ok(row, ("head_out", "q", "k", "v")) else " (stream and sub-layers; heads: "
                                   + str(row.get("head_out") if _cell(row.get("head_out")) == "no" else row.get("q"))
                                   .split(" (")[0][:90] + ")")
        else:
            status = "stream only: " + str(row.get("attn_out")).split(" (")[0][:120]
        if bare:
            status = f"the bare decoder: wrap its causal LM class ({status})"
        counts["tl_built_here"] += row is not None and "error" not in row
        counts["tl_verified_here"] += status.startswith("verified") or (bare and "(verified" in status)
        counts["tl_refused_here"] += row is not None and "error" not in row and "verified" not in status
        lines.append(f"| {arch} | {n} ({verified}) | {model_type or '-'} | {status} |")
    return lines, counts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", help="model types (default: all causal-LM types)")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/architectures.md")
    parser.add_argument("--no-oracle", action="store_true", help="proofs only")
    parser.add_argument("--encoders", nargs="*", help="encoder types (default: all, when --types is not given)")
    parser.add_argument("--vlms", nargs="*", help="vision-language types (default: all, when --types is not given)")
    parser.add_argument("--seq2seq", nargs="*", help="encoder-decoder types (default: all, when --types is not given)")
    parser.add_argument("--transformer-lens", default="/tmp/tlvenv", help="a venv holding transformer-lens 4.3 "
                        "(its registry is read; without it, the copy in benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    types = args.types if args.types is not None else causal_lm_types()
    chosen = {"encoder": (args.encoders, encoder_types), "vlm": (args.vlms, vision_language_types),
              "seq2seq": (args.seq2seq, seq2seq_types)}
    kinds = {kind: given if given is not None else [] if args.types is not None else every()
             for kind, (given, every) in chosen.items()}
    start = time.perf_counter()
    rows, others = [], {kind: [] for kind in kinds}
    for kind, names, out in [("causal", types, rows)] + [(k, kinds[k], others[k]) for k in kinds]:
        for t in names:
            out.append(survey(t, with_oracle=not args.no_oracle, kind=kind))
            print(kind, t, {k: v for k, v in out[-1].items() if k in ("error", "style", "layout", "wrap_s")},
                  flush=True)
    totals = {"seconds": round(time.perf_counter() - start, 1)}
    if not args.no_write:
        tl = transformer_lens_architectures(args.transformer_lens) if args.types is None else {}
        totals.update(write_markdown(rows, ROOT / "docs" / "architectures.md", others, tl))
    else:
        for kind, kind_rows in others.items():
            totals.update(_kind_totals(kind_rows, kind) if kind_rows else {})
    everything = rows + [r for kind_rows in others.values() for r in kind_rows]
    wraps = sorted(r["wrap_s"] for r in everything if "wrap_s" in r)
    totals["median_wrap_s"] = round(wraps[len(wraps) // 2], 3) if wraps else None
    print(json.dumps(totals))
    return {"rows": rows, **totals}


if __name__ == "__main__":
    main()
