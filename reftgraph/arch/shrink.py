"""Tiny copies of transformers configs that keep their architecture: :func:`shrink`,
:func:`tiny_config_of` and :func:`causal_lm_types`.

>>> from transformers import LlamaConfig
>>> cfg = shrink(LlamaConfig(num_key_value_heads=8))
>>> cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
(64, 4, 2, 4)

A shrunk config is small enough for a random model to build and run on a CPU in well under
a second (hidden size 64, 4 query heads, head dim 16, MLP width 128, vocabulary 259 with
pad/bos/eos = 0/1/2, at most 4 layers) and keeps every flag that changes the computation:
parallel residuals, qk-norms, post-norms, biases, mixture-of-experts routing (4 experts,
top-2, tiny shared experts), sliding windows (4 tokens), multi-head latent attention, and
the layer pattern of hybrid models. A patterned model keeps at least one layer of every
kind it has (one full-attention layer of Gemma 3's 5:1 pattern, one attention layer of
Jamba, a dense and a sparse layer of DeepSeek-V3), so it may get more layers than asked.

Everything is driven by the tables below: field names grouped by what they size, the
fields that describe a layer pattern, and a few per-type fix-ups. The shrunk dictionary
is rebuilt through the config class, so fields derived in ``__post_init__`` stay
consistent. Special-token fields other than pad/bos/eos that fall outside the new
vocabulary go to the top ids (258, 257, ...): in the 259-token byte tokenizer of
:func:`reftgraph.arch.models.tiny_tokenizer` those are bytes that never occur in UTF-8.
"""

from __future__ import annotations

import copy
import math

from ..errors import ReftgraphError

__all__ = ["causal_lm_types", "shrink", "tiny_config_of"]

HIDDEN, HEADS, HEAD_DIM, FFN, EXPERT_FFN = 64, 4, 16, 128, 32
EXPERTS, TOP_K, VOCAB, MAX_POSITIONS, WINDOW = 4, 2, 259, 128, 4
LAYERS, SUB_LAYERS, STATE, LORA_RANK, ROPE_DIM = 4, 2, 16, 32, 8
PAD, BOS, EOS = 0, 1, 2

# ---------------------------------------------------------------- size tables
WIDTH = ("hidden_size", "n_embd", "d_model", "hidden_size_global", "emb_dim", "embed_dim",
         "model_dim", "d_embed", "embedding_dim")
# fields sized relative to the width (same ratio to it as before, multiple of 8)
WIDTH_SCALED = ("embedding_size", "word_embed_proj_dim", "input_embedding_size",
                "output_embedding_size", "lru_width", "attention_hidden_size",
                "backbone_hidden_size", "ple_embed_dim", "hidden_size_per_layer_input",
                "cross_attention_hidden_size", "router_hidden_size", "shape_embed_dim",
                "pronunciation_embed_dim", "prompt_mid_dim", "projector_hidden_size",
                "laurel_rank", "hc_lowrank", "loop_gate_rank", "gated_norm_rank",
                "moe_latent_size", "adapter_rank", "adapter_in_dim",
                "adapter_input_size", "downsample_hidden_size", "ext_pw_out_channel",
                "depthwise_separable_out_channel", "nemo_conv_channels", "output_channels")
# widths of the text model that a tower projects into (all widths become HIDDEN)
TEXT_WIDTH = ("adapter_out_dim", "text_hidden_size", "out_hidden_size", "projection_hidden_size")
HEAD_COUNTS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads",
               "encoder_attention_heads", "decoder_attention_heads", "num_encoder_attention_heads",
               "num_decoder_attention_heads", "swa_num_attention_heads", "index_n_heads",
               "indexer_n_heads", "linear_num_heads", "linear_num_value_heads", "heads_per_ngram")
# key-value head field -> the query-head field it groups
KV_OF = {"num_key_value_heads": "num_attention_heads", "num_kv_heads": "num_attention_heads",
         "n_kv_heads": "n_heads", "num_query_groups": "num_attention_heads",
         "swa_num_key_value_heads": "swa_num_attention_heads",
         "linear_num_key_heads": "linear_num_value_heads", "indexer_kv_heads": "indexer_n_heads",
         "num_key_value_groups": "num_attention_heads", "kv_n_heads": "n_heads"}
HEAD_DIMS = ("head_dim", "attention_head_dim", "attention_head_size", "d_head", "dim_head",
             "kv_channels", "swa_head_dim", "index_head_dim", "indexer_head_dim",
             "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim", "v_head_dim",
             "global_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim", "d_rel",
             "key_head_dim", "value_head_dim")
LORA_RANKS = ("kv_lora_rank", "q_lora_rank", "o_lora_rank")
FFN_SIZES = ("intermediate_size", "n_inner", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim",
             "d_inner", "dff", "dim_ff", "ffn_hidden_size", "feed_forward_size", "d_ff",
             "intermediate_size_mlp", "dense_intermediate_size", "inner_hidden_size",
             "prefix_dense_intermediate_size", "mlp_dim")
