"""Cross-check with sae-lens's own writer: SAE folders that sae-lens writes load in reftgraph to
the numbers sae-lens computes. sae-lens pins ``transformer-lens<4``, so it runs in a venv of its
own (never in the tests); the two sides exchange safetensors files. Last line JSON.

    python -m venv /tmp/saevenv && /tmp/saevenv/bin/pip install torch==2.13.0 sae-lens
    /tmp/saevenv/bin/python benchmarks/peer_sae_lens.py --write /tmp/sae-peer     # sae-lens side
    .venv/bin/python benchmarks/peer_sae_lens.py --check /tmp/sae-peer            # reftgraph side

The sae-lens side builds a standard (ReLU), a JumpReLU, a TopK and a TopK SAE with decoder-norm
rescaling, gives each random weights, saves it with ``SAE.save_model`` and writes sae-lens's
``encode`` and ``decode`` of fixed inputs; the reftgraph side loads each folder with
``rg.features.load`` and compares.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE = 24, 96


def write(root: Path) -> None:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    meta = {"hook_name": "blocks.3.hook_resid_post", "model_name": "peer-check"}
    saes = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8)),
        "topk_rescaled": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True)),
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, D_IN, generator=g)
    expected = {"x": x}
    for name, sae in saes.items():
        sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name = meta["hook_name"], meta["model_name"]
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 1.0))
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand(D_SAE, generator=g))
            f = sae.encode(x)
            expected[f"{name}.features"] = f
            expected[f"{name}.decoded"] = sae.decode(f)
        sae.save_model(root / name)
    save_file(expected, str(root / "expected.safetensors"))
    print(json.dumps({"written": sorted(saes)}))


def check(root: Path) -> None:
    import reftgraph as rg

    expected = load_file(str(root / "expected.safetensors"))
    x = expected["x"]
    figures = {}
    for name in ("standard", "jumprelu", "topk", "topk_rescaled"):
        sae = rg.features.load(root / name)
        f = sae.encode(x)
        figures[f"{name}_features_max_diff"] = float((f - expected[f"{name}.features"]).abs().max())
        figures[f"{name}_decoded_max_diff"] = float((sae.decode(f) - expected[f"{name}.decoded"]).abs().max())
        assert sae.trained_at == "resid_post[3]", sae.trained_at
    for key, value in figures.items():
        print(f"{key:>32}: {value:.2e}")
    print(json.dumps(figures))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--write", type=Path)
    side.add_argument("--check", type=Path)
    args = parser.parse_args()
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        write(args.write)
    else:
        check(args.check)
