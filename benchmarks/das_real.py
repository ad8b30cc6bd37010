"""DAS on the default model (SmolLM2-135M-Instruct): where is "which country" kept?

"The capital of France is the city of" -> " Paris". A Rotate node at ``resid_pre[layer]``
on the country's last token (position -5 in every prompt) interchanges k rotated dims
from a source prompt about another country; the counterfactual answer is the source
country's capital. Trained on pairs of 40 countries, evaluated on pairs of held-out
countries never seen in training (``iia``), on new pairs of the training countries, and
on training pairs; also IIA of an untrained (random) rotation with the same k and of a
full patch of the site (all 576 dims). ``iia`` asks the subspace to carry the identity
of countries it never saw; with few countries a small subspace can memorise them instead.

    .venv/bin/python benchmarks/das_real.py --layer 12 --k 16
"""

import argparse
import json
import random
import time

import reftgraph as rg
from reftgraph.das import iia, train_das
from reftgraph.core.ops import Rotate
from reftgraph.patching import Counterfactual

CAPITALS = dict(
    France="Paris", Italy="Rome", Germany="Berlin", Japan="Tokyo", China="Beijing", Egypt="Cairo", Greece="Athens",
    Portugal="Lisbon", Austria="Vienna", Hungary="Budapest", Ireland="Dublin", Norway="Oslo", Sweden="Stockholm",
    Finland="Helsinki", Denmark="Copenhagen", Belgium="Brussels", Netherlands="Amsterdam", Iran="Tehran",
    Thailand="Bangkok", Indonesia="Jakarta", Philippines="Manila", Kenya="Nairobi", Ethiopia="Addis Ababa",
    Argentina="Buenos Aires", Chile="Santiago", Peru="Lima", Colombia="Bogota", Venezuela="Caracas",
    Mexico="Mexico City", Canada="Ottawa", Cuba="Havana", Romania="Bucharest", Bulgaria="Sofia", Serbia="Belgrade",
    Croatia="Zagreb", Czechia="Prague", Slovakia="Bratislava", Lebanon="Beirut", Syria="Damascus", Jordan="Amman",
    Israel="Jerusalem", Afghanistan="Kabul", Nepal="Kathmandu", Bangladesh="Dhaka", Tunisia="Tunis",
    Algeria="Algiers", Sudan="Khartoum", Uganda="Kampala", Iceland="Reykjavik", Estonia="Tallinn", Latvia="Riga",
    Armenia="Yerevan", Azerbaijan="Baku", Malaysia="Kuala Lumpur", Singapore="Singapore", Ecuador="Quito",
    Bolivia="La Paz", Uruguay="Montevideo", Jamaica="Kingston", Somalia="Mogadishu", Cambodia="Phnom Penh")
TEMPLATE = "The capital of {} is the city of"
POSITION = -5  # the country's last token: " is the city of" is 4 tokens after it


def first_token(lm, country):
    """The first token of the capital's name (with its space), as text."""
    return lm.tokenizer.decode(lm.tokenizer(" " + CAPITALS[country], add_special_tokens=False)["input_ids"][:1])


def pairs(lm, countries, n, seed, exclude=()):
    """``n`` distinct (base, source) country pairs, none of them in ``exclude``."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        pair = tuple(rng.sample(countries, 2))
        if pair not in rows and pair not in exclude:
            rows.append(pair)
    return rows, Counterfactual([TEMPLATE.format(b) for b, _ in rows], [TEMPLATE.format(s) for _, s in rows],
                                correct=[first_token(lm, s) for _, s in rows],
                                meta=[{"type": "country"} for _ in rows])


def known(lm, countries):
    """Countries whose capital the model names (its first token) without any edit, dropping
    capitals whose first token another one shares."""
    firsts = [first_token(lm, c) for c in countries]
    pred = rg.Graph().run(lm, [TEMPLATE.format(c) for c in countries]).next_token_logits.argmax(-1)
    ok = [c for c, f, p in zip(countries, firsts, pred.tolist()) if lm.tokenizer.decode([p]) == f]
    return [c for c in ok if firsts.count(first_token(lm, c)) == 1]


def graph_with(op, layer):
    g = rg.Graph()
    g.add(rg.Site("resid_pre", layer=layer, positions=[POSITION]), op, name="das")
    return g


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--train-pairs", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--test-pairs", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="a folder to save the trained graph in")
    args = ap.parse_args()
    t0 = time.perf_counter()
    lm = rg.load()
    countries = known(lm, list(CAPITALS))
    rng = random.Random(args.seed)
    rng.shuffle(countries)
    train_c, test_c = countries[:40], countries[40:]
    print(f"{len(countries)} of {len(CAPITALS)} capitals named by the model; {len(train_c)} train countries, "
          f"{len(test_c)} held out: {', '.join(sorted(test_c))}")
    seen, train = pairs(lm, train_c, args.train_pairs, args.seed + 1)
    _, new_pairs = pairs(lm, train_c, args.test_pairs, args.seed + 3, exclude=seen)
    _, test = pairs(lm, test_c, args.test_pairs, args.seed + 2)

    width = lm.arch.width("resid_pre")
    figures = {"layer": args.layer, "k": args.k}
    figures["iia_full_patch"] = iia(graph_with(rg.Patch("source"), args.layer), lm, test)["iia"].iloc[-1]
    g = graph_with(Rotate(width=width, k=args.k, seed=args.seed), args.layer)
    figures["iia_random_rotation"] = iia(g, lm, test)["iia"].iloc[-1]
    t1 = time.perf_counter()
    history = train_das(g, lm, train, epochs=args.epochs, batch_size=16, lr=args.lr, seed=args.seed)
    figures["train_seconds"] = round(time.perf_counter() - t1, 1)
    figures["final_loss"] = round(history["loss"].tail(5).mean(), 4)
    figures["iia_train_pairs"] = iia(g, lm, train.rows(slice(0, args.test_pairs)))["iia"].iloc[-1]
    figures["iia_new_pairs_of_train_countries"] = iia(g, lm, new_pairs)["iia"].iloc[-1]
    figures["iia"] = iia(g, lm, test)["iia"].iloc[-1]
    if args.save:
        g.save(args.save, model=lm)
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"resid_pre[{args.layer}] at the country token, k={args.k} of {width} dims, "
          f"{len(train)} training pairs x {args.epochs} epochs:")
    for key, value in figures.items():
        print(f"  {key:>20}: {value}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
