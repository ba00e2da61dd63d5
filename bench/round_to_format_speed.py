"""Speed of mixprec.formats.round_to_format as a ratio to torch's native cast.

Goal (issue 15): the compiled path within 2x of `x.to(torch.float16)` on 16M float32 elements, for
every format and both rounding modes. Prints one line per format and rounding mode, for the eager
reference and the fused `torch.compile` kernel (`impl="compiled"`, opt-in in the book through
`MIXPREC_COMPILE_ROUNDING=1`), and the one-time compile cost.
Run with `python bench/round_to_format_speed.py [--device cuda] [--n 16777216] [--no-compiled]`.
"""

import platform
import time

import torch
from mixprec import cli, hw
from mixprec.formats import compiled_rounding_status, round_to_format

FORMATS = ["fp16", "bf16", "e4m3fn", "e5m2", "tf32"]


def main() -> None:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=cli.at_least(1), default=16 * 2**20, help="elements rounded per call")
    parser.add_argument("--device", type=cli.device, default="cpu")
    parser.add_argument("--repeat", type=cli.at_least(1), default=7)
    parser.add_argument("--no-compiled", action="store_true", help="only the eager path")
    args = parser.parse_args()

    x = torch.randn(args.n, generator=torch.Generator().manual_seed(0)).to(args.device)
    native = hw.benchmark(lambda: x.to(torch.float16), repeat=args.repeat, device=args.device).median
    print(f"device={args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, n={args.n:,}")
    print(f"native x.to(float16): {native * 1e3:.1f} ms")
    impls = ["eager"] if args.no_compiled else ["eager", "compiled"]
    if not args.no_compiled:  # the compile cost, paid once per process (and per rounding/overflow variant)
        for rounding in ("nearest", "stochastic"):
            start = time.perf_counter()
            round_to_format(x[:4096], "fp16", rounding, impl="compiled")
            print(f"compile ({rounding}): {time.perf_counter() - start:.1f} s, status: {compiled_rounding_status()}")
    print(f"{'format':8s} {'rounding':10s} " + " ".join(f"{i:>20s}" for i in impls))
    for rounding in ("nearest", "stochastic"):
        for fmt in FORMATS:
            cells = []
            for impl in impls:
                round_to_format(x[:4096], fmt, rounding, impl=impl)  # a variant's own compile (overflow mode) is not timed
                t = hw.benchmark(lambda fmt=fmt, impl=impl, rounding=rounding: round_to_format(x, fmt, rounding, impl=impl),
                                 repeat=args.repeat, device=args.device).median
                cells.append(f"{t * 1e3:7.1f} ms {t / native:5.2f}x")
            print(f"{fmt:8s} {rounding:10s} " + " ".join(f"{c:>20s}" for c in cells))
    print("ratios are to the native fp16 cast; goal for the compiled path: <= 2x")


if __name__ == "__main__":
    main()
