"""Two of MIB's circuit tasks, generated from templates: two-operand arithmetic and
colour-object multiple choice (MCQA). Each is a :class:`reftgraph.patching.Counterfactual`
whose clean and corrupted prompts have the same tokens but for the ones that change the
answer, so they line up one for one (what edge scores and circuits need).

>>> from reftgraph.datasets import arithmetic, mcqa
>>> data = arithmetic(2, seed=0)
>>> data.source[0], data.correct[0], data.base[0], data.wrong[0]
('59+63=', '1', '19+63=', '8')
>>> print(mcqa(1).source[0])
The book is pink. What color is the book?
A. brown
B. red
C. black
D. pink
Answer:
"""

from __future__ import annotations

import random

__all__ = ["arithmetic", "mcqa", "COLOURS", "THINGS"]

# every colour and object is one token (with its leading space) for SmolLM2
COLOURS = "red blue green yellow black white brown pink purple orange gray".split()
THINGS = "apple car ball hat cup shirt book chair door box pen bag".split()
LETTERS = "ABCD"


def arithmetic(n: int, seed: int = 0, ops: tuple = ("+", "-")):
    """``n`` two-digit additions and subtractions: ``"73+22="`` -> ``"9"`` (the first digit of
    the result). The corrupted prompt changes the first operand's tens digit, so the first digit
    of its result differs (the wrong answer).

    >>> data = arithmetic(4, seed=1, ops=("-",))
    >>> all(p.endswith("=") and "-" in p for p in data.source), len(data.source[0]) == len(data.base[0])
    (True, True)

    Rows alternate the operations in ``ops``; subtractions never go below 10.
    """
    from ..methods.patching import Counterfactual

    rng = random.Random(seed)
    base, source, correct, wrong, meta = [], [], [], [], []
    for i in range(n):
        op = ops[i % len(ops)]
        while True:
            a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
            c = (c // 10) * 10 + a % 10                 # the corrupted operand: another tens digit
            results = [x + b if op == "+" else x - b for x in (a, c)]
            if min(results) >= 10 and str(results[0])[0] != str(results[1])[0]:
                break
        source.append(f"{a}{op}{b}=")
        base.append(f"{c}{op}{b}=")
        correct.append(str(results[0])[0])
        wrong.append(str(results[1])[0])
        meta.append({"op": op, "a": a, "b": b, "result": results[0], "corrupted": c})
    return Counterfactual(base, source, correct, wrong, meta)


def mcqa(n: int, seed: int = 0):
    """``n`` colour-object multiple-choice questions: the object's colour is stated, four options
    follow, the answer is the letter of the stated colour (``" A"`` ...). The corrupted prompt lists
    the same options in another order, so its answer is another letter (the wrong answer).

    >>> data = mcqa(3, seed=2)
    >>> [(c, w) for c, w in zip(data.correct, data.wrong)]
    [(' C', ' D'), (' D', ' C'), (' D', ' B')]
    """
    from ..methods.patching import Counterfactual

    rng = random.Random(seed)
    base, source, correct, wrong, meta = [], [], [], [], []
    for _ in range(n):
        thing = rng.choice(THINGS)
        options = rng.sample(COLOURS, 4)
        colour = rng.choice(options)
        shuffled = options[:]
        while shuffled.index(colour) == options.index(colour):
            rng.shuffle(shuffled)

        def prompt(order):
            lines = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, order))
            return f"The {thing} is {colour}. What color is the {thing}?\n{lines}\nAnswer:"

        source.append(prompt(options))
        base.append(prompt(shuffled))
        correct.append(" " + LETTERS[options.index(colour)])
        wrong.append(" " + LETTERS[shuffled.index(colour)])
        meta.append({"object": thing, "colour": colour, "options": options, "corrupted": shuffled})
    return Counterfactual(base, source, correct, wrong, meta)