EXPERT_FFN_SIZES = ("moe_intermediate_size", "expert_ffn_hidden_size", "expert_intermediate_size",
                    "shared_expert_intermediate_size", "shared_experts_intermediate_size",
                    "moe_shared_expert_intermediate_size", "shared_intermediate_size",
                    "moe_ffn_hidden_size")
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_KS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts",
          "moe_top_k", "num_selected_experts")
SHARED_EXPERTS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
EXPERT_GROUPS = ("n_group", "num_expert_group")
SMALL_COUNTS = {"zero_expert_num": 2, "num_centroids": 8, "centroid_intermediate_top_k": 2,
                "index_topk": WINDOW, "index_topk_blocks": 2, "hc_mult": 2, "hc_count": 2,
                "altup_num_inputs": 2, "num_codebooks": 2, "n_mamba_heads": 2}
# SSM heads: (head count, head dim, expand factor, inner width or ""): heads * dim = expand * width
SSM_HEADS = (("num_heads", "head_dim", "expand", ""),
             ("mamba_n_heads", "mamba_d_head", "mamba_expand", "mamba_d_ssm"),
             ("mamba_num_heads", "mamba_head_dim", "expand", ""),
             ("n_mamba_heads", "mamba_headdim", "mamba_expand", ""))
# fields left None by a default config that its model cannot do without
FILL_NONE = {"head_dim": HEAD_DIM, "num_key_value_heads": HEADS}
FILL_NONE_MOE = {"num_experts_per_tok": TOP_K, "n_routed_experts": EXPERTS, "n_shared_experts": 1}
STATE_SIZES = ("state_size", "ssm_state_size", "mamba_d_state", "d_state")
DT_RANKS = ("time_step_rank", "mamba_dt_rank", "dt_rank")
SSM_GROUPS = ("n_groups", "mamba_n_groups", "mamba_ngroups")
LAYER_COUNTS = ("num_layers_per_stack", "num_hidden_layers", "num_blocks", "n_layer", "n_layers",
                "num_layers", "decoder_layers", "num_decoder_layers")
OTHER_LAYER_COUNTS = ("encoder_layers", "num_encoder_layers")
MAX_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                       "max_sequence_length", "context_length", "max_target_positions",
                       "max_source_positions", "seq_length", "model_max_length")
WINDOWS = ("sliding_window", "sliding_window_size", "attention_window_size", "local_attention",
           "local_attention_window_len", "attention_chunk_size", "swa_window_size")
VOCABS = ("vocab_size", "decoder_vocab_size", "vocab_size_per_layer_input", "unpadded_vocab_size",
          "output_vocab_size")
TOKEN_INDEX_FIELDS = ("pad_index", "bos_index", "eos_index", "unk_index", "mask_index")
ONE = {"pretraining_tp": 1}
SIZE_FIELDS = (WIDTH + WIDTH_SCALED + HEAD_COUNTS + tuple(KV_OF) + HEAD_DIMS + LORA_RANKS
               + FFN_SIZES + EXPERT_FFN_SIZES + EXPERT_COUNTS + TOP_KS)  # may be given per layer
SUB_CONFIG_TEXT = ("text_config", "decoder", "decoder_config", "global_config", "llm_config",
                   "language_config")

# ---------------------------------------------------------------- layer-pattern tables
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "attention_layers",
                   "attn_layers", "no_rope_layers", "layer_rope_theta", "indexer_types",
                   "activation_sparsity_pattern", "layers_num_experts", "sliding_window_layers")
PER_LAYER_SIZES = ("num_attention_heads_per_layer",)  # sizes, not kinds: scaled, not matched
INDEX_LISTS = ("full_attn_idxs", "moe_layers", "mlp_only_layers", "attn_layer_indices",
               "hybrid_layer_ids", "local_layer_ids", "ple_layer_ids", "swa_layers",
               "global_attn_layers", "dense_layers", "global_attn_indexes")
PREFIX_COUNTS = ("first_k_dense_replace", "num_dense_layers", "max_window_layers",
                 "moe_layer_start_index", "loop_layer_index_start", "n_dense_layers",
                 "n_input_layers")
INCLUSIVE_ENDS = ("moe_layer_end_index",)
EXCLUSIVE_ENDS = ("loop_layer_index_end",)
SUFFIX_COUNTS = ("num_kv_shared_layers", "n_output_layers")
# a middle section: layers left between a prefix and a suffix count
MIDDLE_COUNTS = {"n_recurrent_layers": ("n_input_layers", "n_output_layers")}


def _every_pth(i, p, o):  # layers p-1, 2p-1, ...
    return (i + 1) % p == 0


def _at_offset(i, p, o):  # layers o, o+p, ...
    return i % p == o


def _first_of_period(i, p, o):  # layers 0, p, 2p, ...
    return i % p == 0


