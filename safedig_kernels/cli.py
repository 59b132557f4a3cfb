"""`safedig` command line (the full workflow CLI lands with the workflow issue)."""
from __future__ import annotations

import argparse
import sys


def _demo(_args) -> int:
    import torch

    import safedig_kernels as sk

    sae = sk.random_sae(64, 256, 8, harmful=range(0, 256, 7), seed=0)
    x = torch.randn(2, 16, 64)
    y, h = sk.steer(x, sae, beta=0.5, gamma=1.0, tau=0.0)
    print(f"steered {tuple(x.shape)} tokens: harm score mean {h.mean():.3f}, "
          f"gated {(h > 0).float().mean():.0%}, mean |y - x| {(y - x).abs().mean():.4f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="safedig", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the built-in example").set_defaults(fn=_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
