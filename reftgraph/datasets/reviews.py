"""A templated sentiment task for encoders: is a short review positive or negative?

>>> from reftgraph import datasets
>>> train, test = datasets.sentiment()
>>> len(train), len(test), train.texts[0], train.labels[0]
(600, 300, 'his song was not brilliant.', 0)

Reviews are made from templates, subjects and adjectives (no download: the words are
here), in three kinds, a third each: plain ("the film was dull."), negated ("the film was
not dull.": the label flips) and contrasted ("the film was dull, but the meal was lovely.":
the clause after "but" decides). A bag of words cannot tell the kinds apart. The held-out
rows use adjectives that no training row has, so a classifier scores on them only through
what the encoder already knows of the words, not by memorising them.
"""

from __future__ import annotations

import random

__all__ = ["sentiment", "POSITIVE", "NEGATIVE"]

POSITIVE = ("lovely", "wonderful", "great", "excellent", "superb", "delightful", "brilliant", "fantastic",
            "charming", "enjoyable", "beautiful", "marvellous", "pleasant", "terrific", "splendid", "amazing")
NEGATIVE = ("awful", "terrible", "dreadful", "horrible", "boring", "dull", "poor", "disappointing",
            "unpleasant", "miserable", "bad", "lousy", "tedious", "mediocre", "painful", "disastrous")
SUBJECTS = ("the film", "this book", "the meal", "our trip", "the show", "his song", "the hotel", "her speech")


def _review(rng: random.Random, words: dict) -> tuple[str, int]:
    kind, label = rng.choice(("plain", "negated", "contrast")), rng.randint(0, 1)
    subject, adjective = rng.choice(SUBJECTS), rng.choice(words[label])
    if kind == "plain":
        return f"{subject} was {adjective}.", label
    if kind == "negated":
        return f"{subject} was not {adjective}.", 1 - label
    other = rng.choice([s for s in SUBJECTS if s != subject])
    return f"{other} was {rng.choice(words[1 - label])}, but {subject} was {adjective}.", label


def sentiment(n_train: int = 600, n_test: int = 300, held_out: int = 4, seed: int = 0):
    """``(train, test)`` :class:`~reftgraph.training.data.Classification` sets (label 1:
    positive); ``held_out`` adjectives of each polarity appear only in ``test``.

    >>> train, test = sentiment(n_train=10, n_test=4)
    >>> len(train), len(test), set(train.labels) <= {0, 1}
    (10, 4, True)
    """
    from ..training.data import Classification

    rng = random.Random(seed)
    seen, unseen = {}, {}
    for label, words in ((1, POSITIVE), (0, NEGATIVE)):
        words = list(words)
        rng.shuffle(words)
        seen[label], unseen[label] = words[held_out:], words[:held_out]
    out = []
    for n, words in ((n_train, seen), (n_test, unseen)):
        rows = [_review(rng, words) for _ in range(n)]
        out.append(Classification([t for t, _ in rows], [y for _, y in rows]))
    return tuple(out)