# periodic fields: name -> (offset field, formula over layer i with period p and offset o, the
# per-layer lists the field only generates: when one is there, it decides the kinds and the field
# is refitted to the kept layers)
_TYPES = ("layer_types", "layers_block_type")
PERIODIC = {
    "attn_layer_period": ("attn_layer_offset", _at_offset, _TYPES),
    "expert_layer_period": ("expert_layer_offset", _at_offset, ()),
    "decoder_sparse_step": ("", _every_pth, ()),
    "moe_layer_interval": ("", _every_pth, ()),
    "n_layers_per_attn_res_block": ("", _first_of_period, ()),
    "interleave_moe_layer_step": ("", _every_pth, ("moe_layers",)),
    "no_rope_layer_interval": ("", _every_pth, ("no_rope_layers",)),
    "sliding_window_pattern": ("", _every_pth, _TYPES),
    "_sliding_window_pattern": ("", _every_pth, _TYPES),
    "full_attention_interval": ("", _every_pth, _TYPES),
    "layer_group_size": ("", _every_pth, _TYPES),
    "prefix_dense_sliding_window_pattern": ("", _every_pth, _TYPES),
    "global_attn_every_n_layers": ("", _first_of_period, _TYPES),
}
PERIODIC_BY_TYPE = {("afmoe", "global_attn_every_n_layers"): ("", _every_pth, _TYPES)}
PER_LAYER_DICTS = ("per_layer_config",)  # {"05": {overrides}, ...}
# patterns given as one cycle that repeats over the layers (RecurrentGemma)
CYCLE_LISTS = ("block_types",)
# types whose config forces the last layer to full attention: the original last layer is kept
LAST_LAYER_KEPT = ("gemma4_text", "gemma4_unified_text", "beam", "olmo_hybrid")
# types that cannot have fewer layers (RWKV's init divides by num_hidden_layers - 1)
MIN_LAYERS = {"rwkv": 2}
# types whose to_dict() writes each layer as several entries (Dory: attention block, mlp block)
LAYER_UNITS = {"dory": 2}
# types that need two layers of each kind (Zamba ties the shared block of every hybrid layer)
KIND_COPIES = {"zamba": 2, "zamba2": 2}



# ---------------------------------------------------------------- per-type fix-ups
def _per_head(field):
    """Zamba's attention runs on the concatenated [hidden, embedding] width."""
    return lambda new, old: new[field] // new["num_attention_heads"]


def _rope_per_layer_type(new, old):
    rope = new.get("rope_parameters") or {}
    """Cohere Compass reads one rope dict per layer type; its default config has none."""
    default = {"rope_type": "default", "rope_theta": 10000.0}
    return rope or {t: dict(default) for t in sorted(set(new["layer_types"]))}


def _stack_slots(new, old):
    """HRM runs its stack H_cycles * (L_cycles + 1) times; num_hidden_layers counts those slots."""
    return new["num_layers_per_stack"] * new["H_cycles"] * (new["L_cycles"] + 1)


