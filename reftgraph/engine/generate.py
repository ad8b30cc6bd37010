"""Generate with a graph: edits on prompt tokens (steering every generated token through
the cache, the ReFT paper's default), on each generated token, or both.

>>> import torch, reftgraph as rg
>>> lm = rg.models.tiny("llama")
>>> g = rg.Graph()
>>> _ = g.add(rg.Site("resid_post", layer=0, positions="last"), rg.Add(torch.ones(32)))
>>> out = g.generate(lm, ["hello", "hi"], max_new_tokens=3)
>>> len(out.texts), out.ids.shape[0]
(2, 2)

A node's positions decide when it acts: prompt selectors act on the prompt pass,
``"generated"`` on every new token, ``"all"`` on both. An encoder-decoder's encoder sites act
once, on the prompt; its decoder starts from the decoder start token.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import nnsight
import torch

from .bind import Batch
from .apply import apply
from .context import as_model, attention_for, inference_mode, input_device, serial
from .plan import compile_graph
from .prompts import Template, format_prompt
from .remote import check as check_remote
from ..core.graph import Graph
from .tokens import from_inputs, prompt_list, tokenize
from ..errors import DataError, SiteError


@dataclass
class Generation:
    """What :func:`generate` returns: the new texts and the token ids, prompt included.

    >>> import reftgraph as rg
    >>> out = rg.Graph().generate(rg.models.tiny("llama"), ["hi", "hello"], max_new_tokens=3)
    >>> len(out.texts), out.ids.shape, out.prompt_length
    (2, torch.Size([2, 8]), 5)

    ``texts``: the new text of each row; ``ids``: prompt + new tokens (left-padded, as
    transformers returns them); ``prompt_length``: the padded prompt width.
    """

    texts: list
    ids: torch.Tensor
    prompt_length: int

    @property
    def new_ids(self) -> torch.Tensor:
        """The generated tokens ``[B, new]``, without the prompt.

        >>> import reftgraph as rg
        >>> out = rg.Graph().generate(rg.models.tiny("llama"), ["hi", "hello"], max_new_tokens=3)
        >>> out.new_ids.shape
        torch.Size([2, 3])
        """
        return self.ids[:, self.prompt_length:]

    def __repr__(self) -> str:
        short = (lambda t: repr(t if len(t) <= 40 else t[:37] + "..."))
        texts = ", ".join(short(t) for t in self.texts[:3]) + (", ..." if len(self.texts) > 3 else "")
        return (f"Generation({len(self.texts)} texts, up to {self.ids.shape[1] - self.prompt_length} new tokens; "
                f"texts=[{texts}])")

    def _repr_html_(self) -> str:
        import html

        cut = (lambda t: html.escape(t if len(t) <= 300 else t[:297] + "..."))
        rows = "".join(f"<tr><td>{i}</td><td style='text-align:left'>{cut(t)}</td></tr>"
                       for i, t in enumerate(self.texts[:20]))
        more = f"<p>... and {len(self.texts) - 20} more (.texts)</p>" if len(self.texts) > 20 else ""
        return (f"<p><b>Generation</b>: {len(self.texts)} texts, up to {self.ids.shape[1] - self.prompt_length} "
                f"new tokens each (.texts, .new_ids)</p><table><tr><th>row</th><th>new text</th></tr>{rows}</table>"
                + more)


def _split(graph: Graph):
    """``graph`` as two graphs: the edits on the prompt pass, and those on each new token
    (positions ``"last"`` of a one-token step); kept per graph until the graph changes."""
    state = graph.state()
    cached = _SPLITS.get(graph)
    if cached is not None and cached[0] == state:
        return cached[1]
    prompt, steps = [], []
    for node in graph.nodes:
        if node.stream != "base" or node.reads[0] != "base":
            raise SiteError(f"node {node.name!r} at {node.site}: generation runs the base stream only; "
                            "patch from sources with run()")
        encoder = node.site.stack == "encoder"    # (read once, before the first new token)
        if encoder and node.site.positions == "generated":
            raise SiteError(f"node {node.name!r} at {node.site}: the encoder reads the prompt once, before the "
                            "first new token; positions='generated' is for decoder sites")
        if node.site.positions != "generated":
            prompt.append(node)
        if node.site.positions in ("generated", "all") and not encoder:
            steps.append(dataclasses.replace(node, site=dataclasses.replace(node.site, positions="last")))
    split = Graph(prompt), Graph(steps)
    _SPLITS[graph] = (state, split)
    return split


_SPLITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def generate(graph: Graph, model, prompts, max_new_tokens: int = 32, do_sample: bool = False,
             template: Template = None, skip_special_tokens: bool = True, remote=None, subspaces=None,
             **generate_kwargs) -> Generation:
    """Generate from ``prompts`` (left-padded batch) with the graph's edits.

    >>> import reftgraph as rg
    >>> lm, g = rg.models.tiny("llama"), rg.Graph()
    >>> v = 50 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    >>> _ = g.add(rg.Site("resid_post", layer=1, positions="generated"), rg.Add(v))
    >>> plain, steered = rg.Graph().generate(lm, ["ab"], max_new_tokens=4), generate(g, lm, ["ab"], max_new_tokens=4)
    >>> plain.ids[:, :3].equal(steered.ids[:, :3]), plain.ids.equal(steered.ids)  # edits from the 2nd new token on
    (True, False)

    Greedy by default; ``template="chat"`` wraps each prompt in the tokenizer's chat
    template; other keyword arguments go to transformers' ``generate``. ``prompts`` may
    instead be model inputs made elsewhere (a processor's dict, padded on the left: a
    vision-language model generates about its images, ``positions="image"`` selects them). ``remote`` as in
    :func:`reftgraph.run`: the generation runs on the server, the token ids come back.
    ``subspaces`` as in :func:`reftgraph.run` (per call or per prompt).
    """
    model = as_model(model)
    if not getattr(model.hf, "can_generate", lambda: True)():
        raise SiteError(f"{type(model.hf).__name__} cannot generate (an encoder reads a whole text at once); use "
                        "graph.run for its hidden states or a Classify node, or wrap a causal LM to generate")
    remote = remote if check_remote(remote, model, graph) else None
    prompt_graph, step_graph = _split(graph)
    prompt_plan = compile_graph(prompt_graph, model.arch)
    step_plan = compile_graph(step_graph, model.arch)
    seq2seq = bool(model.arch.stacks)   # (an encoder-decoder's decoder starts alone: its prompt may pad on the right)
    if isinstance(prompts, Mapping):    # model inputs made elsewhere (a processor's, with images)
        if "decoder_input_ids" in prompts:
            raise DataError("generation starts the decoder from its start token: leave decoder_input_ids out")
        inputs, batch = from_inputs(model, prompts)
        if not seq2seq and bool((inputs["attention_mask"][:, -1] == 0).any()):
            raise DataError("generation appends tokens after each row's last one: pad the model inputs on the left "
                            "(the processor's padding_side='left')")
    else:
        prompts = [format_prompt(model.tokenizer, p, template) for p in prompt_list(prompts, "prompts")]
        inputs, batch = tokenize(model, {"base": prompts}, "right" if seq2seq else "left")
    limit = model.arch.max_tokens
    if isinstance(max_new_tokens, int) and limit is not None and batch.seq_len + max_new_tokens > limit:
        raise DataError(f"{batch.seq_len} prompt tokens + max_new_tokens={max_new_tokens} pass the "
                        f"{limit} positions that {model.name or model.arch.family.name} has learned embeddings "
                        f"for; generate at most {max(limit - batch.seq_len, 0)} new tokens")
    prompt_bound = prompt_plan.bind(batch, subspaces).steps
    step_bound = []
    if step_plan.steps:   # each new token: one position per row
        step_bound = step_plan.bind(Batch.full(inputs["input_ids"].shape[0], 1), subspaces).steps
    tok = model.tokenizer
    device = input_device(model, [prompt_plan, step_plan], remote)
    gen_inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()
                  if k not in ("position_ids", "decoder_input_ids")}     # (generate numbers and starts them itself)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id)
    kwargs.update(generate_kwargs)
    if remote is not None:
        kwargs["remote"] = remote
    out, scratch = {}, {}
    with serial(model), attention_for(model, prompt_plan, step_plan), torch.no_grad(), inference_mode(graph):
        if not step_plan.steps:   # edits on the prompt pass only: one invoke
            with model.nn.generate(gen_inputs, **kwargs) as tracer:
                apply(prompt_plan, prompt_bound, model.nn, scratch)
                out["ids"] = tracer.result
                if remote is not None:   # the token ids come back, nothing else
                    nnsight.save(out)
        else:   # the result is read in an invoke of its own, after the unbounded iteration
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was never reached.*")
                with model.nn.generate(**kwargs) as tracer:
                    with tracer.invoke(gen_inputs):
                        apply(prompt_plan, prompt_bound, model.nn, scratch)
                        for _ in tracer.iter[1:]:
                            apply(step_plan, step_bound, model.nn, scratch)
                    with tracer.invoke():
                        out["ids"] = tracer.result
                        if remote is not None:
                            nnsight.save(out)
    ids = out["ids"].cpu()
    width = batch.seq_len     # (an encoder-decoder: the decoder's start token)
    texts = tok.batch_decode(ids[:, width:], skip_special_tokens=skip_special_tokens)
    return Generation(texts, ids, width)
