"""Time the architecture proofs add to ``rg.wrap``: for a new config (a tiny instance is built
and every component proven) and for a cached one (the same config again).

    python benchmarks/wrap.py [--repeats 5]

Models are built on the meta device from full-size configs (SmolLM2-135M, Gemma 3 270M,
Llama-3-8B, Mixtral-8x7B, Phi-3-mini, GPT-J-6B shapes; T5-base and BART-base, whose two stacks
are each proven), so the figure is the proofs alone, not loading weights. Each figure is the median of ``repeats`` runs, in seconds, on one thread.
"""

import argparse
import statistics
import time

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, BartConfig, Gemma3TextConfig, GPTJConfig,
                          LlamaConfig, MixtralConfig, Phi3Config, T5Config)

from reftgraph.arch import proofs
from reftgraph.arch.structure import Arch

from common import report

CONFIGS = {
    "smollm2_135m": LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49152),
    "gemma3_270m": Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144),
    "llama3_8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256),
    "mixtral_8x7b": MixtralConfig(),
    "phi3_mini": Phi3Config(),
    "gptj_6b": GPTJConfig(),
    "t5_base": T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, decoder_start_token_id=0),
    "bart_base": BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {}
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = auto.from_config(config)
        new, cached = [], []
        for _ in range(args.repeats):
            proofs.forget()
            start = time.perf_counter()
            arch = Arch.of(model)
            new.append(time.perf_counter() - start)
            start = time.perf_counter()
            Arch.of(model)
            cached.append(time.perf_counter() - start)
        figures[f"{name}_new_s"] = statistics.median(new)
        figures[f"{name}_cached_s"] = statistics.median(cached)
        figures[f"{name}_verified"] = sum(v == "verified" for a in (arch.stacks or {"": arch}).values()
                                          for v in a.table().values())
    figures["max_new_s"] = max(v for k, v in figures.items() if k.endswith("_new_s"))
    figures["max_cached_s"] = max(v for k, v in figures.items() if k.endswith("_cached_s"))
    report(figures)


if __name__ == "__main__":
    main()