def _dbrx_attention(new, old):
    """DBRX reads rope_theta from its attention config and clamps q/k/v (clip_qkv 8, as released)."""
    attn = new["attn_config"]
    return {**attn, "rope_theta": (new.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            "clip_qkv": attn.get("clip_qkv") or 8.0}


def _nope_plus_rope(new, old):
    """Sliding layers of Dots3 use head_dim = their (overridden) nope dim + the rope dim."""
    nopes = [entry["qk_nope_head_dim"] for entry in (new.get("per_layer_config") or {}).values()
             if "qk_nope_head_dim" in entry]
    return (nopes[0] if nopes else new["qk_nope_head_dim"]) + new["qk_rope_head_dim"]


def _deepest_sub_stack(new, old):
    """The most layers of any sub-config (BLT builds one cache for its three stacks)."""
    return max((v.get("num_hidden_layers") or 0) for v in new.values() if _is_sub_config(v))


def _one_attention_layer(new, old):
    """A hybrid whose default has no attention layer gets one (transformers cannot cache a pure SSM)."""
    types = new.get("layer_types") or ["linear_attention"] * new["num_hidden_layers"]
    if any("attention" in t and t != "linear_attention" for t in types):
        return types
    return [t if i != len(types) // 2 else "full_attention" for i, t in enumerate(types)]


def _conv_and_attention(new, old):
    """LFM2-MoE's default config has no layer types: short convolutions with an attention layer."""
    n = new["num_hidden_layers"]
    if n <= 2:
        return ["conv", "full_attention"][:n]
    return ["full_attention" if i % 4 == 2 else "conv" for i in range(n)]


def _pooled_image_tokens(new, old) -> int:
    """Gemma 3 pools its vision patches to ``mm_tokens_per_image`` (a square): a quarter of the
    tiny vision tower's patches, so the pooling kernel is 2 (the default 256 is more than it has)."""
    vision = new.get("vision_config") or {}
    side = vision.get("image_size", 224) // vision.get("patch_size", 16)
    return max(1, side // 2) ** 2


def _mrope(default: list):
    """Rope parameters with the multimodal sections the model falls back to when its config
    names none (Qwen2-VL's [16, 24, 24]), rescaled to the tiny rotary width."""
    def fix(new, old):
        rope = dict(new.get("rope_parameters") or {})
        if "mrope_section" not in rope and not all(isinstance(v, dict) for v in rope.values() if v is not None):
            rope["mrope_section"] = _split(default, _rotary_half(rope, new))
        return rope
    return fix


# model types whose text tower falls back to multimodal rope sections of its own
MROPE_DEFAULTS = {"qwen2_vl_text": [16, 24, 24], "qwen2_5_vl_text": [16, 24, 24], "paddleocr_vl_text": [16, 24, 24],
                  "qwen3_vl_text": [24, 20, 20], "qwen3_vl_moe_text": [24, 20, 20], "glm4v_text": [8, 12, 12],
                  "glm4v_moe_text": [8, 12, 12], "glm_ocr_text": [8, 12, 12], "ernie4_5_vl_moe_text": [22, 22, 20]}

# model_type -> fields set after the generic rules (a callable gets the new and old dicts)
FIXUPS: dict[str, dict] = {
    **{t: {"rope_parameters": _mrope(d)} for t, d in MROPE_DEFAULTS.items()},
    "gemma3": {"mm_tokens_per_image": _pooled_image_tokens},
    "zamba": {"attention_head_dim": _per_head("attention_hidden_size")},
    "zamba2": {"attention_head_dim": _per_head("attention_hidden_size")},
    "cohere_compass_text": {"rope_parameters": _rope_per_layer_type},
    "hrm_text": {"num_hidden_layers": _stack_slots},
    "dbrx": {"attn_config": _dbrx_attention},
    "reformer": {"is_decoder": True, "axial_pos_shape": [8, MAX_POSITIONS // 8],
                 "axial_pos_embds_dim": lambda new, old: _split(old["axial_pos_embds_dim"], HIDDEN)},
    # xLSTM rounds its q/k width up to a multiple of 64 in one place and not in another
    "xlstm": {"hidden_size": 2 * HIDDEN, "embedding_dim": 2 * HIDDEN},
    "dots3_note_text": {"head_dim": _nope_plus_rope},
    "blt": {"num_hidden_layers": _deepest_sub_stack},
    "bamba": {"attn_layer_indices": lambda new, old: new.get("attn_layer_indices")
              or [new["num_hidden_layers"] // 2]},
    "granitemoehybrid": {"layer_types": _one_attention_layer},
    "xmod": {"default_language": lambda new, old: (old.get("languages") or ["en_XX"])[0]},
    "lfm2_moe": {"layer_types": lambda new, old: new.get("layer_types") or _conv_and_attention(new, old)},
    "qwen4_exp_text": {"indexer_n_heads": HEADS, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
                       "indexer_budget": 2 * WINDOW, "indexer_compress_ratio": 2},
}


def causal_lm_types() -> list[str]:
    """Every model type that transformers can build as a causal LM, sorted.

    >>> types = causal_lm_types()
    >>> "llama" in types and "gpt2" in types and types == sorted(types)
    True
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def encoder_types() -> list[str]:
    """Every encoder type transformers can build as a masked LM (no encoder-decoders), sorted.

    >>> types = encoder_types()
    >>> "bert" in types and "roberta" in types and "bart" not in types
    True
    """
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return sorted(t for t in MODEL_FOR_MASKED_LM_MAPPING_NAMES
                  if t in CONFIG_MAPPING and not getattr(CONFIG_MAPPING[t](), "is_encoder_decoder", False))


def seq2seq_types() -> list[str]:
    """Every model type transformers can build as a text encoder-decoder (sequence to sequence), sorted.

    >>> types = seq2seq_types()
    >>> "t5" in types and "bart" in types and "llama" not in types
    True
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


def vision_language_types() -> list[str]:
    """Every model type transformers can build as an image-text-to-text model, sorted.

    >>> types = vision_language_types()
    >>> "gemma3" in types and "llava" in types
    True
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def tiny_config_of(model_type: str, n_layers: int | None = None):
    """The default config of ``model_type``, shrunk (see :func:`shrink`).

    >>> cfg = tiny_config_of("gemma3_text")
    >>> cfg.hidden_size, cfg.head_dim, cfg.layer_types
    (64, 16, ['sliding_attention', 'sliding_attention', 'sliding_attention', 'full_attention'])
    """
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ReftgraphError(f"tiny_config_of(): unknown model type {model_type!r}; "
                             "see causal_lm_types() for the causal LMs transformers knows")
    return shrink(CONFIG_MAPPING[model_type](), n_layers)


def shrink(config, n_layers: int | None = None):
    """A tiny deep copy of a transformers config with the same architecture flags.

    >>> from transformers import LlamaConfig, JambaConfig
    >>> shrink(LlamaConfig()).hidden_size, shrink(LlamaConfig(), n_layers=2).num_hidden_layers
    (64, 2)
    >>> shrink(JambaConfig()).layers_block_type      # keeps an attention layer
    ['mamba', 'mamba', 'mamba', 'attention']

    ``n_layers`` defaults to ``min(original, 4)``; a patterned model gets more when it needs
    them to keep one layer of every kind. The original config is not changed.
    """
    from transformers.utils import logging as hf_logging

    ids = _TokenIds()
    new = _shrink_dict(config.to_dict(), n_layers, ids)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        out = type(config)(**new)  # not from_dict, which formats the whole config for a log line
    finally:
        hf_logging.set_verbosity(verbosity)
    for key in ("_attn_implementation_internal", "_experts_implementation_internal"):
        if key in vars(config):
            setattr(out, key, copy.deepcopy(vars(config)[key]))
    return out


# ---------------------------------------------------------------- the dictionary pass
def _shrink_dict(old: dict, n_layers, ids) -> dict:
    """Shrink one config dictionary (and, recursively, its sub-configs); ``old`` is only read."""
    new = dict(old)  # every changed value is a new object, so a shallow copy is enough
    for key, value in old.items():
        if _is_sub_config(value):
            new[key] = _shrink_dict(value, n_layers if key in SUB_CONFIG_TEXT else
                                    min(n_layers or SUB_LAYERS, SUB_LAYERS), ids)
    kept = _shrink_layers(new, old, n_layers)
    _shrink_sizes(new, old)
    for name in PER_LAYER_DICTS:  # after the sizes: overrides scale with their base fields
        if kept and isinstance(old.get(name), dict):
            new[name] = _shrink_per_layer_dict(old[name], kept, old, new)
    _shrink_vocab(new, old, ids)
    _shrink_positions(new, old)
    _zero_dropouts(new)
    for key, value in FIXUPS.get(old.get("model_type", ""), {}).items():
        new[key] = value(new, old) if callable(value) else value
    return new


def _is_sub_config(value) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first(d: dict, names, default=None):
    """The first positive int among ``names`` in ``d``."""
    for name in names:
        if _is_int(d.get(name)) and d[name] > 0:
            return d[name]
    return default


def _scaled(value, old_base, new_base, multiple=8, minimum=8):
    """``value`` with the same ratio to ``new_base`` as it had to ``old_base``."""
    if not old_base or value == old_base:
        return new_base
    return max(minimum, int(round(value * new_base / old_base / multiple)) * multiple)


# ---------------------------------------------------------------- sizes
def _kv_heads(kv, heads, new_heads):
    """Multi-query stays multi-query, grouped-query gets 2 groups, the rest one per head."""
    if kv == 1:
        return 1
    if heads is None:  # a sub-config (DBRX's attention config) without its query heads
        return new_heads // 2 if kv > 1 else new_heads
    return new_heads if kv >= heads else max(1, new_heads // 2)


def _shrink_sizes(new: dict, old: dict) -> None:
    old_width = _first(old, WIDTH)
    old_heads = _first(old, HEAD_COUNTS)
    old_head_dim = _first(old, ("head_dim",)) or (old_width // old_heads if old_width and old_heads
                                                   else None)

    def put(names, rule):
        for name in names:
            value = new.get(name) if isinstance(new.get(name), list) else old.get(name)
            if _is_int(value):
                new[name] = rule(value, name)
            elif isinstance(value, list) and value and all(_is_int(v) for v in value):
                new[name] = [rule(v, name) for v in value]  # one size per (kept) layer

    put(WIDTH + TEXT_WIDTH, lambda v, _: HIDDEN)
    put(WIDTH_SCALED, lambda v, _: _scaled(v, old_width, HIDDEN) if v > 0 else v)
    put(HEAD_COUNTS, lambda v, _: HEADS if v > 1 else v)
    put(KV_OF, lambda v, name: _kv_heads(v, old.get(KV_OF[name]), new.get(KV_OF[name], HEADS)))
    put(HEAD_DIMS, lambda v, _: HEAD_DIM if v > 0 else v)
    _shrink_latent_attention(new, old)
    put(LORA_RANKS, lambda v, _: LORA_RANK if v > 0 else v)
    put(FFN_SIZES, lambda v, _: FFN if v > 0 else v)
    put(EXPERT_FFN_SIZES, lambda v, _: EXPERT_FFN if v > 0 else v)
    put(EXPERT_COUNTS, lambda v, _: min(v, EXPERTS))
    put(TOP_KS, lambda v, _: min(v, TOP_K))
    put(SHARED_EXPERTS, lambda v, _: min(v, 1))
    _shrink_expert_groups(new, old)
    put(SMALL_COUNTS, lambda v, name: min(v, SMALL_COUNTS[name]))
    put(STATE_SIZES, lambda v, _: min(v, STATE))
    put(DT_RANKS, lambda v, _: max(1, HIDDEN // 16))
    put(SSM_GROUPS, lambda v, _: 1)
    put(ONE, lambda v, name: ONE[name])
    new_head_dim = _first(new, ("head_dim",)) or HIDDEN // HEADS
    put(("rotary_dim", "rotary_emb_dim", "rope_dim"),
        lambda v, _: _even(v * new_head_dim / old_head_dim) if old_head_dim else v)
    for name, value in FILL_NONE.items():
        if name in new and new[name] is None and old_heads:
            new[name] = value
    if any(_is_int(old.get(k)) and old[k] > 0 for k in EXPERT_FFN_SIZES):
        for name, value in FILL_NONE_MOE.items():
            if name in new and new[name] is None:
                new[name] = value
    _shrink_ssm_heads(new)
    # multi_query means one key-value head (Falcon's new layout reads num_kv_heads instead)
    if old.get("multi_query") is True and not old.get("new_decoder_architecture"):
        for name in KV_OF:
            if _is_int(new.get(name)):
                new[name] = 1
    for name in ("rope_parameters", "rope_scaling"):
        if isinstance(old.get(name), dict):
            new[name] = _shrink_rope(new[name], old, new)


def _shrink_ssm_heads(new: dict) -> None:
    """State-space heads tile the expanded width: heads * head dim = expand * hidden size."""
    width = _first(new, WIDTH)
    for heads, dim, expand, inner in SSM_HEADS:
        if not (width and _is_int(new.get(heads)) and _is_int(new.get(dim))
                and isinstance(new.get(expand), (int, float))):
            continue
        total = int(new[expand] * width)
        new[heads] = max(1, total // new[dim])
        if inner and _is_int(new.get(inner)):
            new[inner] = new[heads] * new[dim]


def _even(x) -> int:
    return max(2, int(round(x / 2)) * 2)


def _shrink_latent_attention(new: dict, old: dict) -> None:
    """Multi-head latent attention (DeepSeek, MiniCPM3, GLM-4 MoE lite): nope + rope = qk head dim."""
    if not _is_int(old.get("qk_rope_head_dim")):
        return
    nope = old.get("qk_nope_head_dim")
    new["qk_rope_head_dim"] = ROPE_DIM
    if _is_int(nope):
        new["qk_nope_head_dim"] = HEAD_DIM - ROPE_DIM if nope > 0 else 0
    qk = new["qk_rope_head_dim"] + (new.get("qk_nope_head_dim") or 0)
    if "qk_head_dim" in new:
        new["qk_head_dim"] = qk
    if old.get("head_dim") is not None:  # follow whichever field head_dim equalled
        same = {old.get("qk_rope_head_dim"): ROPE_DIM, old.get("qk_head_dim"): qk}
        new["head_dim"] = same.get(old["head_dim"], HEAD_DIM)


def _shrink_expert_groups(new: dict, old: dict) -> None:
    """Grouped routing: 2 groups of 2 experts, picking the top group when it picked fewer than all."""
    for name in EXPERT_GROUPS:
        groups = old.get(name)
        if _is_int(groups) and groups > 1:
            new[name] = 2
            top = old.get("topk_group")
            if _is_int(top):
                new["topk_group"] = 1 if top < groups else 2


def _shrink_rope(rope: dict, old: dict, new: dict) -> dict:
    """Rope parameters (or one dict per layer type) whose entries refer to sizes."""
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return {k: _shrink_rope(v, old, new) for k, v in rope.items()}
    rope = dict(rope)
    old_max = _first(old, MAX_POSITION_FIELDS)
    if _is_int(rope.get("original_max_position_embeddings")):
        rope["original_max_position_embeddings"] = _original_positions(
            rope["original_max_position_embeddings"], old_max)
    half = _rotary_half(rope, new)
    if isinstance(rope.get("mrope_section"), list):
        rope["mrope_section"] = _split(rope["mrope_section"], half)
    for key in ("short_factor", "long_factor"):
        if isinstance(rope.get(key), list):
            rope[key] = [rope[key][round(i * len(rope[key]) / half)] for i in range(half)]
    return rope


def _rotary_half(rope: dict, new: dict) -> int:
    head_dim = new.get("qk_rope_head_dim") or _first(new, ("head_dim",)) or HIDDEN // HEADS
    factor = rope.get("partial_rotary_factor", new.get("partial_rotary_factor", 1.0)) or 1.0
    if _is_int(new.get("rotary_dim")):
        return new["rotary_dim"] // 2
    return max(1, int(head_dim * factor) // 2)


def _split(parts: list, total: int) -> list:
    """``parts`` rescaled to sum to ``total`` (largest remainders, each at least 1 when possible)."""
    whole = sum(parts) or 1
    exact = [p * total / whole for p in parts]
    out = [max(1 if total >= len(parts) else 0, math.floor(x)) for x in exact]
    order = sorted(range(len(parts)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    i = 0
    while sum(out) < total:
        out[order[i % len(order)]] += 1
        i += 1
    while sum(out) > total:
        j = max(range(len(out)), key=lambda k: out[k])
        out[j] -= 1
    return out


# ---------------------------------------------------------------- vocabulary and token ids
class _TokenIds:
    """Maps old special-token ids to new ones, the same way across a config and its sub-configs."""

    def __init__(self):
        self.seen: dict[int, int] = {}
        self.next_free = VOCAB - 1

    def fixed(self, old_id, new_id) -> int:
        if _is_int(old_id):
            self.seen.setdefault(old_id, new_id)
        return new_id

    def other(self, old_id):
        if not _is_int(old_id):
            return old_id
        if old_id in self.seen:
            return self.seen[old_id]
        if 0 <= old_id < VOCAB:
            return old_id
        self.seen[old_id] = self.next_free
        self.next_free -= 1
        return self.seen[old_id]


def _is_token_field(name: str) -> bool:
    return (name.endswith(("_token_id", "_token_index", "_token_ids")) or name in TOKEN_INDEX_FIELDS)


def _shrink_vocab(new: dict, old: dict, ids: _TokenIds) -> None:
    for name in VOCABS:
        if _is_int(old.get(name)):
            new[name] = VOCAB if name != "output_vocab_size" else min(old[name], VOCAB)
    for name, value in old.items():
        if name.endswith(("vocab_size", "_vocab")) and name not in VOCABS and _is_int(value):
            new[name] = min(value, VOCAB)
    for name, new_id in (("pad_token_id", PAD), ("bos_token_id", BOS), ("eos_token_id", EOS)):
        if name in old or "vocab_size" in old:
            value = old.get(name)
            if isinstance(value, list):
                for v in value:
                    ids.fixed(v, new_id)
                new[name] = [new_id]
            else:
                new[name] = ids.fixed(value, new_id)
    for name in sorted(old):
        if _is_token_field(name) and name not in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = old[name]
            new[name] = [ids.other(v) for v in value] if isinstance(value, list) else ids.other(value)
    for name in ("begin_suppress_tokens", "suppress_tokens"):
        if isinstance(old.get(name), list):
            new[name] = sorted({ids.other(v) for v in old[name]})


# ---------------------------------------------------------------- positions, windows, dropouts
def _original_positions(value, old_max):
    if old_max and value < old_max:
        return max(1, int(round(value * MAX_POSITIONS / old_max)))
    return MAX_POSITIONS


def _shrink_positions(new: dict, old: dict) -> None:
    old_max = _first(old, MAX_POSITION_FIELDS)
    for name in MAX_POSITION_FIELDS:
        if _is_int(old.get(name)):
            new[name] = MAX_POSITIONS
    if _is_int(old.get("original_max_position_embeddings")):
        new["original_max_position_embeddings"] = _original_positions(
            old["original_max_position_embeddings"], old_max)
    for name in WINDOWS:
        if _is_int(old.get(name)) and old[name] > 0:
            new[name] = min(old[name], WINDOW)


def _is_dropout(name: str) -> bool:
    return ("dropout" in name or "pdrop" in name or name.endswith(("_drop", "layerdrop", "drop_prob"))
            or name == "drop_path_rate")


def _zero_dropouts(new: dict) -> None:
    for name, value in new.items():
        if _is_dropout(name) and isinstance(value, (int, float)) and not isinstance(value, bool):
            new[name] = 0 if isinstance(value, int) else 0.0


# ---------------------------------------------------------------- layers
def _layer_count(old: dict):
    for name in LAYER_COUNTS:
        if _is_int(old.get(name)) and old[name] > 0:
            return old[name]
    for name in PER_LAYER_LISTS:
        if isinstance(old.get(name), list) and old[name]:
            return len(old[name])
    return None


def _per_layer_lists(old: dict, n: int) -> list[str]:
    """Per-layer list fields: the table's, plus any list of ``n`` entries named after layers."""
    names = [k for k in PER_LAYER_LISTS + SIZE_FIELDS
             if isinstance(old.get(k), list) and len(old[k]) == n]
    names += [k for k, v in old.items() if k not in names and k not in PER_LAYER_SIZES
              and k not in INDEX_LISTS and "layer" in k and isinstance(v, list) and len(v) == n
              and n > 2 and not _is_index_list(k, v, n)]
    return names


def _is_index_list(name: str, value, n: int) -> bool:
    return (isinstance(value, list) and all(_is_int(v) and 0 <= v < n for v in value)
            and (name in INDEX_LISTS or name.endswith(("_layer_ids", "_layer_indices", "_idxs"))))


def _periodic(old: dict, generating: bool = True):
    """The periodic fields of ``old``: name -> (offset field, formula); without ``generating``,
    only those whose per-layer list is absent (the others describe no kind of their own)."""
    out = {}
    for name, rule in PERIODIC.items():
        if _is_int(old.get(name)) and old[name] > 0:
            off, formula, lists = PERIODIC_BY_TYPE.get((old.get("model_type"), name), rule)
            if generating or not any(isinstance(old.get(k), list) for k in lists):
                out[name] = off, formula
    return out


def _kinds(old: dict, n: int) -> list[tuple]:
    """One signature per layer: everything the config says about that layer."""
    lists = _per_layer_lists(old, n)
    indexed = {k: set(v) for k, v in old.items() if _is_index_list(k, v, n)}
    periodic = _periodic(old, generating=False)
    keyed = {k: old[k] for k in PER_LAYER_DICTS if isinstance(old.get(k), dict)}

    def kind(i):
        sig = [str(old[k][i]) for k in lists]
        sig += [str(old[k][i % len(old[k])]) for k in CYCLE_LISTS
                if isinstance(old.get(k), list) and old[k]]
        sig += [i in s for s in indexed.values()]
        sig += [i < old[k] for k in PREFIX_COUNTS if _is_int(old.get(k))]
        sig += [i <= (old[k] if old[k] >= 0 else n - 1) for k in INCLUSIVE_ENDS if _is_int(old.get(k))]
        sig += [i < old[k] for k in EXCLUSIVE_ENDS if _is_int(old.get(k))]
        sig += [i >= n - old[k] for k in SUFFIX_COUNTS if _is_int(old.get(k))]
        sig += [rule(i, old[k], old.get(off, 0) or 0) for k, (off, rule) in periodic.items()]
        sig += [str(sorted(_layer_entry(d, i).items())) for d in keyed.values()]
        return tuple(sig)

    return [kind(i) for i in range(n)]


def _layer_entry(per_layer: dict, i: int) -> dict:
    for key, value in per_layer.items():
        if str(key).isdigit() and int(key) == i and isinstance(value, dict):
            return value
    return {}


def _select_layers(kinds: list[tuple], target: int, copies: int = 1,
                   keep_last: bool = False) -> list[int]:
    """The first ``copies`` layers of every kind (and the last layer with ``keep_last``), topped
    up with the first layers to ``target``; past the original depth the last layer repeats."""
    seen, kept = {}, {len(kinds) - 1} if keep_last else set()
    for i, k in enumerate(kinds):
        if seen.get(k, 0) < copies:
            seen[k] = seen.get(k, 0) + 1
            kept.add(i)
    for i in range(len(kinds)):
        if len(kept) >= target:
            break
        kept.add(i)
    kept = sorted(kept)
    return kept + [len(kinds) - 1] * (target - len(kept))


def _merge_units(old: dict, unit: int) -> dict:
    """A config whose layers are written as ``unit`` entries each, with one entry per layer."""
    n = _layer_count(old)
    merged = dict(old)
    for name in _per_layer_lists(old, n):
        merged[name] = old[name][::unit]
    for name in LAYER_COUNTS + PREFIX_COUNTS + SUFFIX_COUNTS + tuple(MIDDLE_COUNTS):
        if _is_int(old.get(name)):
            merged[name] = old[name] // unit
    return merged


def _shrink_layers(new: dict, old: dict, n_layers) -> list[int] | None:
    """Choose the layers to keep (returned) and rewrite every layer-pattern field for them."""
    unit = LAYER_UNITS.get(old.get("model_type"), 1)
    old = _merge_units(old, unit) if unit > 1 else old
    n = _layer_count(old)
    if not n:
        return None
    kinds = _kinds(old, n)
    model_type = old.get("model_type")
    target = max(n_layers if n_layers else min(n, LAYERS), MIN_LAYERS.get(model_type, 1))
    kept = _select_layers(kinds, target, KIND_COPIES.get(model_type, 1), model_type in LAST_LAYER_KEPT)
    m = len(kept)
    for name in LAYER_COUNTS:
        if _is_int(old.get(name)) and old[name] > 0:
            new[name] = m
    for name in OTHER_LAYER_COUNTS:
        if _is_int(old.get(name)) and old[name] > 0:
            new[name] = m
    for name in _per_layer_lists(old, n):
        new[name] = [old[name][i] for i in kept]
    for name in CYCLE_LISTS:
        if isinstance(old.get(name), list) and old[name]:
            new[name] = [old[name][i % len(old[name])] for i in kept]
    for name in PER_LAYER_SIZES:
        if isinstance(old.get(name), list) and len(old[name]) == n:
            heads = _first(old, HEAD_COUNTS)
            new[name] = [max(1, round(old[name][i] * HEADS / heads)) if heads else HEADS for i in kept]
    for name, value in old.items():
        if _is_index_list(name, value, n):
            new[name] = [j for j, i in enumerate(kept) if i in set(value)]
    for name in PREFIX_COUNTS + EXCLUSIVE_ENDS:
        if _is_int(old.get(name)):
            new[name] = sum(i < old[name] for i in kept)
    for name in INCLUSIVE_ENDS:
        if _is_int(old.get(name)):
            end = old[name] if old[name] >= 0 else n - 1
            new[name] = sum(i <= end for i in kept) - 1 if old[name] >= 0 else -1
    for name in SUFFIX_COUNTS:
        if _is_int(old.get(name)):
            new[name] = sum(i >= n - old[name] for i in kept)
    for name, (before, after) in MIDDLE_COUNTS.items():
        if _is_int(old.get(name)):
            new[name] = m - new.get(before, 0) - new.get(after, 0)
    for name, (off, rule) in _periodic(old).items():
        wanted = [rule(i, old[name], old.get(off, 0) or 0) for i in kept]
        period, offset = _fit_period(rule, wanted, old[name], old.get(off, 0) or 0)
        new[name] = period
        if off and off in old:
            new[off] = offset
    return kept


def _fit_period(rule, wanted: list[bool], period: int, offset: int):
    """The smallest (period, offset) whose formula gives ``wanted`` on the new layers."""
    m = len(wanted)
    for p in range(1, m + 2):
        for o in range(p):
            if [rule(j, p, o) for j in range(m)] == wanted:
                return p, o
    p = max(1, min(period, m))
    return p, min(offset, p - 1)


def _shrink_per_layer_dict(per_layer: dict, kept: list[int], old: dict, new: dict) -> dict:
    """Per-layer overrides, re-keyed to the kept layers, their sizes scaled like the base field."""
    width = max((len(str(k)) for k in per_layer), default=1)
    out = {}
    for j, i in enumerate(kept):
        entry = _layer_entry(per_layer, i)
        if not entry:
            continue
        scaled = {}
        for key, value in entry.items():
            base_old, base_new = old.get(key), new.get(key)
            if _is_int(value) and _is_int(base_old) and _is_int(base_new) and base_old > 0:
                scaled[key] = max(1, int(round(value * base_new / base_old)))
            else:
                scaled[key] = value
        out[str(j).zfill(width)] = scaled
    return out
