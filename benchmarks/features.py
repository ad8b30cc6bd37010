"""A TopK sparse autoencoder on SmolLM2-135M resid_post[16], trained here with EleutherAI's
sparsify (``pip install .[bench]``) on *Alice's Adventures in Wonderland* (public domain,
``../shared/data``), then used through reftgraph: quality, speed, a feature circuit for IOI
and the demo's caps LoReFT explained in features. Prints the figures; last line JSON.

    .venv/bin/python benchmarks/features.py [--epochs 40] [--latents 4608] [--k 32] [--retrain] [--generated N]
        [--seed 0] [--circuits-only] [--per-position] [--rank effect|magnitude|mean_abs] [--method atp|ig]
        [--fractions ...]

1. Activations: the book in 128-token windows, the last 10% held out; position 0 of each
   window (the attention sink, of far larger norm) is left out of training and splicing.
   ``--generated N`` adds about N tokens of text SmolLM2 samples itself from 32 varied
   openings (stories with names, recipes, news, questions), cached.
2. Training: ``sparsify.SparseCoder`` with its own loss (FVU plus the AuxK loss on dead
   latents), Adam, unit-norm decoder as sparsify's trainer keeps it; saved with its own
   ``save_to_disk`` and read back with ``rg.features.load`` (and checked against sparsify's
   forward on the held-out activations).
3. Quality on held-out windows: fraction of variance explained, L0, next-token loss clean /
   with the SAE spliced in (a graph whose node is the dictionary) / with the site zeroed,
   and the loss recovered.
4. Speed: ``Collect(basis=sae)`` of every feature at the site vs a plain ``Collect`` and the
   encoder applied after (medians, interleaved).
5. IOI: feature circuits at 1% of the features (AtP scores, or ``--method ig``; errors kept and ablated) and the
   node circuit of the same number of heads (ranked the same way), faithfulness by running each.
   ``--seed`` trains another dictionary with the same recipe (in a folder of its own).
6. The caps LoReFT of the first demo (rank 4, layers 10 and 16), its layer-16 node explained:
   the features nearest its subspace and their top contexts in the book.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import reftgraph as rg
from common import set_threads

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "alice_in_wonderland.txt"
CACHE = Path.home() / ".cache" / "reftgraph" / "saes" / "smollm2-135m-instruct"
LAYER, WINDOW = 16, 128


def windows(lm) -> list:
    ids = lm.tokenizer(BOOK.read_text())["input_ids"]
    return [lm.tokenizer.decode(ids[i:i + WINDOW]) for i in range(0, len(ids) - WINDOW, WINDOW)]


STARTS = ["Once upon a time,", "Yesterday, Sarah and Tom", "In the kitchen, Mary gave", "Dear John,",
          "The history of Rome", "The scientist explained that", "How to make bread:", "When Alice and Bob went to",
          "The news today:", "My favourite book is", "At the station, David told", "The recipe calls for",
          "In 1850, the city of", "The teacher asked the class", "Here is a short poem about the sea:",
          "The best way to learn Python is", "After the game, Emma and Lucas", "The weather in Paris",
          "Question: What is the capital of Japan? Answer:", "The old man walked slowly", "Chapter 1.",
          "Rachel handed the letter to", "Photosynthesis is the process", "The meeting started at nine, and",
          "Kevin and Laura were arguing about", "A list of things to pack for a trip:", "The king said to the queen",
          "Water boils at", "On Monday morning, the office", "The dog ran after the ball while", "Thank you for",
          "The company announced that"]


def generated(lm, tokens: int, seed: int = 0) -> list:
    """About ``tokens`` tokens of text SmolLM2 samples itself (temperature 1, top-p 0.95) from
    the starts above, cached beside the SAE; 128 new tokens per text."""
    path = CACHE / f"generated-{tokens}-{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    tok, texts, made = lm.tokenizer, [], 0
    side, tok.padding_side = tok.padding_side, "left"
    torch.manual_seed(seed)
    start = time.time()
    while made < tokens:
        enc = tok(STARTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = lm.hf.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=128,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        texts += tok.batch_decode(out, skip_special_tokens=True)
        made += int((out[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).sum())
        print(f"  generated {made} tokens ({time.time() - start:.0f} s)", flush=True)
    tok.padding_side = side
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts))
    return texts


def activations(lm, texts, batch=16) -> torch.Tensor:
    g = rg.Graph()
    g.add(rg.Site("resid_post", LAYER, positions=slice(1, None)), rg.Collect(), name="h")
    rows = []
    for i in range(0, len(texts), batch):
        out = g.run(lm, texts[i:i + batch], grad=False)
        rows.append(out["h"][out.valid["h"]].float())
    return torch.cat(rows)


def train(acts: torch.Tensor, latents: int, k: int, epochs: int, folder: Path, target=None, seed: int = 0) -> dict:
    """sparsify's SparseCoder trained on ``acts`` (to reconstruct them, or ``target``: a transcoder)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sae = SparseCoder(acts.shape[1], SparseCoderConfig(num_latents=latents, k=k, transcode=target is not None))
    with torch.no_grad():
        sae.b_dec.copy_((acts if target is None else target).mean(0))
    lr = 2e-4 / (latents / 2 ** 14) ** 0.5           # sparsify's default learning rate for this width
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since = torch.zeros(latents, dtype=torch.long)
    batch, start, losses = 1024, time.time(), []
    for epoch in range(epochs):
        order = torch.randperm(len(acts))
        for i in range(0, len(acts) - batch + 1, batch):
            at = order[i:i + batch]
            x = acts[at]
            out = sae(x, None if target is None else target[at], dead_mask=since > 20_000)
            loss = out.fvu + out.auxk_loss / 32
            opt.zero_grad()
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            sae.set_decoder_norm_to_unit_norm()
            fired = torch.zeros(latents, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since = torch.where(fired, 0, since + len(x))
            losses.append(float(out.fvu.detach()))
        print(f"  epoch {epoch + 1}/{epochs}: fvu {statistics.mean(losses[-10:]):.4f}", flush=True)
    sae.save_to_disk(folder)
    return {"train_seconds": round(time.time() - start, 1), "train_tokens": len(acts), "lr": lr,
            "dead_latents": int((since > 20_000).sum())}


def losses(lm, texts, graph) -> float:
    """Mean next-token loss over positions 1.. of each window."""
    total = count = 0.0
    for i in range(0, len(texts), 8):
        out = graph.run(lm, texts[i:i + 8], grad=False)
        mask = out.attention_mask.bool()
        logits, ids = out.logits[:, 1:-1].float(), out.input_ids[:, 2:]
        keep = mask[:, 2:] & mask[:, 1:-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        total += float(ce[keep].sum())
        count += int(keep.sum())
    return total / count


def speed(lm, sae, texts) -> dict:
    site = rg.Site("resid_post", LAYER)
    basis, plain = rg.Graph(), rg.Graph()
    basis.add(site, rg.Collect(basis=sae), name="f")
    plain.add(site, rg.Collect(), name="h")
    texts = texts[:16]
    fns = {"basis": lambda: basis.run(lm, texts, grad=False)["f"],
           "plain+encode": lambda: sae.encode(plain.run(lm, texts, grad=False)["h"])}
    times = {k: [] for k in fns}
    for k in fns:
        fns[k]()
    for _ in range(7):
        for k, fn in fns.items():
            t = time.perf_counter()
            with torch.no_grad():
                fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"collect_basis_s": round(med["basis"], 3), "collect_plain_encode_s": round(med["plain+encode"], 3),
            "collect_ratio": round(med["basis"] / med["plain+encode"], 3)}


def ioi(lm, sae, fractions, per_position: bool = False, rank: str = "effect", method: str = "atp") -> dict:
    """Feature circuits at each fraction of the features (errors kept / ablated) and node
    circuits of as many heads, scored on 24 prompts and run on 24 held-out ones; per position:
    fractions of all (feature, position) pairs, against node circuits of (head, position) pairs."""
    data, held = rg.datasets.ioi(24, seed=0), rg.datasets.ioi(24, seed=1)
    sites = {rg.Site("resid_post", LAYER): sae}
    table = rg.features.attribute(lm, data, sites, progress=False, per_position=per_position, method=method)
    heads = rg.circuits.scores(lm, data, progress=False, per_position=per_position, rank=rank)
    width = int(table.position.max()) + 1 if per_position else 1
    out, rows = {}, []
    for fraction in fractions:
        size = max(1, round(fraction * sae.d_sae * width))
        row = {"fraction": fraction, "features": size}
        for errors in ("keep", "ablate"):
            c = rg.features.discover(lm, data, sites, size=size, errors=errors, table=table, progress=False, rank=rank)
            row[f"errors_{errors}"] = round(rg.features.faithfulness(c, lm, held, progress=False)["faithfulness"], 3)
        n = min(size, len(heads))
        nodes = rg.circuits.discover(lm, data, size=n, table=heads, progress=False, rank=rank)
        row["heads"], row["node_circuit"] = n, round(rg.circuits.faithfulness(nodes, lm, held, progress=False)["normalised"], 3)
        rows.append(row)
        print(f"  {fraction:>5.0%} = {size} features: errors kept {row['errors_keep']}, ablated {row['errors_ablate']}; "
              f"{n} heads: {row['node_circuit']}", flush=True)
    one = next(r for r in rows if r["fraction"] == 0.01)
    out.update(ioi_per_position=per_position, ioi_positions=width, ioi_rank=rank, ioi_method=method, ioi_features_kept=one["features"], ioi_feature_faithfulness_errors_keep=one["errors_keep"],
               ioi_feature_faithfulness_errors_ablate=one["errors_ablate"], ioi_node_faithfulness=one["node_circuit"],
               ioi_curve=rows)
    return out


def explain_caps(lm, sae, texts) -> dict:
    from reftgraph.cli.main import caps_experiment

    result = caps_experiment(lm, progress=False)
    graph = result["graph"] if isinstance(result, dict) else result.graph
    node = next(n for n in graph.nodes if n.site.layer == LAYER)
    table = rg.features.explain(node, sae, top=8)
    short = [t for text in texts for t in (text[:len(text) // 2], text[len(text) // 2:])]
    contexts = rg.features.top_contexts(lm, short, rg.Site("resid_post", LAYER, positions=slice(1, None)), sae,
                                        features=table.feature.tolist(), k=3, progress=False)
    print("\ncaps LoReFT (layer 16) in features:")
    print(table.to_string(index=False))
    print(contexts[["feature", "rank", "activation", "context"]].to_string(index=False))
    random_cos = (4 / sae.d_in) ** 0.5
    return {"caps_top_features": table.feature.tolist(), "caps_top_cosines": [round(c, 3) for c in table.cosine],
            "caps_random_cosine": round(random_cos, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="the training seed (another seed: another folder)")
    parser.add_argument("--generated", type=int, default=0,
                        help="also train on about this many tokens SmolLM2 generates itself (cached)")
    parser.add_argument("--skip-caps", action="store_true")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.01, 0.02, 0.05, 0.1, 0.25])
    parser.add_argument("--per-position", action="store_true",
                        help="IOI circuits of (feature, position) pairs, against (head, position) node circuits")
    parser.add_argument("--circuits-only", action="store_true", help="skip the quality and speed figures")
    parser.add_argument("--method", default="atp", choices=("atp", "ig"),
                        help="how the features are scored: AtP, or integrated gradients (5 steps)")
    parser.add_argument("--rank", default="effect", choices=("effect", "magnitude", "mean_abs"),
                        help="keep the largest signed effects, the largest |effects| (Marks et al.), or the largest "
                             "mean over prompts of each prompt's |effect|")
    args = parser.parse_args()
    set_threads()
    lm = rg.load()
    texts = windows(lm)
    split = int(0.9 * len(texts))
    train_texts, held = texts[:split], texts[split:]
    extra = (f"-gen{args.generated}" if args.generated else "") + (f"-seed{args.seed}" if args.seed else "")
    folder = CACHE / f"resid_post{LAYER}-topk{args.k}-{args.latents}{extra}" / f"layers.{LAYER}"
    if args.circuits_only:     # the SAE trained by an earlier run; IOI circuits alone
        figures = ioi(lm, rg.features.load(folder), sorted(set(args.fractions) | {0.01}), args.per_position, args.rank,
                      args.method)
        print(json.dumps(figures))
        return
    if args.generated:
        train_texts = train_texts + generated(lm, args.generated)
    figures = {"windows_train": len(train_texts), "windows_held_out": len(held)}
    start = time.time()
    acts = activations(lm, train_texts)
    figures["collect_seconds"] = round(time.time() - start, 1)
    if args.retrain or not (folder / "sae.safetensors").exists():
        figures.update(train(acts, args.latents, args.k, args.epochs, folder, seed=args.seed))
    sae = rg.features.load(folder)
    test = activations(lm, held)
    with torch.no_grad():
        f = sae.encode(test)
        recon = sae.decode(f)
        from sparsify import SparseCoder
        theirs = SparseCoder.load_from_disk(folder)(test).sae_out
    figures["max_rel_diff_vs_sparsify"] = float((recon - theirs).abs().max() / theirs.abs().max())
    figures["fve_held_out"] = round(float(1 - (test - recon).pow(2).sum() / (test - test.mean(0)).pow(2).sum()), 4)
    figures["l0"] = round(float((f != 0).sum(-1).float().mean()), 2)
    spliced, zeroed = rg.Graph(), rg.Graph()
    spliced.add(rg.Site("resid_post", LAYER, positions=slice(1, None)), sae, name="sae")
    zeroed.add(rg.Site("resid_post", LAYER, positions=slice(1, None)), rg.Ablate("zero"), name="zero")
    clean, with_sae, zero = (losses(lm, held, g) for g in (rg.Graph(), spliced, zeroed))
    figures.update(loss_clean=round(clean, 4), loss_spliced=round(with_sae, 4), loss_zero=round(zero, 4),
                   loss_increase=round(with_sae - clean, 4),
                   loss_recovered=round((zero - with_sae) / (zero - clean), 4))
    figures.update(speed(lm, sae, held))
    figures.update(ioi(lm, sae, sorted(set(args.fractions) | {0.01}), args.per_position, args.rank, args.method))
    if not args.skip_caps:
        figures.update(explain_caps(lm, sae, held))
    for key, value in figures.items():
        print(f"{key:>40}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
