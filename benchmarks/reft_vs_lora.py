"""LoReFT against LoRA (peft) on the demo task, same examples, epochs, batches and schedule.

The task: answer in CAPITALS (the 90 shipped training rows of ``reftgraph.datasets.caps``);
scored on the 30 held-out questions (share of answers in capitals, 24 new tokens, greedy,
chat template). Content kept: factual questions whose answer the base model gets right
("What is the capital of Germany?" -> Berlin; none of these countries is in the training
data); the share still answered right after training (case-insensitive). Each method runs
at two learning rates; the table keeps every run and marks each method's best.

    pip install peft      # benchmark-only: pip install -e ".[bench]"
    python benchmarks/reft_vs_lora.py [--epochs 6] [--only loreft-demo lora-r4]
"""

import argparse
import json
import math
import time

import torch

import reftgraph as rg
from reftgraph import datasets
from reftgraph.engine.prompts import format_prompt
from reftgraph.training import lm_loss
from reftgraph.training.data import collate_lm
from reftgraph.training.loop import linear_schedule

METHODS = {   # name: (kind, settings, learning rates)
    "loreft-demo": ("reft", dict(layers=[4, 10, 16, 22], positions="f5+l5", rank=4), (2e-3, 6e-3)),
    "loreft-2-layers": ("reft", dict(layers=[10, 16], positions="f5+l5", rank=4), (2e-3, 6e-3)),
    "loreft-2-positions": ("reft", dict(layers=[4, 10, 16, 22], positions="f1+l1", rank=4), (2e-3, 6e-3)),
    "lora-r4": ("lora", dict(r=4), (2e-4, 1e-3)),
    "lora-r8": ("lora", dict(r=8), (2e-4, 1e-3)),
}
NEW_TOKENS = 24


def hf_generate(hf, tok, prompts):
    old = tok.padding_side
    tok.padding_side = "left"
    enc = tok([format_prompt(tok, p, "chat") for p in prompts], return_tensors="pt", padding=True)
    tok.padding_side = old
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def batches(n, batch_size, seed, epoch):
    """rg.train's batches: a seeded order per epoch, rows sorted within each batch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return [sorted(order[b:b + batch_size]) for b in range(0, n, batch_size)]


def train_lora(lm, pairs, settings, lr, epochs, batch_size=8, seed=0):
    """LoRA on the attention projections, trained like rg.train (AdamW, 10% warm-up then
    linear decay, gradient norm clipped at 1, the same batches)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=settings["r"], lora_alpha=2 * settings["r"], lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(lm.hf, config)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = math.ceil(len(pairs) / batch_size) * epochs
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(steps, 0.1))
    prompts = [format_prompt(lm.tokenizer, p, "chat") for p, _ in pairs]
    model.train()
    losses = []
    for epoch in range(epochs):
        for rows in batches(len(pairs), batch_size, seed, epoch):
            inputs, _, labels = collate_lm(lm, [prompts[i] for i in rows], [pairs[i][1] for i in rows])
            loss = lm_loss(model(**inputs).logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    model.eval()
    return model, sum(p.numel() for p in params), steps, losses[-1]


def run_one(name, lr, epochs, questions, facts):
    kind, settings, _ = METHODS[name]
    lm = rg.load()   # a fresh copy: LoRA changes the model's modules
    pairs = datasets.caps()[0]
    t = time.perf_counter()
    if kind == "reft":
        g = rg.reft_graph(lm, **settings)
        history = rg.train(g, lm, rg.data.PromptResponse(pairs, template="chat"), epochs=epochs, batch_size=8,
                           lr=lr, seed=0, progress=False)
        seconds = time.perf_counter() - t
        params, steps, loss = sum(p.numel() for p in g.parameters()), len(history), float(history["loss"].iloc[-1])

        def gen(prompts):
            return g.generate(lm, prompts, max_new_tokens=NEW_TOKENS, template="chat").texts
    else:
        model, params, steps, loss = train_lora(lm, pairs, settings, lr, epochs)
        seconds = time.perf_counter() - t

        def gen(prompts):
            return hf_generate(model, lm.tokenizer, prompts)
    caps = gen(questions)
    answers = gen(list(facts))
    return {"method": name, "lr": lr, "params": params, "s_per_step": seconds / steps, "final_loss": loss,
            "caps": sum(map(datasets.is_caps, caps)) / len(caps),
            "kept": sum(datasets.answered(a, facts[q]) for a, q in zip(answers, facts)) / len(facts),
            "sample": caps[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--only", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = ap.parse_args()
    lm = rg.load()
    questions = [q for q, _ in datasets.caps()[1]]
    facts = dict(datasets.capital_questions())
    base = hf_generate(lm.hf, lm.tokenizer, list(facts))
    known = {q: a for (q, a), text in zip(facts.items(), base) if datasets.answered(text, a)}
    print(f"base model: {len(known)} of {len(facts)} capital questions right; "
          f"caps rate {sum(map(datasets.is_caps, hf_generate(lm.hf, lm.tokenizer, questions))) / len(questions):.2f}",
          flush=True)
    rows = []
    for name in args.only:
        for lr in METHODS[name][2]:
            row = run_one(name, lr, args.epochs, questions, known)
            print(json.dumps(row), flush=True)
            rows.append(row)
    best = {}
    for r in rows:
        if r["method"] not in best or (r["caps"], r["kept"]) > (best[r["method"]]["caps"], best[r["method"]]["kept"]):
            best[r["method"]] = r
    print(f"\n{'method':>20} {'lr':>7} {'params':>8} {'s/step':>7} {'caps':>5} {'kept':>5}")
    for r in rows:
        mark = " *" if best[r["method"]] is r else ""
        print(f"{r['method']:>20} {r['lr']:>7.0e} {r['params']:>8} {r['s_per_step']:>7.2f} {r['caps']:>5.2f} "
              f"{r['kept']:>5.2f}{mark}")
    print(json.dumps({"known": len(known), "runs": [{k: v for k, v in r.items() if k != "sample"} for r in rows]}))


if __name__ == "__main__":
    main()
