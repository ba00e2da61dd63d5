"""What this device can do: native low-precision support, peak FLOP/s tables, a correct timer, the run profile."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

Profile = Literal["quick", "full"]


def profile() -> Profile:
    """``"full"`` on a CUDA GPU, ``"quick"`` otherwise; the environment variable MIXPREC_PROFILE overrides."""
    chosen = os.environ.get("MIXPREC_PROFILE", "").strip().lower()
    if chosen:
        if chosen not in ("quick", "full"):
            raise ValueError(f"MIXPREC_PROFILE must be 'quick' or 'full', got {chosen!r}")
        return chosen  # type: ignore[return-value]
    return "full" if torch.cuda.is_available() else "quick"


def _cpu_name_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and instruction-set flags from /proc/cpuinfo (Linux); a fallback elsewhere."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first CPU's entry is enough
    except OSError:
        pass
    return info.get("model name") or platform.processor() or platform.machine(), set(info.get("flags", "").split())


@dataclass(frozen=True)
class DeviceInfo:
    """One device and which low-precision formats it computes natively (fast) rather than by emulation."""

    device: str  # "cuda" or "cpu"
    name: str
    compute_capability: tuple[int, int] | None
    native: dict[str, bool]  # format -> has fast hardware for matmul in it
    notes: list[str] = field(default_factory=list)
    torch_version: str = torch.__version__

    def as_dict(self) -> dict:
        return asdict(self)


def device_info(device: str | torch.device | None = None) -> DeviceInfo:
    """Describe ``device`` (default: the first GPU if there is one, else the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("a CUDA device was asked for, but torch.cuda.is_available() is False")
        cc = torch.cuda.get_device_capability(dev)
        notes = []
        # Tensor cores: FP16 since Volta (7.0), BF16 and TF32 since Ampere (8.0), FP8 since Ada/Hopper (8.9).
        native = {"fp16": cc >= (7, 0), "bf16": cc >= (8, 0), "tf32": cc >= (8, 0), "fp8": cc >= (8, 9)}
        if torch.cuda.is_bf16_supported() and not native["bf16"]:
            notes.append(
                "torch.cuda.is_bf16_supported() is True here, but this GPU has no BF16 tensor cores: "
                "BF16 runs through emulation and is slow"
            )
        return DeviceInfo("cuda", torch.cuda.get_device_name(dev), cc, native, notes)
    if dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {dev.type!r}")
    name, flags = _cpu_name_and_flags()
    native = {
        "fp16": bool({"avx512_fp16", "amx_fp16"} & flags),
        "bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "tf32": False,
        "fp8": False,
    }
    notes = [f"ISA level used by torch: {torch.backends.cpu.get_cpu_capability()}"]
    if not (native["fp16"] or native["bf16"]):
        notes.append("no FP16/BF16 arithmetic units: low precision is converted to FP32 to compute, usually slower")
    return DeviceInfo("cpu", name, None, native, notes)


# Peak dense (no 2:4 sparsity) throughput in TFLOP/s, from the vendors' datasheets and
# architecture whitepapers. FP32 is the non-tensor vector rate; TF32/FP16/BF16/FP8 are tensor-core
# rates with FP32 accumulation. None: no hardware path for that type.
PEAK_TFLOPS: dict[str, dict[str, float | None]] = {
    "V100 SXM2": {"fp32": 15.7, "tf32": None, "fp16": 125.0, "bf16": None, "fp8": None},
    "T4": {"fp32": 8.1, "tf32": None, "fp16": 65.0, "bf16": None, "fp8": None},
    "A100 SXM": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "fp8": None},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0, "fp8": 242.5},
    "H100 SXM": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9},
}
PEAK_TFLOPS_SOURCE = {
    "V100 SXM2": "NVIDIA Tesla V100 GPU datasheet (2020)",
    "T4": "NVIDIA T4 Tensor Core GPU datasheet (2019)",
    "A100 SXM": "NVIDIA A100 Tensor Core GPU datasheet (2021); sparse figures halved",
    "L4": "NVIDIA L4 Tensor Core GPU datasheet (2023); sparse figures halved",
    "H100 SXM": "NVIDIA H100 Tensor Core GPU architecture whitepaper (2022), Table 3",
}


