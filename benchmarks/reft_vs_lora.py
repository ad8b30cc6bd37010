"""LoReFT against LoRA (peft) on the demo task, same examples, epochs, batches, schedule and KL term.

The task: answer in a style, CAPITALS or Title Case (the 90 training rows of
``reftgraph.experiments.style.style_pairs``: the model's own answers, rewritten); scored on the 30
held-out questions (share of answers in the style, 24 new tokens, greedy, chat template).
Content kept: capital-city questions the base model gets right ("What is the capital of
Germany?" -> Berlin; none of these countries is in the training data); the share still
answered right after training (case-insensitive). Each method runs at two learning rates and
each KL weight: ``--kl 0 1`` trains without and with ``kl_weight x KL(unedited || edited)``
on 40 neutral fact questions with the model's own answers rewritten in the style,
case-folded (``rg.train(..., kl_weight=, kl_data=..., kl_groups="case")``, as
``reftgraph.experiments.style``; for LoRA the same term, the unedited model being the one with its
adapters disabled).

    pip install peft      # benchmark-only: pip install -e ".[bench]"
    python benchmarks/reft_vs_lora.py [--style title] [--kl 0 1] [--only loreft-2-layers lora-r4] [--lr 6e-3]

Every run is appended to benchmarks/results/reft_vs_lora.jsonl; the last line printed is JSON.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

import reftgraph as rg
from reftgraph import datasets
from reftgraph.engine.prompts import format_prompt
from reftgraph.experiments.style import STYLES, style_pairs
from reftgraph.training import lm_loss
from reftgraph.training.data import collate_lm
from reftgraph.training.loop import linear_schedule
from reftgraph.training.losses import case_groups, kl_to_base
from reftgraph.training.supervised import kl_batches

METHODS = {   # name: (kind, settings, learning rates)
    "loreft-demo": ("reft", dict(layers=[4, 10, 16, 22], positions="f5+l5", rank=4), (2e-3, 6e-3)),
    "loreft-2-layers": ("reft", dict(layers=[10, 16], positions="f5+l5", rank=4), (2e-3, 6e-3)),
    "loreft-2-positions": ("reft", dict(layers=[4, 10, 16, 22], positions="f1+l1", rank=4), (2e-3, 6e-3)),
    "lora-r4": ("lora", dict(r=4), (2e-4, 1e-3)),
    "lora-r8": ("lora", dict(r=8), (2e-4, 1e-3)),
}
NEW_TOKENS = 24
RESULTS = Path(__file__).parent / "results" / "reft_vs_lora.jsonl"


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


def kl_facts(style):
    """The KL rows of the recipe: the neutral facts with the model's answers in the style."""
    rewrite = STYLES[style][0]
    return [(q, rewrite(a)) for q, a in datasets.facts()]


def lora_kl(model, lm, facts, rows, kl_weight, groups):
    """rg.train's KL term for a peft model: the unedited model is the one with adapters disabled."""
    inputs, _, labels = collate_lm(lm, [format_prompt(lm.tokenizer, facts[i][0], "chat") for i in rows],
                                   [facts[i][1] for i in rows])
    keep = labels[:, 1:] != -100
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).logits[:, :-1][keep]
    return kl_weight * kl_to_base(model(**inputs).logits[:, :-1][keep], base, groups)


