"""What a model says about itself: its one-line repr (with its dtype) and the table of what
each component is on which layers."""

import pandas as pd
import pytest
import torch

import reftgraph as rg


@pytest.mark.parametrize("dtype, name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_the_repr_names_the_dtype(dtype, name):
    lm = rg.models.tiny("llama", dtype=dtype)
    assert repr(lm) == f"Model(tiny-llama: llama, 2 layers, width 32, 4 heads, 2 kv heads, {name})"
    assert lm.dtype == dtype


def test_the_summary_is_a_frame_of_components_and_layer_ranges():
    lm = rg.models.tiny("lfm2", num_hidden_layers=4, layer_types=["conv", "full_attention"] * 2)   # attention on 1, 3
    summary = lm.arch.summary()
    assert isinstance(summary, pd.DataFrame) and list(summary.columns) == ["component", "layers", "status"]
    assert summary["component"].drop_duplicates().tolist() == list(rg.COMPONENTS)
    head_out = summary[summary.component == "head_out"]
    assert head_out["layers"].tolist() == ["0", "1", "2", "3"]
    assert head_out["status"].tolist()[1::2] == ["verified", "verified"]
    assert all("attention" in s for s in head_out["status"].tolist()[0::2])
    assert summary[summary.component == "resid_post"].values.tolist() == [["resid_post", "0-3", "verified"]]


def test_the_summary_agrees_with_the_table():
    for family in ("llama", "gpt_neox"):
        arch = rg.models.tiny(family).arch
        summary, table = arch.summary(), arch.table()
        for component, status in table.items():
            rows = summary[summary.component == component]
            if status == "verified":
                assert rows.values.tolist() == [[component, f"0-{arch.n_layers - 1}", "verified"]]
            else:
                assert "verified" not in rows["status"].tolist() or "only" in status
