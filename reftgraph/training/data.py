"""Datasets and collation: prompt -> response pairs and classification rows.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> data = rg.data.PromptResponse([("ab", "cd"), ("abcd", "e")])
>>> inputs, batch, labels = rg.data.collate_lm(lm, data.prompts(lm), data.responses)
>>> batch.length.tolist(), (labels != -100).sum(1).tolist()
([2, 4], [3, 2])
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..engine import Batch, Template, check_template, format_prompt
from ..errors import DataError

IGNORE = -100
MAX_CLASSES = 10_000   # a Classify head of n classes has width * n weights


def _is_class_index(y) -> bool:
    try:
        return not isinstance(y, bool) and 0 <= operator.index(y) < MAX_CLASSES
    except TypeError:
        return False


def check_text(value, where: str) -> str:
    """``value`` if it is a string, else a DataError naming ``where`` (nothing becomes text by accident).

    >>> check_text("Sky?", "row 0's prompt")
    'Sky?'
    >>> check_text(None, "row 3's prompt")
    Traceback (most recent call last):
    ...
    reftgraph.errors.DataError: row 3's prompt must be a string, got None
    """
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string, got {repr(value)[:60]}")
    return value


def check_subspaces(subspaces, n: int, what: str) -> Optional[list]:
    """Per-row subspaces as a list of ``n`` entries (dims, None or ``{node: dims}``), else a ValueError.

    >>> check_subspaces([[0, 1], None], 2, "data")
    [[0, 1], None]
    >>> check_subspaces([[0, 1]], 2, "data")
    Traceback (most recent call last):
    ...
    ValueError: data: subspaces needs one entry per row (2 rows), got 1
    """
    if subspaces is None:
        return None
    subspaces = list(subspaces)
    if len(subspaces) != n:
        raise ValueError(f"{what}: subspaces needs one entry per row ({n} rows), got {len(subspaces)}")
    for i, entry in enumerate(subspaces):
        values = entry.values() if isinstance(entry, dict) else [entry]
        for dims in values:
            if dims is not None and not (isinstance(dims, (list, tuple)) and all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)):
                raise ValueError(f"{what}: row {i}'s subspace must be a list of dims (ints >= 0), None or "
                                 f"{{node: dims}}; got {entry!r}")
    return subspaces


@dataclass
class PromptResponse:
    """Supervision pairs: the loss is on response tokens only.

    >>> data = PromptResponse([("Sky?", "BLUE."), ("Grass?", "GREEN.")], template=lambda p: "Q: " + p)
    >>> len(data), data.responses
    (2, ['BLUE.', 'GREEN.'])

    ``subspaces`` (one entry per pair) names the dims of the graph's learned bases each row
    trains and uses: ``[0, 1, 2, 3]``, ``None`` (all), or ``{node: dims}`` (pyreft's
    per-example subspaces: one joint run in which each task owns some dims).

    >>> PromptResponse([("Sky?", "BLUE."), ("Ciel?", "Bleu.")], subspaces=[[0, 1], [2, 3]]).subspaces
    [[0, 1], [2, 3]]
    """

    pairs: Sequence[tuple]
    template: Template = None
    subspaces: Optional[Sequence] = None

    def __post_init__(self):
        bad = [i for i, pair in enumerate(self.pairs) if not (isinstance(pair, (tuple, list)) and len(pair) == 2)]
        if bad:
            raise DataError(f"PromptResponse takes (prompt, response) pairs; row {bad[0]} is {self.pairs[bad[0]]!r}")
        self.pairs = [(check_text(p, f"PromptResponse: row {i}'s prompt"),
                       check_text(r, f"PromptResponse: row {i}'s response")) for i, (p, r) in enumerate(self.pairs)]
        if not self.pairs:
            raise DataError("PromptResponse needs at least one (prompt, response) pair")
        check_template(self.template)
        self.subspaces = check_subspaces(self.subspaces, len(self.pairs), "PromptResponse")

    def __len__(self) -> int:
        return len(self.pairs)

    def prompts(self, model) -> list:
        """The prompts after the template (``"chat"`` needs the model's tokenizer).

        >>> import reftgraph as rg
        >>> PromptResponse([("Sky?", "BLUE.")], template=lambda p: "Q: " + p).prompts(rg.models.tiny("llama"))
        ['Q: Sky?']
        """
        return [format_prompt(model.tokenizer, p, self.template) for p, _ in self.pairs]

    @property
    def responses(self) -> list:
        """The responses, in order.

        >>> PromptResponse([("Sky?", "BLUE."), ("Grass?", "GREEN.")]).responses
        ['BLUE.', 'GREEN.']
        """
        return [r for _, r in self.pairs]


@dataclass
class Classification:
    """Texts with integer labels, for a graph holding one ``Classify`` node.

    >>> data = Classification(["good film", "bad film", "fine film"], [2, 0, 1])
    >>> len(data), data.labels
    (3, [2, 0, 1])

    :func:`reftgraph.train` trains the ``Classify`` head (and the graph's other ops) with
    cross-entropy on the labels.
    """

    texts: Sequence[str]
    labels: Sequence[int]
    template: Template = None
    subspaces: Optional[Sequence] = None   # per row, as for PromptResponse

    def __post_init__(self):
        if len(self.texts) != len(self.labels) or not self.texts:
            raise DataError("Classification needs as many labels as texts, and at least one")
        self.texts = [check_text(t, f"Classification: row {i}'s text") for i, t in enumerate(self.texts)]
        bad = [i for i, y in enumerate(self.labels) if not _is_class_index(y)]
        if bad:
            raise DataError(f"Classification labels are class indices 0, 1, ... {MAX_CLASSES - 1} (at most "
                            f"{MAX_CLASSES:,d} classes); label {bad[0]} is {repr(self.labels[bad[0]])[:60]}")
        check_template(self.template)
        self.subspaces = check_subspaces(self.subspaces, len(self.texts), "Classification")

    def __len__(self) -> int:
        return len(self.texts)

    def prompts(self, model) -> list:
        """The texts after the template (``"chat"`` needs the model's tokenizer).

        >>> import reftgraph as rg
        >>> Classification(["good", "bad"], [1, 0], template=str.upper).prompts(rg.models.tiny("llama"))
        ['GOOD', 'BAD']
        """
        return [format_prompt(model.tokenizer, t, self.template) for t in self.texts]


def _pad(rows: list, value: int, side: str, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        r = torch.as_tensor(r, dtype=torch.long)
        if side == "left":
            out[i, width - len(r):] = r
        else:
            out[i, :len(r)] = r
    return out


def collate_lm(model, prompts: Sequence[str], responses: Optional[Sequence[str]] = None,
               padding_side: str = "right", max_length: Optional[int] = None, eos: bool = True):
    """Tokenize prompt + response rows: ``(inputs, Batch, labels)``.

    >>> import reftgraph as rg
    >>> inputs, batch, labels = collate_lm(rg.models.tiny("llama"), ["ab"], ["c"])
    >>> inputs["input_ids"].tolist(), labels.tolist(), batch.length.tolist()   # a, b | c, <eos>
    ([[67, 68, 69, 2]], [[-100, -100, 69, 2]], [2])

    Positions of graph nodes resolve against the *prompt* of each row (``Batch.length`` is
    the prompt length); ``labels`` are the response tokens (``-100`` elsewhere)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tok = model.tokenizer
    p_ids = [tok(p)["input_ids"] for p in prompts]
    if responses is None:
        r_ids = [[] for _ in prompts]
    else:
        r_ids = [tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
                 for r in responses]
    cut = slice(0, max_length)
    rows = [(p + r)[cut] for p, r in zip(p_ids, r_ids)]
    width = max(len(r) for r in rows)
    limit = model.arch.max_tokens
    if limit is not None and width > limit:
        raise DataError(f"a training row is {width} tokens; {model.name or model.arch.family.name} has learned "
                        f"position embeddings for {limit} tokens at most: pass max_length={limit} or shorten it")
    ids = _pad(rows, tok.pad_token_id, padding_side, width)
    mask = _pad([[1] * len(r) for r in rows], 0, padding_side, width)
    labels = _pad([([IGNORE] * len(p) + r)[cut] for p, r in zip(p_ids, r_ids)], IGNORE, padding_side, width)
    start = mask.argmax(1)
    length = torch.tensor([min(len(p), len(r)) for p, r in zip(p_ids, rows)])
    inputs = model.arch.inputs(ids, mask)
    return inputs, Batch.single(length, width, start), labels