def train_lora(lm, pairs, settings, lr, epochs, kl_weight=0.0, style="title", batch_size=8, seed=0):
    """LoRA on the attention projections, trained like rg.train (AdamW, 10% warm-up then
    linear decay, gradient norm clipped at 1, the same batches and KL rows)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=settings["r"], lora_alpha=2 * settings["r"], lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(lm.hf, config)
    params = [p for p in model.parameters() if p.requires_grad]
    n_batches = math.ceil(len(pairs) / batch_size)
    steps = n_batches * epochs
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(steps, 0.1))
    prompts = [format_prompt(lm.tokenizer, p, "chat") for p, _ in pairs]
    groups = case_groups(lm.tokenizer, lm.hf.get_output_embeddings().weight.shape[0]) if kl_weight else None
    facts = kl_facts(style)
    model.train()
    losses = []
    for epoch in range(epochs):
        kl_rows = kl_batches(len(facts), n_batches, seed, epoch) if kl_weight else [None] * n_batches
        for rows, kl_part in zip(batches(len(pairs), batch_size, seed, epoch), kl_rows):
            inputs, _, labels = collate_lm(lm, [prompts[i] for i in rows], [pairs[i][1] for i in rows])
            loss = lm_loss(model(**inputs).logits, labels)
            if kl_weight:
                loss = loss + lora_kl(model, lm, facts, kl_part, kl_weight, groups)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    model.eval()
    return model, sum(p.numel() for p in params), steps, losses[-1]


def run_one(name, lr, epochs, style, kl_weight, questions, facts):
    kind, settings, _ = METHODS[name]
    lm = rg.load()   # a fresh copy: LoRA changes the model's modules
    pairs = style_pairs(style)[0]
    t = time.perf_counter()
    if kind == "reft":
        g = rg.reft_graph(lm, **settings)
        kl = dict(kl_weight=kl_weight, kl_data=kl_facts(style), kl_groups="case") if kl_weight else {}
        history = rg.train(g, lm, rg.data.PromptResponse(pairs, template="chat"), epochs=epochs, batch_size=8,
                           lr=lr, seed=0, progress=False, **kl)
        seconds = time.perf_counter() - t
        params, steps, loss = sum(p.numel() for p in g.parameters()), len(history), float(history["loss"].iloc[-1])

        def gen(prompts):
            return g.generate(lm, prompts, max_new_tokens=NEW_TOKENS, template="chat").texts
    else:
        model, params, steps, loss = train_lora(lm, pairs, settings, lr, epochs, kl_weight, style)
        seconds = time.perf_counter() - t

        def gen(prompts):
            return hf_generate(model, lm.tokenizer, prompts)
    styled = gen(questions)
    answers = gen(list(facts))
    return {"method": name, "style": style, "kl_weight": kl_weight, "lr": lr, "params": params,
            "s_per_step": seconds / steps, "final_loss": loss,
            "rate": sum(map(STYLES[style][1], styled)) / len(styled),
            "kept": sum(datasets.answered(a, facts[q]) for a, q in zip(answers, facts)) / len(facts),
            "sample": styled[0], "sample_fact": answers[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--style", choices=sorted(STYLES), default="title")
    ap.add_argument("--kl", type=float, nargs="+", default=[0.0, 1.0], help="KL weights (0: no KL term)")
    ap.add_argument("--only", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--lr", type=float, nargs="+", help="learning rates (default: each method's two)")
    args = ap.parse_args()
    lm = rg.load()
    questions = [q for q, _ in style_pairs(args.style)[1]]
    facts = dict(datasets.capital_questions())
    base = hf_generate(lm.hf, lm.tokenizer, list(facts))
    known = {q: a for (q, a), text in zip(facts.items(), base) if datasets.answered(text, a)}
    base_rate = sum(map(STYLES[args.style][1], hf_generate(lm.hf, lm.tokenizer, questions))) / len(questions)
    print(f"base model: {len(known)} of {len(facts)} capital questions right; {args.style} rate {base_rate:.2f}",
          flush=True)
    rows = []
    for name in args.only:
        for kl_weight in args.kl:
            for lr in args.lr or METHODS[name][2]:
                row = run_one(name, lr, args.epochs, args.style, kl_weight, questions, known)
                print(json.dumps(row), flush=True)
                RESULTS.parent.mkdir(exist_ok=True)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    print(f"\n{'method':>20} {'style':>5} {'kl':>4} {'lr':>7} {'params':>8} {'s/step':>7} {'rate':>5} {'kept':>5}")
    for r in rows:
        print(f"{r['method']:>20} {r['style']:>5} {r['kl_weight']:>4g} {r['lr']:>7.0e} {r['params']:>8} "
              f"{r['s_per_step']:>7.2f} {r['rate']:>5.2f} {r['kept']:>5.2f}")
    print(json.dumps({"known": len(known), "runs": [{k: v for k, v in r.items() if not k.startswith("sample")}
                                                     for r in rows]}))


if __name__ == "__main__":
    main()