def peak_tflops(gpu_name: str, dtype: str) -> float | None:
    """Datasheet peak for a GPU whose name contains one of the table's keys (e.g. 'NVIDIA H100 80GB HBM3')."""
    if dtype not in ("fp32", "tf32", "fp16", "bf16", "fp8"):
        raise ValueError(f"dtype must be one of fp32, tf32, fp16, bf16, fp8; got {dtype!r}")
    for key, row in PEAK_TFLOPS.items():
        if key.split()[0].lower() in gpu_name.lower():
            return row[dtype]
    return None


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs; the median is the number to quote."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the runs."""
        return min(self.times), max(self.times)


def benchmark(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 7, device: str | torch.device | None = None) -> Timing:
    """Time ``fn()``: warm-up runs first, then ``repeat`` timed runs.

    On a GPU the work is asynchronous, so a CPU clock around the call measures only the launch.
    We record CUDA events on the stream and synchronise before reading them.
    """
    if repeat < 1 or warmup < 0:
        raise ValueError("repeat must be >= 1 and warmup >= 0")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(times)


def matmul_tflops(n: int, dtype: torch.dtype, device: str | torch.device | None = None, repeat: int = 5) -> float:
    """Measured TFLOP/s of an n×n by n×n matmul in ``dtype`` (2·n³ FLOPs per product)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev, dtype)
    b = torch.randn(n, n, generator=g).to(dev, dtype)
    t = benchmark(lambda: a @ b, warmup=1, repeat=repeat, device=dev)
    return 2 * n**3 / t.median / 1e12


# --- GPU results recorded elsewhere -------------------------------------------------------------

GPU_DATA_DIR = Path(__file__).resolve().parents[2] / "book" / "_data" / "gpu"
PROVENANCE_KEYS = ("device", "torch_version", "date", "command")


def provenance(device: str | torch.device | None = None, argv: list[str] | None = None) -> dict:
    """Where a result comes from: device, compute capability, torch version, date and the command that made it."""
    import datetime
    import sys

    info = device_info(device)
    return {
        "device": info.name,
        "compute_capability": list(info.compute_capability) if info.compute_capability else None,
        "torch_version": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *(sys.argv if argv is None else argv)]),
    }


def record_gpu_result(prefix: str, payload: dict) -> Path:
    """Write ``book/_data/gpu/<prefix>_<device>.json``: ``payload`` plus its provenance. GPU results only."""
    info = device_info()
    if info.device != "cuda":
        raise SystemExit("recording is for GPU results; this device is a CPU")
    path = GPU_DATA_DIR / f"{prefix}_{info.name.lower().replace(' ', '_')}.json"
    path.write_text(json.dumps({**provenance(), **payload}, indent=1, ensure_ascii=False))
    return path


def load_recorded(name: str, directory: Path | None = None) -> list[dict]:
    """Every recorded GPU result file ``<name>*.json``; each must say where it came from."""
    directory = GPU_DATA_DIR if directory is None else Path(directory)
    results = []
    for path in sorted(directory.glob(f"{name}*.json")):
        record = json.loads(path.read_text())
        missing = [k for k in PROVENANCE_KEYS if k not in record]
        if missing:
            raise ValueError(f"{path.name} lacks provenance fields {missing}")
        results.append(record)
    return results


# --- comparing the cost of several variants -----------------------------------------------------


def interleaved_median_times(fns: dict[str, Callable[[], object]], repeats: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function in ``fns``, timed in interleaved rounds.

    Timing one variant after another lets a shared, noisy machine (another job, a clock change) slow
    one of them and not the others; a ratio of two such medians can then say anything. Here each
    round calls every function once, in an order rotated from round to round, so drifts hit all
    variants alike, and the median over ``repeats`` rounds discards the outliers. On a GPU each call
    is bracketed by synchronisations, so the clock sees the work and not only its launch.
    """
    if not fns:
        raise ValueError("fns must name at least one function to time")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not all(callable(fn) for fn in fns.values()):
        raise TypeError("every value of fns must be a callable taking no arguments")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
