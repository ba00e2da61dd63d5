"""What this device can do: native low-precision support, peak FLOP/s tables, a correct timer, the run profile."""

from __future__ import annotations

import json
import os
import platform
import re
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
    "A100 PCIe": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0, "fp8": None},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0, "fp8": 242.5},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "fp16": 362.05, "bf16": 362.05, "fp8": 733.0},
    "H100 SXM": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "fp16": 756.5, "bf16": 756.5, "fp8": 1513.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "fp16": 835.5, "bf16": 835.5, "fp8": 1670.5},
    "H200 SXM": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4, "fp8": 1978.9},
}
PEAK_TFLOPS_SOURCE = {
    "V100 SXM2": "NVIDIA Tesla V100 GPU datasheet (2020)",
    "T4": "NVIDIA T4 Tensor Core GPU datasheet (2019)",
    "A100 SXM": "NVIDIA A100 Tensor Core GPU datasheet (2021); sparse figures halved",
    "A100 PCIe": "NVIDIA A100 Tensor Core GPU datasheet (2021), PCIe column; sparse figures halved",
    "L4": "NVIDIA L4 Tensor Core GPU datasheet (2023); sparse figures halved",
    "L40S": "NVIDIA L40S GPU datasheet (2023); sparse figures halved",
    "H100 SXM": "NVIDIA H100 Tensor Core GPU architecture whitepaper (2022), Table 3",
    "H100 PCIe": "NVIDIA H100 Tensor Core GPU datasheet (2023), H100 PCIe column; sparse figures halved",
    "H100 NVL": "NVIDIA H100 Tensor Core GPU datasheet (2024), H100 NVL column; sparse figures halved",
    "H200 SXM": "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column; sparse figures halved "
                "(equal to the H100 SXM's: same GH100 compute, more and faster memory)",
}
# Words in a GPU's name that name a board variant with other peaks than the plain model's (the
# plain name of an SXM board, "NVIDIA H100 80GB HBM3" or "NVIDIA H200", carries no such word).
_VARIANT_WORDS = {"pcie", "nvl"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def peak_row(gpu_name: str) -> str | None:
    """The row of ``PEAK_TFLOPS`` that describes a GPU, by whole words of its name; None if no row does.

    A row matches when all its words are words of the name ('NVIDIA H100 PCIe' -> 'H100 PCIe'; 'NVIDIA L40S'
    is not an L4); the longest match wins. A name without a variant word ('pcie', 'nvl') falls back to the
    model's SXM row ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB' -> the SXM rows).
    """
    if not isinstance(gpu_name, str):
        raise TypeError(f"gpu_name must be a string, got {type(gpu_name).__name__}")
    words = set(_words(gpu_name))
    rows = {key: _words(key) for key in PEAK_TFLOPS}
    full = [key for key, kw in rows.items() if set(kw) <= words]
    if not full and not words & _VARIANT_WORDS:
        full = [key for key, kw in rows.items() if kw[0] in words and all(re.fullmatch(r"sxm\d*", w) for w in kw[1:])]
    return max(full, key=lambda key: len(rows[key])) if full else None


def peak_tflops(gpu_name: str, dtype: str) -> float | None:
    """Datasheet peak of a GPU (e.g. 'NVIDIA H100 80GB HBM3'), matched by ``peak_row``; None if unknown or no such unit."""
    if dtype not in ("fp32", "tf32", "fp16", "bf16", "fp8"):
        raise ValueError(f"dtype must be one of fp32, tf32, fp16, bf16, fp8; got {dtype!r}")
    row = peak_row(gpu_name)
    return PEAK_TFLOPS[row][dtype] if row else None


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


# The profiler's per-operator self time, by device: ``prof.key_averages()`` gives FunctionEventAvg
# entries, which name the GPU time ``self_device_time_total`` (``self_cuda_time_total`` is gone from them).
SELF_TIME_ATTR = {"cpu": "self_cpu_time_total", "cuda": "self_device_time_total"}


def self_time_shares(prof, device: str | torch.device, top: int = 8) -> list[tuple[str, int, float]]:
    """The ``top`` operators of a ``torch.profiler.profile`` by self time on ``device``: (name, calls, share of the total)."""
    kind = torch.device(device).type
    if kind not in SELF_TIME_ATTR:
        raise ValueError(f"device must be one of {sorted(SELF_TIME_ATTR)}, got {kind!r}")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    attr = SELF_TIME_ATTR[kind]
    events = prof.key_averages()
    total = sum(getattr(e, attr) for e in events)
    if total <= 0:
        raise ValueError(f"the profile holds no {kind} time: was it recorded with ProfilerActivity.{kind.upper()}?")
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return [(e.key, e.count, getattr(e, attr) / total) for e in ranked]


# --- GPU results recorded elsewhere -------------------------------------------------------------
#
# One home for them, inside the package (``mixprec/data/gpu/``), so that they ship with every install:
# an editable install (the repository, the GPU workflow) reads and writes code/mixprec/data/gpu/,
# a plain ``pip install`` (Colab) reads the copy in site-packages. MIXPREC_GPU_DATA overrides both.

GPU_DATA_ENV = "MIXPREC_GPU_DATA"
PACKAGE_GPU_DATA = Path(__file__).resolve().parent / "data" / "gpu"
PROVENANCE_KEYS = ("device", "torch_version", "date", "command")


def recorded_dir() -> Path:
    """Where recorded GPU results live: ``$MIXPREC_GPU_DATA`` if set, else ``mixprec/data/gpu/`` in the package."""
    override = os.environ.get(GPU_DATA_ENV, "").strip()
    return Path(override).expanduser() if override else PACKAGE_GPU_DATA


def _slug(part: object, what: str) -> str:
    text = re.sub(r"[^a-z0-9.+-]+", "_", str(part).strip().lower()).strip("_.")
    if not text:
        raise ValueError(f"{what} must contain a letter or digit, got {part!r}")
    return text


def result_filename(prefix: str, device_name: str, *qualifiers: object) -> str:
    """The one naming rule for recorded results: ``<prefix>_<device>[_<qualifier>...].json``.

    ``result_filename("train", "NVIDIA H100 80GB HBM3", "bf16-amp")`` is
    ``"train_nvidia_h100_80gb_hbm3_bf16-amp.json"``: lower case, runs of anything but letters, digits,
    ``.``, ``+`` and ``-`` become one ``_``. ``load_recorded(prefix + "_")`` finds every such file.
    """
    if not isinstance(prefix, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", prefix) or prefix.endswith("_"):
        raise ValueError(f"prefix must be lower-case letters, digits, '_' or '-' (not ending in '_'), got {prefix!r}")
    return "_".join([prefix, _slug(device_name, "device_name"), *(_slug(q, "a qualifier") for q in qualifiers)]) + ".json"


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


def recording_device() -> DeviceInfo:
    """The GPU that results would be recorded from; RuntimeError where there is none, or where ``recorded_dir()``
    cannot be written (check before a long run, not after it)."""
    info = device_info()
    if info.device != "cuda":
        raise RuntimeError(f"recording is for GPU results, and this machine has no CUDA GPU ({info.name}); run without --record to print the figures")
    _check_writable(recorded_dir())
    return info


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RuntimeError(f"cannot write recorded results into {directory} ({error.strerror or error}); "
                           f"set {GPU_DATA_ENV} to a writable folder") from error


def record_gpu_result(prefix: str, payload: dict, *qualifiers: object, directory: str | Path | None = None,
                      argv: list[str] | None = None) -> Path:
    """Write ``payload`` plus its provenance to ``<recorded_dir()>/<result_filename(prefix, device, *qualifiers)>``.

    GPU results only: on a machine without a CUDA GPU this raises RuntimeError (see ``recording_device``).
    ``argv`` is the command to record (default ``sys.argv``). The file is written atomically.
    """
    info = recording_device()
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    clash = sorted(set(payload) & {*PROVENANCE_KEYS, "compute_capability"})
    if clash:
        raise ValueError(f"payload must not set provenance fields {clash}: record_gpu_result writes them")
    directory = recorded_dir() if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / result_filename(prefix, info.name, *qualifiers)
    record = {**provenance(argv=argv), **payload}
    _check_provenance(record, path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _check_provenance(record: object, path: Path) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a recorded result must be a JSON object, got {type(record).__name__}")
    missing = [k for k in PROVENANCE_KEYS if k not in record]
    if missing:
        raise ValueError(f"{path}: lacks provenance fields {missing} (each of {list(PROVENANCE_KEYS)} is required)")
    bad = [k for k in PROVENANCE_KEYS if not isinstance(record[k], str) or not record[k].strip()]
    if bad:
        raise ValueError(f"{path}: provenance fields {bad} must be non-empty strings, got "
                         + ", ".join(f"{k}={record[k]!r}" for k in bad))
    cc = record.get("compute_capability")
    if cc is not None and not (isinstance(cc, list) and len(cc) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in cc)):
        raise ValueError(f"{path}: compute_capability must be null or [major, minor], got {cc!r}")


def load_recorded(name: str, directory: str | Path | None = None) -> list[dict]:
    """Every recorded GPU result file ``<name>*.json`` in ``directory`` (default ``recorded_dir()``), sorted by file name.

    Each must be a JSON object whose provenance (device, torch_version, date, command) are non-empty
    strings; a file that is not says so, naming the file. A missing directory is an error, not "no results".
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a file-name prefix (str), got {type(name).__name__}")
    if "/" in name or "\\" in name or any(c in name for c in "*?["):
        raise ValueError(f"name must be a plain file-name prefix such as 'train_', got {name!r}")
    source = f" (from ${GPU_DATA_ENV})" if directory is None and os.environ.get(GPU_DATA_ENV, "").strip() else ""
    directory = recorded_dir() if directory is None else Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"the recorded GPU results directory {directory}{source} is a file, not a directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"the recorded GPU results directory {directory}{source} does not exist")
    results = []
    for path in sorted(directory.glob(f"{name}*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM (some editors add one) is not an error
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable JSON file ({err})") from err
        _check_provenance(record, path)
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


def default_device() -> torch.device:
    """The device the book runs on when none is named: the GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
