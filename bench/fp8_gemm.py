"""FP8 (torch._scaled_mm, E4M3, tensorwise scales) against BF16 matmul speed, M = N = K from 512 to 8192.

Run: `python bench/fp8_gemm.py` (prints) or `python bench/fp8_gemm.py --record` on an FP8 GPU, which
writes fp8_gemm_<device>.json (hw.result_filename) with its provenance into hw.recorded_dir(),
code/mixprec/data/gpu/ in a checkout. Goal: >= 1.6x BF16 at 8192 on H100. Each size is timed with
cuBLAS's default (split) accumulation and with use_fast_accum=True, labelled as such.
On a CPU, _scaled_mm is a reference implementation: the numbers show that it runs, not FP8 speed.
"""

import sys

import torch
from mixprec import cli, hw


def main() -> None:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=cli.at_least(16), nargs="+", default=None, help="matrix sizes n (>= 16: the FP8 kernels' tile)")
    parser.add_argument("--record", action="store_true", help="GPU only: write fp8_gemm_<device>.json into hw.recorded_dir()")
    args = parser.parse_args()
    if args.record:
        try:
            hw.recording_device()  # fail before the run, not after it
        except RuntimeError as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")
    info = hw.device_info()
    device = torch.device(info.device)
    sizes = args.sizes or ([512, 1024, 2048, 4096, 8192] if device.type == "cuda" else [256, 512])
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        a16, b16 = a.bfloat16(), b.bfloat16()
        a8 = a.clamp(-448, 448).to(torch.float8_e4m3fn)
        b8 = b.clamp(-448, 448).to(torch.float8_e4m3fn).t()  # column-major second operand, as the kernels want
        one = torch.ones((), device=device)
        bf16 = hw.benchmark(lambda x=a16, y=b16: x @ y, device=device).median
        # Hopper's FP8 GEMM accumulates in fewer bits than FP32: by default cuBLAS promotes the partial sums
        # to FP32 every so often (slower, more accurate); use_fast_accum=True never does. Both are recorded.
        fp8, fast = (hw.benchmark(lambda x=a8, y=b8, s=one, f=f: torch._scaled_mm(x, y, scale_a=s, scale_b=s, out_dtype=torch.bfloat16,
                                                                                  use_fast_accum=f), device=device).median
                     for f in (False, True))
        rows.append({"n": n, "bf16_tflops": 2 * n**3 / bf16 / 1e12, "fp8_tflops": 2 * n**3 / fp8 / 1e12, "speedup": bf16 / fp8,
                     "fp8_fast_accum_tflops": 2 * n**3 / fast / 1e12, "speedup_fast_accum": bf16 / fast})
        print(f"n={n:5d}  bf16 {rows[-1]['bf16_tflops']:8.2f} TFLOP/s  fp8 {rows[-1]['fp8_tflops']:8.2f} TFLOP/s  speedup {rows[-1]['speedup']:.2f}x"
              f"  (fast accumulation {rows[-1]['fp8_fast_accum_tflops']:8.2f} TFLOP/s, {rows[-1]['speedup_fast_accum']:.2f}x)")
    if args.record:
        try:
            print("recorded", hw.record_gpu_result("fp8_gemm", {"results": rows}))
        except (RuntimeError, OSError) as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")


if __name__ == "__main__":
    main()
