"""Matmul throughput per dtype on this device; on a GPU, records the result for chapter 1.

Run: `python bench/matmul_dtypes.py` (prints) or `python bench/matmul_dtypes.py --record` on a GPU, which
writes matmul_<device>.json (hw.result_filename) into hw.recorded_dir(), code/mixprec/data/gpu/ in a checkout.
"""

import sys

import torch
from mixprec import cli, hw


def main() -> None:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=cli.at_least(1), nargs="+", default=None, help="matrix sizes n (n x n times n x n)")
    parser.add_argument("--record", action="store_true", help="GPU only: write matmul_<device>.json into hw.recorded_dir()")
    args = parser.parse_args()
    if args.record:
        try:
            hw.recording_device()  # fail before the run, not after it
        except RuntimeError as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")

    info = hw.device_info()
    sizes = args.sizes or ([1024, 2048, 4096, 8192] if info.device == "cuda" else [256, 512, 1024])
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    result = {}
    for name, dt in dtypes.items():
        result[name] = {str(n): round(hw.matmul_tflops(n, dt), 3) for n in sizes}
    if info.device == "cuda" and info.native["tf32"]:
        previous = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        result["tf32"] = {str(n): round(hw.matmul_tflops(n, torch.float32), 3) for n in sizes}
        torch.backends.cuda.matmul.fp32_precision = previous
    for name, row in result.items():
        print(f"{name:5s}", "  ".join(f"n={n}: {v:8.2f} TFLOP/s" for n, v in row.items()))
    if args.record:
        try:
            print("recorded", hw.record_gpu_result("matmul", {"tflops": result}))
        except (RuntimeError, OSError) as err:
            sys.exit(f"{parser.prog}: cannot record: {err}")


if __name__ == "__main__":
    main()
