"""Matmul throughput per dtype on this device; on a GPU, records the result into book/_data/gpu/.

Run: `python bench/matmul_dtypes.py` (prints) or `python bench/matmul_dtypes.py --record` on a GPU.
"""

import argparse

import torch
from mixprec import hw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--record", action="store_true", help="write book/_data/gpu/matmul_<device>.json (GPU only)")
    args = parser.parse_args()

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
        print("recorded", hw.record_gpu_result("matmul", {"tflops": result}))


if __name__ == "__main__":
    main()
