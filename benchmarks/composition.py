"""The ReFT composition experiment on the default model: two behaviours in two groups of
dims of one rank-8 LoReFT, composed at inference.

``--method joint`` (the default; pyreft's composition notebook): one LoReFT at layer 15,
last prompt token, trained in ONE run over a shuffled mix of both tasks, each row tagged
with the dims it may use (per-row subspaces); at inference a call picks dims 0-3, 4-7 or
0-7; ``--both-rows K`` adds K rows showing both behaviours, tagged with dims 0-7.
``--method two-runs`` (what the project did before): one LoReFT per layer, the
groups trained one after the other:

Behaviour A (dims 0-3): answer in CAPITALS (``reftgraph.datasets.caps``).
Behaviour B (dims 4-7): start the answer with an emoji ("🙂 " + the model's own answer,
its first 24 tokens, generated here for the same 90 training questions).

Dims 0-3 are trained first; while dims 4-7 train, the gradient of R's first four columns
is zeroed, so A's directions (the QR of those columns alone) cannot move. Each behaviour's
rate is measured on 30 held-out questions with no edit, A alone, B alone and A | B, and
the principal angles between the two nodes' subspaces are reported.

    .venv/bin/python benchmarks/composition.py [--method joint|two-runs]
"""

import argparse
import json
import time

import reftgraph as rg
from reftgraph import datasets, subspace
from reftgraph.data import PromptResponse

EMOJI = "🙂"
LAYERS = (4, 10, 16, 22)
POSITIONS = "f5+l5"


SIGN_OFF = "Over and out!"


def rates(texts):
    caps = sum(datasets.is_caps(t) for t in texts) / len(texts)
    emoji = sum(t.lstrip().startswith(EMOJI) for t in texts) / len(texts)
    sign_off = sum(SIGN_OFF.lower() in t.lower() for t in texts) / len(texts)
    return {"caps": caps, "emoji": emoji, "signoff": sign_off}


def build(lm, rank=8, seed=0):
    """Graphs A (dims 0-3) and B (dims 4-7) sharing one rank-8 LoReFT per layer."""
    a, b = rg.Graph(), rg.Graph()
    width = lm.arch.width("resid_post")
    for layer in LAYERS:
        op = rg.LoReFT(width=width, rank=rank, seed=seed + layer)
        half = rank // 2
        a.add(rg.Site("resid_post", layer=layer, positions=POSITIONS, subspace=tuple(range(half))), op,
              name=f"caps{layer}")
        b.add(rg.Site("resid_post", layer=layer, positions=POSITIONS, subspace=tuple(range(half, rank))), op,
              name=f"emoji{layer}")
    return a, b


def freeze_first_columns(graph, n):
    """Zero the gradient of the first ``n`` columns of each op's R^T parameter."""
    def hook(grad):
        grad = grad.clone()
        grad[:, :n] = 0
        return grad
    return [op.rotate.register_hook(hook) for op in {id(n.op): n.op for n in graph.nodes}.values()]


