"""The memorisation test: how much text one low-rank intervention at one token can store.

A ConsReFT ``h + R^T(b - R h)`` (rank 1 by default) at the last token of a fixed prompt is
trained until the model, decoding greedily with the intervention on the prompt only,
continues the prompt with the target text. The score is the share of the target
reproduced as an exact prefix.

>>> import reftgraph as rg
>>> lm = rg.models.tiny("llama", initializer_range=0.5)
>>> result = memorise(lm, "abc", layer=0, max_steps=3)
>>> result.n_tokens, 0 <= result.rate <= 1, list(result.row())[:4]
(3, True, ['layer', 'rank', 'n_tokens', 'recovered'])

The ReFT paper (Wu, Arora et al. 2024) runs this on the opening of *Alice's Adventures in
Wonderland* (Project Gutenberg ebook #11); :func:`shuffled_words` and :func:`random_tokens`
make the harder controls.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..core.graph import Graph
from ..core.ops.reft import REFT_OPS
from ..engine import Batch, PrefixCache, Template, as_model, compile_graph, format_prompt
from ..training import final_hidden
from ..training.distributed import world
from ..training.loop import Callback, fit
from ..core.sites import Site

DEFAULT_PROMPT = "Recite the book:"
Target = Union[str, Sequence[int]]


@dataclass
class Memorisation:
    """One memorisation run: how many target tokens came back, and what it took.

    >>> import reftgraph as rg
    >>> result = memorise(rg.models.tiny("llama"), [5, 6, 7, 8], layer=1, max_steps=2, greedy=False)
    >>> result.n_tokens, result.steps, result.recovered == result.teacher_forced
    (4, 2, True)

    ``recovered`` target tokens came out of greedy decoding as an exact prefix
    (``rate = recovered / n_tokens``); ``first_mismatch`` is the first wrong position (None
    when all match); ``teacher_forced`` counts the exact prefix of argmax predictions in
    the last training forward. ``char_rate`` is the ReFT authors' score: the characters of
    the decoded output that match the target's before the first mismatch, over the
    target's length in characters.
    """

    layer: int
    rank: int
    n_tokens: int
    recovered: int
    first_mismatch: Optional[int]
    teacher_forced: int
    steps: int
    loss: float
    seconds: float
    graph: Graph = field(repr=False)
    char_rate: float = 0.0

    @property
    def rate(self) -> float:
        """The share of the target recovered, ``recovered / n_tokens``.

        >>> import reftgraph as rg
        >>> result = memorise(rg.models.tiny("llama"), [5, 6, 7, 8], layer=1, max_steps=2)
        >>> result.rate == result.recovered / 4
        True
        """
        return self.recovered / self.n_tokens

    def row(self) -> dict:
        """The figures as a flat dict (one CSV row).

        >>> import reftgraph as rg
        >>> row = memorise(rg.models.tiny("llama"), "ab", layer=0, max_steps=1).row()
        >>> list(row)[:6], row["n_tokens"]
        (['layer', 'rank', 'n_tokens', 'recovered', 'rate', 'first_mismatch'], 2)
        """
        return {"layer": self.layer, "rank": self.rank, "n_tokens": self.n_tokens, "recovered": self.recovered,
                "rate": self.rate, "first_mismatch": self.first_mismatch, "teacher_forced": self.teacher_forced,
                "char_rate": self.char_rate, "steps": self.steps, "loss": self.loss, "seconds": self.seconds}


def target_ids(model, target: Target, n_tokens: Optional[int] = None) -> list:
    """The first ``n_tokens`` token ids of ``target`` (a text, tokenized without special
    tokens, or a list of ids); all of them when ``n_tokens`` is None.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama")
    >>> target_ids(lm, "abcd", n_tokens=2), target_ids(lm, [7, 8, 9])
    ([67, 68], [7, 8, 9])
    """
    if isinstance(target, str):
        ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    else:
        ids = [int(i) for i in target]
        vocab = model.hf.get_output_embeddings().weight.shape[0]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"target token id {bad[0]} out of range; valid ids 0..{vocab - 1}")
    n = len(ids) if n_tokens is None else n_tokens
    if not 0 < n <= len(ids):
        raise ValueError(f"n_tokens={n_tokens} out of range; the target has {len(ids)} tokens "
                         f"(valid 1..{len(ids)})")
    return ids[:n]


def shuffled_words(text: str, seed: int = 0) -> str:
    """``text``'s words (split on whitespace) in a seeded random order, joined by spaces.

    >>> shuffled_words("a b c d", seed=1)
    'd a c b'
    """
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def random_tokens(model, n: int, seed: int = 0) -> list:
    """``n`` token ids drawn uniformly from the vocabulary, special tokens left out.

    >>> import reftgraph as rg
    >>> len(random_tokens(rg.models.tiny("llama"), 5))
    5
    """
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    allowed = torch.tensor(sorted(set(range(vocab)) - set(model.tokenizer.all_special_ids)))
    pick = torch.randint(len(allowed), (n,), generator=torch.Generator().manual_seed(seed))
    return allowed[pick].tolist()


def memorisation_graph(model, layer: int, rank: int = 1, op: str = "ConsReFT", component: str = "resid_post",
                       seed: int = 0) -> Graph:
    """One ReFT node (``op``, ``rank``) at ``component[layer]``, last prompt token.

    >>> import reftgraph as rg
    >>> print(memorisation_graph(rg.models.tiny("llama"), layer=1))
    Graph(1 nodes, 33 trainable parameters)
      memorise: ConsReFT resid_post[1] pos=last
    """
    if op not in REFT_OPS:
        raise ValueError(f"unknown ReFT op {op!r}; choose one of {sorted(REFT_OPS)}")
    g = Graph()
    g.add(Site(component, layer=layer, positions="last"),
          REFT_OPS[op](width=model.arch.width(component), rank=rank, seed=seed), name="memorise")
    return g


def char_recovery(predicted: str, target: str) -> float:
    """The authors' recovery score: characters of ``predicted`` equal to ``target``'s before
    the first mismatch, over ``len(target)``.

    >>> char_recovery("Alice was beginning to get very", "Alice was beginning to get tired")
    0.84375
    """
    n = 0
    for p, t in zip(predicted, target):
        if p != t:
            break
        n += 1
    return n / max(1, len(target))


def exact_prefix(predicted: Sequence[int], target: Sequence[int]) -> int:
    """How many leading entries of ``predicted`` equal ``target``.

    >>> exact_prefix([5, 6, 9], [5, 6, 7, 8])
    2
    """
    n = 0
    for p, t in zip(predicted, target):
        if int(p) != int(t):
            break
        n += 1
    return n


def memorise(model, target: Target, *, layer: int, rank: int = 1, n_tokens: Optional[int] = None,
             prompt: str = DEFAULT_PROMPT, op: str = "ConsReFT", component: str = "resid_post",
             lr: float = 0.05, max_steps: int = 1000, margin: float = 0.5, cache_prefix: bool = True,
             greedy: bool = True, seed: int = 0, progress: bool = True, schedule: str = "constant",
             max_seconds: Optional[float] = None, template: Template = None) -> Memorisation:
    """Train a ``rank`` ``op`` at ``component[layer]``, last token of ``prompt``, to make the
    model continue with ``target`` (its first ``n_tokens`` tokens), then decode greedily.

    >>> import reftgraph as rg
    >>> lm = rg.models.tiny("llama", initializer_range=0.5)
    >>> result = memorise(lm, "h", layer=1, lr=0.5, max_steps=50)
    >>> result.recovered, result.n_tokens, result.rate, result.steps < 50
    (1, 1, 1.0, True)

    Adam at ``lr`` (``schedule="constant"``, or ``"linear"``: decaying to zero over
    ``max_steps``), full-sequence teacher forcing (batch size 1), until every target token
    is the argmax by at least ``margin`` logits, ``max_steps`` steps, or (when given)
    ``max_seconds`` of training, whichever comes first. (The ReFT authors
    use lr 2e-3 to 8e-3 and up to 1,000 epochs on LLaMA-1 7B.) ``cache_prefix`` runs the
    blocks below ``layer`` once (:mod:`reftgraph.prefix`); ``greedy=False`` skips the final
    decoding and reports the teacher-forced prefix (equal to greedy decoding's, up to
    ties), which costs one forward instead of ``n_tokens``. A progress bar shows the steps
    and the loss (``progress=False`` hides it). ``template`` as in :func:`reftgraph.generate`
    (``"chat"``: the prompt as the user's turn of the tokenizer's chat template), applied to
    ``prompt`` for training and decoding alike.
    """
    model = as_model(model, one_stack="rg.memorise")
    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    ids = target_ids(model, target, n_tokens)
    n = len(ids)
    prompt = format_prompt(model.tokenizer, prompt, template)
    graph = memorisation_graph(model, layer, rank, op, component, seed)
    plan = compile_graph(graph, model.arch)
    prompt_ids = model.tokenizer(prompt)["input_ids"]
    if not prompt_ids:
        raise ValueError("the prompt tokenizes to no tokens; give at least one")
    seq = torch.tensor([prompt_ids + ids])
    width = seq.shape[1]
    inputs = model.arch.inputs(seq, torch.ones_like(seq))
    batch = Batch.single([len(prompt_ids)], width)
    cache = PrefixCache(model) if cache_prefix else None
    head = model.hf.get_output_embeddings()
    targets = torch.tensor(ids, device=model.device)
    start = len(prompt_ids) - 1  # the hidden state there predicts the first target token
    clock = time.perf_counter()
    rule = StopRule(targets, margin, max_steps, max_seconds)

    def loss(_) -> torch.Tensor:
        hidden, _ = final_hidden(plan, model, inputs, batch, cache)
        rule.scores = head(hidden[0, start:start + n]).float()
        # one text: every process computes it; each contributes its share of the loss
        return torch.nn.functional.cross_entropy(rule.scores, targets) / world()[1]

    fit(graph, model, lambda epoch: itertools.repeat(None), loss, lr=lr, callbacks=[rule], total_steps=max_steps,
        schedule=schedule, progress=progress, desc=f"memorise L{layer} n={n}")
    steps, teacher_forced, loss_value = rule.steps, rule.prefix, rule.loss
    recovered = teacher_forced
    predicted = rule.scores.argmax(-1).tolist()
    if greedy:
        predicted = graph.generate(model, [prompt], max_new_tokens=n, do_sample=False).new_ids[0].tolist()
        recovered = exact_prefix(predicted, ids)
    decode = model.tokenizer.decode
    return Memorisation(layer=model.arch.layer_index(layer), rank=rank, n_tokens=n, recovered=recovered,
                        first_mismatch=None if recovered == n else recovered, teacher_forced=teacher_forced,
                        steps=steps, loss=loss_value, seconds=time.perf_counter() - clock, graph=graph,
                        char_rate=char_recovery(decode(predicted), decode(ids)))


class StopRule(Callback):
    """The memorisation stop rule: stop once every target token is the argmax by at least
    ``margin`` logits (checked on each forward, before its step), after ``max_steps``, or
    once ``max_seconds`` (when given) have passed since the rule was made.

    >>> import torch
    >>> rule = StopRule(torch.tensor([1, 0]), margin=0.5, max_steps=10)
    >>> rule.scores = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    >>> from reftgraph.training import State
    >>> state = State(None, None, None)
    >>> rule.on_loss(state, torch.tensor(0.3), None); state.stop, rule.prefix
    (True, 2)
    """

    def __init__(self, targets: torch.Tensor, margin: float, max_steps: int, max_seconds: Optional[float] = None):
        self.targets, self.margin, self.max_steps = targets, margin, max_steps
        self.deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self.scores = None
        self.prefix, self.steps, self.loss = 0, 0, float("nan")

    def on_loss(self, state, loss, batch) -> None:
        self.loss = float(torch.nn.functional.cross_entropy(self.scores.detach(), self.targets))
        self.steps = state.step
        self.prefix, gap = _fit(self.scores.detach(), self.targets)
        late = self.deadline is not None and time.perf_counter() >= self.deadline   # fit makes all processes agree
        if (self.prefix == len(self.targets) and gap >= self.margin) or state.step >= self.max_steps or late:
            state.stop = True


def _fit(scores: torch.Tensor, targets: torch.Tensor) -> tuple[int, float]:
    """(exact prefix of the argmax predictions, the smallest logit margin of the target over
    the best other token)."""
    prefix = exact_prefix(scores.argmax(-1).tolist(), targets.tolist())
    own = scores.gather(1, targets[:, None])[:, 0]
    other = scores.scatter(1, targets[:, None], float("-inf")).max(1).values
    return prefix, float((own - other).min())
