"""LoReFT's orthonormal parametrisation (positive-diagonal QR, a plain function) against
torch.nn.utils.parametrizations.orthogonal: forward+backward time, and whether each
survives pickling (nnsight remote execution pickles interventions).

    python benchmarks/orthogonal.py [--width 576] [--rank 4]
"""

import argparse
import pickle

import torch
from torch import nn

import reftgraph as rg

from common import interleaved, report


class TorchLoReFT(nn.Module):
    """LoReFT with R^T from torch's orthogonal parametrisation (as pyreft does)."""

    def __init__(self, width, rank):
        super().__init__()
        self.rotate = nn.utils.parametrizations.orthogonal(nn.Linear(width, rank, bias=False))
        self.learned = nn.Linear(width, rank)

    def forward(self, h):
        rt = self.rotate.weight.T
        return h + (self.learned(h) - h @ rt) @ rt.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=576)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    h = torch.randn(8, 10, args.width)
    ours, theirs = rg.LoReFT(width=args.width, rank=args.rank), TorchLoReFT(args.width, args.rank)

    def step(op):
        def fn():
            op(h).sum().backward()
        return fn

    times = interleaved({"ours": step(ours), "torch": step(theirs)}, args.repeats, warmup=5)

    def pickles(op):
        try:
            return torch.allclose(pickle.loads(pickle.dumps(op))(h), op(h))
        except Exception as e:  # noqa: BLE001 - report, don't crash
            return f"no ({type(e).__name__})"

    R = ours.R().detach()
    report({
        "width": args.width, "rank": args.rank,
        "ours_fwd_bwd_ms": times["ours"] * 1e3, "torch_orthogonal_fwd_bwd_ms": times["torch"] * 1e3,
        "ours_pickles": pickles(ours), "torch_orthogonal_pickles": pickles(theirs),
        "ours_orthonormality_error": float((R @ R.T - torch.eye(args.rank)).abs().max()),
        "ratio": times["ours"] / times["torch"],
    })


if __name__ == "__main__":
    main()
