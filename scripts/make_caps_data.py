"""Make reftgraph/datasets/caps.jsonl: the default model's own answers to the shipped
questions, in capitals. Training on them teaches a style (ALL CAPS), not new facts.

    python scripts/make_caps_data.py
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


def main():
    torch.set_grad_enabled(False)
    lm = rg.load()
    questions = (HERE / "questions.txt").read_text().splitlines()
    rows = []
    for i in range(0, len(questions), 16):
        chunk = questions[i:i + 16]
        out = rg.Graph().generate(lm, chunk, max_new_tokens=48, template="chat")
        for q, a in zip(chunk, out.texts):
            rows.append({"prompt": q, "response": first_sentences(a).upper()})
            print(rows[-1])
    with open(HERE / "caps.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
