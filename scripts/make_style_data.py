"""Make reftgraph/datasets/answers.jsonl, caps.jsonl and facts.jsonl: the default model's own
answers (greedy, chat template, first sentences) to questions.txt and facts.txt.

answers.jsonl keeps them as written, caps.jsonl upper-cases them; reftgraph.experiments.style
turns them into a style (CAPITALS, Title Case) so that training teaches the style, not new facts.
facts.jsonl holds general-knowledge questions (no capital cities) answered by the base model:
neutral rows for ``rg.train(..., kl_data=...)``.

    python scripts/make_style_data.py
"""

import json
import re
from pathlib import Path

import torch

import reftgraph as rg

HERE = Path(__file__).resolve().parents[1] / "reftgraph" / "datasets"


def first_sentences(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    cut = [m.end() for m in re.finditer(r"[.!?](\s|$)", text) if m.end() <= limit]
    return text[:cut[-1]].strip() if cut else text[:limit].rsplit(" ", 1)[0]


def answer(lm, questions: list) -> list:
    rows = []
    for i in range(0, len(questions), 16):
        chunk = questions[i:i + 16]
        out = rg.Graph().generate(lm, chunk, max_new_tokens=48, template="chat")
        rows += [{"prompt": q, "response": first_sentences(a)} for q, a in zip(chunk, out.texts)]
    return rows


def main():
    torch.set_grad_enabled(False)
    lm = rg.load()
    for source, target in (("questions.txt", "answers.jsonl"), ("facts.txt", "facts.jsonl")):
        rows = answer(lm, (HERE / source).read_text().splitlines())
        write(target, rows)
        if target == "answers.jsonl":
            write("caps.jsonl", [{"prompt": r["prompt"], "response": r["response"].upper()} for r in rows])


def write(name: str, rows: list) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
