"""Every causal-LM type of the installed transformers, built tiny, resolved and proven.

The same enumeration as ``scripts/architectures.py`` (which writes docs/architectures.md):
proofs for every type, and the plain-hook oracle for every accepted component on a sample."""

import importlib.util
from pathlib import Path

import pytest

from reftgraph.core.sites import COMPONENTS

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "architectures.py"
spec = importlib.util.spec_from_file_location("architectures", SCRIPT)
architectures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(architectures)

ORACLE_EVERY = 6   # every 6th type (and the types below) also runs the oracle here; the script runs all
ORACLE_TYPES = {"llama", "gemma3_text", "phi3", "gptj", "qwen2_moe", "falcon", "bloom", "olmo2", "jamba", "mamba",
                "bert", "bart", "granite", "mpt", "distilbert", "modernbert", "roberta", "neomme", "ergo"}
VLM_TYPES = {"gemma3", "llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "paligemma", "mistral3"}


@pytest.fixture(scope="module")
def rows():
    types = architectures.causal_lm_types()
    return [architectures.survey(t, with_oracle=(i % ORACLE_EVERY == 0 or t in ORACLE_TYPES))
            for i, t in enumerate(types)]


@pytest.fixture(scope="module")
def encoder_rows():
    types = architectures.encoder_types()
    return [architectures.survey(t, with_oracle=(i % ORACLE_EVERY == 0 or t in ORACLE_TYPES), kind="encoder")
            for i, t in enumerate(types)]


@pytest.fixture(scope="module")
def vlm_rows():      # every fourth type and the common ones (the script surveys all)
    types = [t for i, t in enumerate(architectures.vision_language_types()) if i % 4 == 0 or t in VLM_TYPES]
    return [architectures.survey(t, with_oracle=(i % 2 == 0 or t in VLM_TYPES), kind="vlm")
            for i, t in enumerate(types)]


def verified(row, components):
    return all(architectures._cell(row.get(c)) != "no" for c in components)


def test_most_types_build_and_their_stream_components_are_verified(rows):
    built = [r for r in rows if "error" not in r]
    assert len(rows) >= 150 and len(built) >= 0.9 * len(rows)
    assert sum(verified(r, ("resid_pre", "resid_post")) for r in built) >= 0.9 * len(built)
    assert sum(verified(r, ("resid_pre", "resid_post", "attn_out", "mlp_out")) for r in built) >= 150
    styles = {s for r in built for s in r["style"]}
    assert {"sequential", "post_norm", "parallel", "inner_residual", "post_ln", "scaled", "weighted"} <= styles


def test_encoders_build_and_are_proven(encoder_rows):
    built = [r for r in encoder_rows if "error" not in r]
    assert len(encoder_rows) >= 40 and len(built) >= 40
    assert sum(verified(r, ("resid_pre", "resid_post", "attn_out", "mlp_out")) for r in built) >= 30
    failures = [(r["type"], c, r[c]) for r in built for c in COMPONENTS if str(r.get(c, "")).startswith("ORACLE")]
    assert not failures
    for model_type in ("bert", "roberta", "distilbert", "modernbert", "electra", "deberta-v2"):
        row = next(r for r in built if r["type"] == model_type)
        assert verified(row, ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out")), row


def test_no_accepted_component_fails_the_oracle(rows):
    failures = [(r["type"], c, r[c]) for r in rows for c in COMPONENTS if str(r.get(c, "")).startswith("ORACLE")]
    assert not failures


def test_every_refusal_says_why(rows):
    for r in rows:
        for c in COMPONENTS:
            if c in r and architectures._cell(r[c]) == "no":
                assert len(r[c]) > 20, (r["type"], c, r[c])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3",
                                        "mixtral", "qwen2_moe", "gptj", "falcon", "olmo2", "cohere", "stablelm", "bert",
                                        "bart", "marian", "openai-gpt", "mpt", "granite", "minicpm3"])
def test_common_families_keep_their_stream_components(rows, model_type):
    row = next(r for r in rows if r["type"] == model_type)
    assert verified(row, ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")), row


def test_vision_language_text_towers_are_proven(vlm_rows):
    built = [r for r in vlm_rows if "error" not in r]
    assert len(built) >= 0.6 * len(vlm_rows)
    failures = [(r["type"], c, r[c]) for r in built for c in COMPONENTS if str(r.get(c, "")).startswith("ORACLE")]
    assert not failures
    for model_type in VLM_TYPES:
        row = next(r for r in built if r["type"] == model_type)
        assert verified(row, ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out", "q", "k",
                              "v")), row


SEQ2SEQ_TYPES = ("t5", "bart", "mbart", "marian", "pegasus", "m2m_100")


@pytest.fixture(scope="module")
def seq2seq_rows():     # a sample, each stack's components against the oracle (the script surveys all)
    return [architectures.survey(t, kind="seq2seq") for t in SEQ2SEQ_TYPES]


def test_encoder_decoders_are_proven_in_both_stacks(seq2seq_rows):
    stacks = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out", "q", "k", "v")
    for row in seq2seq_rows:
        assert "error" not in row, row
        assert verified(row, stacks + ("cross_attn_out",)), row
        assert verified(row, ["encoder." + c for c in stacks]), row
        assert not [k for k, v in row.items() if str(v).startswith("ORACLE")], row
    totals = architectures._kind_totals(seq2seq_rows, "seq2seq")
    assert totals["seq2seq_resid_attn_mlp"] == totals["seq2seq_cross"] == len(SEQ2SEQ_TYPES)
