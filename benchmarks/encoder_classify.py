"""LoReFT against LoRA (peft) on a real encoder: all-MiniLM-L6-v2 classifying templated reviews.

The task: ``reftgraph.datasets.sentiment()``: is a short review positive or negative? A third
of the reviews are plain ("the meal was dreadful."), a third negated ("... was not dreadful.")
and a third contrasted ("the show was dull, but the meal was lovely."), so a bag of words is
not enough. 600 training rows; 300 held-out rows whose adjectives no training row has (4 of
each polarity), so a method scores on them only through what the encoder already knows.
Every method puts a linear head on the mean over the tokens of the last hidden state (how
MiniLM is pooled as a sentence encoder) and trains with the same rows, epochs, batches, AdamW
and linear schedule:

- ``probe``: the head alone;
- ``loreft-r4``: ``rg.reft_graph(lm, layers=[1, 3, 5], positions="all", rank=4)`` and the head
  (a ``Classify`` node), trained by ``rg.train``;
- ``lora-r4``: peft LoRA, rank 4, on every query and value projection, and the head.

    pip install -e ".[bench]"     # peft, benchmark-only
    python benchmarks/encoder_classify.py [--seeds 0 1 2] [--epochs 4]

Prints one row per method and learning rate (held-out accuracy, median over seeds, trainable
parameters, seconds) and a last line of JSON.
"""

import argparse
import json
import statistics
import time

import torch

import reftgraph as rg
from reftgraph import datasets
from reftgraph.arch.hub import load_pretrained
from reftgraph.training.loop import linear_schedule

MODEL = "all-MiniLM-L6-v2"
LRS = {"probe": (3e-3, 1e-2), "loreft-r4": (3e-3, 1e-2), "lora-r4": (3e-4, 1e-3)}


def pooled(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def run_reft(lm, train, test, method, lr, epochs, batch, seed):
    torch.manual_seed(seed)
    g = rg.reft_graph(lm, layers=[1, 3, 5], positions="all", rank=4) if method == "loreft-r4" else rg.Graph()
    g.add(rg.Site("resid_post", layer=-1, positions="all"), rg.Classify(lm.arch.d_model, 2), name="cls")
    rg.train(g, lm, train, epochs=epochs, lr=lr, batch_size=batch, seed=seed, progress=False)
    params = sum(p.numel() for p in g.parameters() if p.requires_grad)
    with torch.no_grad():
        predicted = torch.cat([g.run(lm, test.texts[i:i + 64])["cls"].argmax(-1) for i in range(0, len(test), 64)])
    return float((predicted == torch.tensor(test.labels)).float().mean()), params


def run_lora(train, test, lr, epochs, batch, seed):
    from peft import LoraConfig, get_peft_model

    base, tok = load_pretrained(MODEL)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]))
    head = torch.nn.Linear(base.config.hidden_size, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    steps = epochs * ((len(train) + batch - 1) // batch)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(steps, 0.1))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(train), generator=gen).split(batch):
            enc = tok([train.texts[i] for i in rows], return_tensors="pt", padding=True)
            logits = head(pooled(model(**enc).last_hidden_state, enc["attention_mask"]))
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([train.labels[i] for i in rows]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        enc = tok(list(test.texts), return_tensors="pt", padding=True)
        predicted = head(pooled(model(**enc).last_hidden_state, enc["attention_mask"])).argmax(-1)
    return float((predicted == torch.tensor(test.labels)).float().mean()), sum(p.numel() for p in params)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=list(LRS))
    args = parser.parse_args(argv)
    train, test = datasets.sentiment()
    lm = rg.load(MODEL)
    total = sum(p.numel() for p in lm.hf.parameters())
    rows = []
    for method in args.only:
        for lr in LRS[method]:
            accs, start = [], time.perf_counter()
            for seed in args.seeds:
                if method == "lora-r4":
                    acc, params = run_lora(train, test, lr, args.epochs, args.batch, seed)
                else:
                    acc, params = run_reft(lm, train, test, method, lr, args.epochs, args.batch, seed)
                accs.append(acc)
            row = {"method": method, "lr": lr, "accuracy": statistics.median(accs), "accuracies": accs,
                   "params": params, "params_pct": round(100 * params / total, 4),
                   "seconds_per_run": round((time.perf_counter() - start) / len(args.seeds), 1)}
            rows.append(row)
            print(f"{method:>10} lr {lr:<7g} held-out accuracy {row['accuracy']:.3f} {accs}  params {params:,d} "
                  f"({row['params_pct']}% of {total:,d})  {row['seconds_per_run']} s/run", flush=True)
    print(json.dumps({"model": MODEL, "train": len(train), "test": len(test), "epochs": args.epochs, "rows": rows}))


if __name__ == "__main__":
    main()
