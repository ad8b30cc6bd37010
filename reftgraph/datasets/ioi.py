"""The indirect-object identification (IOI) task, generated from templates.

"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect
object), not " John" (the subject, named twice). The corrupted prompt replaces the
three names by three other names ("ABC"), so it carries no information about which
name is the answer, while its tokens line up with the clean prompt's one for one.

>>> from reftgraph.datasets import ioi
>>> data = ioi(4, seed=0)
>>> data.source[0], data.correct[0], data.wrong[0]
('When Rose and Peter went to the market, Peter gave a bag to', ' Rose', ' Peter')
>>> data.base[0]
'When Alice and Sam went to the market, Emily gave a bag to'
"""

from __future__ import annotations

import random
from typing import Optional

# every name, place and object is one token (with its leading space) for SmolLM2
NAMES = ("Mary John Alice Bob Tom James Sarah Emma David Michael Anna Lisa Paul Mark Kate Jack Sam Max Ben "
         "Dan Tim Joe Lucy Amy Rose Grace Peter Henry Oliver Harry Jane Laura Emily Chris Steve Kevin Brian "
         "Eric Adam Ryan Luke Alex Ruth Helen").split()
PLACES = "store park school garden office station beach market restaurant hospital library kitchen".split()
OBJECTS = "drink book ball gift letter key bag ring cake flower pencil snack".split()
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
)


def ioi(n: int, seed: int = 0, templates: Optional[tuple] = None):
    """``n`` IOI rows as a :class:`reftgraph.patching.Counterfactual`: base = corrupted
    (ABC) prompts, source = clean prompts, correct = the indirect object, wrong = the subject.

    >>> data = ioi(2, seed=1, templates=(2,))
    >>> data.source[1], data.correct[1], data.wrong[1]
    ('While Jane and Alex were working at the market, Jane gave a drink to', ' Alex', ' Jane')

    ``templates`` (indices into :data:`TEMPLATES`; default the first one) picks the
    sentence frames; rows alternate which of the two names is the subject.
    """
    from ..methods.patching import Counterfactual

    rng = random.Random(seed)
    frames = [TEMPLATES[i] for i in (templates or (0,))]
    base, source, correct, wrong, meta = [], [], [], [], []
    for i in range(n):
        frame = frames[i % len(frames)]
        a, b, x, y, z = rng.sample(NAMES, 5)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        io, s = (a, b) if i % 2 == 0 else (b, a)
        source.append(frame.format(A=a, B=b, S=s, place=place, object=obj))
        base.append(frame.format(A=x, B=y, S=z, place=place, object=obj))
        correct.append(" " + io)
        wrong.append(" " + s)
        meta.append({"template": TEMPLATES.index(frame), "io": io, "s": s})
    return Counterfactual(base, source, correct, wrong, meta)