def joint(lm, train, natural, questions, args) -> tuple[dict, dict]:
    """One LoReFT, one run over both tasks with per-row dims; rates with each choice of dims."""
    g = rg.Graph()
    g.add(rg.Site("resid_post", layer=args.layer, positions="last"),
          rg.LoReFT(width=lm.arch.width("resid_post"), rank=8, seed=0), name="both")
    caps_dims, emoji_dims = [0, 1, 2, 3], [4, 5, 6, 7]
    second = (lambda r: f"{EMOJI} {r}") if args.second == "emoji" else (lambda r: f"{r} {SIGN_OFF}")
    rows = list(train) + [(q, second(r)) for (q, _), r in zip(train, natural)]
    dims = [caps_dims] * len(train) + [emoji_dims] * len(train)
    # --both-rows K: K more rows showing both behaviours at once, with dims 0-7 (not pyreft's recipe)
    rows += [(q, second(r).upper()) for (q, _), r in zip(train[:args.both_rows], natural)]
    dims += [caps_dims + emoji_dims] * min(args.both_rows, len(train))
    t = time.perf_counter()
    history = rg.train(g, lm, PromptResponse(rows, template="chat", subspaces=dims), epochs=args.epochs,
                       batch_size=8, lr=args.lr, seed=0)
    figures = {"train_seconds": round(time.perf_counter() - t, 1), "final_loss": float(history["loss"].iloc[-1])}
    samples = {}
    for label, choice in (("none", None), ("dims0-3", caps_dims), ("dims4-7", emoji_dims),
                          ("dims0-7", caps_dims + emoji_dims)):
        graph = rg.Graph() if choice is None else g
        extra = {} if choice is None else {"subspaces": choice}
        texts = graph.generate(lm, questions, max_new_tokens=args.max_new_tokens, template="chat", **extra).texts
        samples[label] = texts[:3]
        for key, value in rates(texts).items():
            figures[f"{key}_rate[{label}]"] = value
    for key, alone in (("caps", "dims0-3"), (args.second, "dims4-7")):
        figures[f"{key}_kept_with_both"] = figures[f"{key}_rate[dims0-7]"] / max(1e-9, figures[f"{key}_rate[{alone}]"])
    return figures, samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["joint", "two-runs"], default="joint")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--second", choices=["emoji", "signoff"], default="emoji",
                    help="the second behaviour (joint method): start with an emoji, or end with a sign-off")
    ap.add_argument("--both-rows", type=int, default=0,
                    help="joint method: also train this many rows with both behaviours and dims 0-7")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--answer-tokens", type=int, default=24, help="tokens of the model's own answers to train on")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lm = rg.load()
    train, held_out = datasets.caps()
    questions = [q for q, _ in held_out]
    train_q = [q for q, _ in train]
    gen = rg.Graph().generate(lm, train_q, max_new_tokens=args.answer_tokens, template="chat")
    natural = [t.strip() for t in gen.texts]
    print(f"generated the model's own answers to {len(train_q)} training questions in "
          f"{time.perf_counter() - t0:.0f}s")
    if args.method == "joint":
        figures, samples = joint(lm, train, natural, questions, args)
        figures["seconds"] = round(time.perf_counter() - t0, 1)
        return show(figures, samples)
    a, b = build(lm)
    figures = {}
    t1 = time.perf_counter()
    rg.train(a, lm, PromptResponse(train, template="chat"), epochs=args.epochs, batch_size=8, lr=args.lr)
    handles = freeze_first_columns(b, 4)
    basis_a = [subspace.basis(n)[1].clone() for n in a.nodes]
    data_b = PromptResponse([(q, f"{EMOJI} {r}") for q, r in zip(train_q, natural)], template="chat")
    rg.train(b, lm, data_b, epochs=args.epochs, batch_size=8, lr=args.lr)
    for h in handles:
        h.remove()
    figures["train_seconds"] = round(time.perf_counter() - t1, 1)
    drift = max(float((subspace.basis(n)[1] - before).abs().max()) for n, before in zip(a.nodes, basis_a))
    figures["caps_basis_drift_while_training_emoji"] = drift

    samples = {}
    for label, graph in (("none", rg.Graph()), ("caps", a), ("emoji", b), ("caps|emoji", a | b)):
        texts = graph.generate(lm, questions, max_new_tokens=args.max_new_tokens, template="chat").texts
        samples[label] = texts[:3]
        for key, value in rates(texts).items():
            figures[f"{key}_rate[{label}]"] = value
    for layer in LAYERS:
        angles = subspace.principal_angles(a[f"caps{layer}"], b[f"emoji{layer}"])
        figures[f"overlap[L{layer}]"] = subspace.overlap(a[f"caps{layer}"], b[f"emoji{layer}"])
        figures[f"min_angle_deg[L{layer}]"] = float(angles["degrees"].min())
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    show(figures, samples)


def show(figures: dict, samples: dict) -> None:
    for label, texts in samples.items():
        print(f"[{label}]")
        for t in texts:
            print(f"   {t!r}")
    for key, value in figures.items():
        print(f"{key:>40}: {value:.4f}" if isinstance(value, float) else f"{key:>40}: {value}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
