"""Speed of mixprec.formats.round_to_format as a ratio to torch's native cast.

Goal: within 4x of `x.to(torch.float16)` on 16M float32 elements. Prints one line per format;
run with `python bench/round_to_format_speed.py [--device cuda] [--n 16777216]`.
"""

import argparse
import platform

import torch
from mixprec import hw
from mixprec.formats import round_to_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16 * 2**20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    x = torch.randn(args.n, generator=torch.Generator().manual_seed(0)).to(args.device)
    native = hw.benchmark(lambda: x.to(torch.float16), repeat=args.repeat, device=args.device).median
    print(f"device={args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, n={args.n:,}")
    print(f"native x.to(float16): {native * 1e3:.1f} ms")
    for fmt in ["fp16", "bf16", "e4m3fn", "e5m2", "tf32"]:
        t = hw.benchmark(lambda fmt=fmt: round_to_format(x, fmt), repeat=args.repeat, device=args.device).median
        print(f"round_to_format {fmt:7s}: {t * 1e3:7.1f} ms  = {t / native:4.1f}x native fp16 cast (goal <= 4x)")
    t = hw.benchmark(lambda: round_to_format(x, "bf16", "stochastic"), repeat=args.repeat, device=args.device).median
    print(f"round_to_format bf16 stochastic: {t * 1e3:.1f} ms = {t / native:.1f}x")


if __name__ == "__main__":
    main()
