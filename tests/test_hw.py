import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mixprec import hw

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = {"device": "NVIDIA H100 80GB HBM3", "torch_version": "2.13", "date": "2026-11-01", "command": "python x.py --record"}


def test_profile_default_and_override(monkeypatch):
    monkeypatch.delenv("MIXPREC_PROFILE", raising=False)
    assert hw.profile() == ("full" if torch.cuda.is_available() else "quick")
    monkeypatch.setenv("MIXPREC_PROFILE", "full")
    assert hw.profile() == "full"
    monkeypatch.setenv("MIXPREC_PROFILE", "fast")
    with pytest.raises(ValueError, match="quick"):
        hw.profile()


def test_device_info_cpu():
    info = hw.device_info("cpu")
    assert info.device == "cpu" and info.compute_capability is None
    assert set(info.native) == {"fp16", "bf16", "tf32", "fp8"}
    assert info.native["fp8"] is False
    with pytest.raises(ValueError):
        hw.device_info("meta")


def test_peak_table():
    h100 = "NVIDIA H100 80GB HBM3"
    assert round(hw.peak_tflops(h100, "fp8") / hw.peak_tflops(h100, "bf16"), 2) == 2.0
    assert hw.peak_tflops("Tesla T4", "bf16") is None
    assert hw.peak_tflops("Some GPU", "fp16") is None
    # Whole words, the longest row first: names as torch.cuda.get_device_name() reports them.
    names = {"NVIDIA H200": "H200 SXM", "NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe",
             "NVIDIA H100 NVL": "H100 NVL", "NVIDIA L4": "L4", "NVIDIA L40S": "L40S", "NVIDIA L40": None,
             "NVIDIA A100-SXM4-80GB": "A100 SXM", "NVIDIA A100-PCIE-40GB": "A100 PCIe", "Tesla V100-SXM2-16GB": "V100 SXM2",
             "Tesla T4": "T4", "NVIDIA H200 NVL": None, "NVIDIA GeForce RTX 4090": None}
    assert {name: hw.peak_row(name) for name in names} == names
    assert hw.peak_tflops("NVIDIA H200", "bf16") == hw.PEAK_TFLOPS["H200 SXM"]["bf16"]
    assert hw.peak_tflops("NVIDIA L40S", "bf16") > 2 * hw.peak_tflops("NVIDIA L4", "bf16")
    assert set(hw.PEAK_TFLOPS) == set(hw.PEAK_TFLOPS_SOURCE)
    with pytest.raises(ValueError):
        hw.peak_tflops("H100", "int8")


def test_benchmark_and_matmul():
    calls = []
    t = hw.benchmark(lambda: calls.append(1), warmup=2, repeat=5)
    assert len(calls) == 7 and len(t.times) == 5 and t.spread[0] <= t.median <= t.spread[1]
    assert hw.matmul_tflops(64, torch.float32, "cpu", repeat=2) > 0


def test_result_filename_is_the_one_naming_rule():
    assert hw.result_filename("train", "NVIDIA H100 80GB HBM3", "bf16-amp") == "train_nvidia_h100_80gb_hbm3_bf16-amp.json"
    assert hw.result_filename("matmul", "Tesla T4") == "matmul_tesla_t4.json"
    assert hw.result_filename("fp8_gemm", "NVIDIA L4") == "fp8_gemm_nvidia_l4.json"
    # odd characters (a policy's ':', a '/' that would leave the directory) become one '_'
    assert hw.result_filename("train", " NVIDIA A100-SXM4-80GB ", "emulate:e4m3fn") == "train_nvidia_a100-sxm4-80gb_emulate_e4m3fn.json"
    assert hw.result_filename("train", "../../etc", "a/b") == "train_etc_a_b.json"
    for bad in ("", "Train", "train_", "tr ain", "../x", None):
        with pytest.raises(ValueError, match="prefix"):
            hw.result_filename(bad, "T4")
    with pytest.raises(ValueError, match="device_name"):
        hw.result_filename("train", " / ")
    with pytest.raises(ValueError, match="qualifier"):
        hw.result_filename("train", "T4", "::")


def test_load_recorded_requires_provenance_and_names_the_file(tmp_path):
    (tmp_path / "demo_ok.json").write_text(json.dumps({**PROVENANCE, "v": 1}))
    assert [r["v"] for r in hw.load_recorded("demo", tmp_path)] == [1]
    assert hw.load_recorded("other_", tmp_path) == []
    cases = {
        "demo_missing.json": ({"device": "H100"}, "lacks provenance fields"),
        "demo_number.json": ({**PROVENANCE, "torch_version": 2.13}, "non-empty strings"),
        "demo_empty.json": ({**PROVENANCE, "command": "  "}, "non-empty strings"),
        "demo_null.json": ({**PROVENANCE, "date": None}, "non-empty strings"),
        "demo_list.json": ([PROVENANCE], "JSON object"),
        "demo_cc.json": ({**PROVENANCE, "compute_capability": "9.0"}, "compute_capability"),
    }
    for name, (record, message) in cases.items():
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        for old in bad.iterdir():
            old.unlink()
        (bad / "demo_ok.json").write_text(json.dumps(PROVENANCE))
        (bad / name).write_text(json.dumps(record))
        with pytest.raises(ValueError, match=message) as err:
            hw.load_recorded("demo", bad)
        assert str(bad / name) in str(err.value)  # every error names the file
    (tmp_path / "demo_broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="demo_broken.json"):
        hw.load_recorded("demo", tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        hw.load_recorded("demo", tmp_path / "no-such-dir")
    for bad_name in ("../demo", "*", None):
        with pytest.raises((ValueError, TypeError)):
            hw.load_recorded(bad_name, tmp_path)


def test_recorded_results_ship_with_the_package(monkeypatch):
    monkeypatch.delenv(hw.GPU_DATA_ENV, raising=False)
    assert hw.recorded_dir() == hw.PACKAGE_GPU_DATA == Path(hw.__file__).resolve().parent / "data" / "gpu"
    assert hw.PACKAGE_GPU_DATA.is_dir() and (hw.PACKAGE_GPU_DATA / "README.md").exists()
    pyproject = (ROOT / "code" / "pyproject.toml").read_text()
    package_data = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert '"data/gpu/*.json"' in package_data  # installed by `pip install`, not only present in a checkout
    for record in hw.load_recorded(""):  # whatever has been recorded must say where it came from
        assert all(isinstance(record[k], str) and record[k] for k in hw.PROVENANCE_KEYS)
    assert not (ROOT / "book" / "_data" / "gpu").exists()  # one home, not two


def test_env_var_overrides_the_recorded_results_directory(tmp_path, monkeypatch):
    (tmp_path / "train_t4_fp32.json").write_text(json.dumps({**PROVENANCE, "precision": "fp32"}))
    monkeypatch.setenv(hw.GPU_DATA_ENV, str(tmp_path))
    assert hw.recorded_dir() == tmp_path
    assert [r["precision"] for r in hw.load_recorded("train_")] == ["fp32"]
    monkeypatch.setenv(hw.GPU_DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="MIXPREC_GPU_DATA"):  # a wrong override is an error, not "no results"
        hw.load_recorded("train_")


def _fake_device(monkeypatch, kind: str) -> None:
    fake = hw.DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), {"fp16": True, "bf16": True, "tf32": True, "fp8": True}) if kind == "cuda" \
        else hw.DeviceInfo("cpu", "Some CPU", None, {"fp16": False, "bf16": False, "tf32": False, "fp8": False})
    monkeypatch.setattr(hw, "device_info", lambda device=None: fake)


def test_record_gpu_result_on_a_cpu_raises_a_normal_exception(tmp_path, monkeypatch):
    _fake_device(monkeypatch, "cpu")
    monkeypatch.setenv(hw.GPU_DATA_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="no CUDA GPU"):  # not SystemExit: library code does not end the process
        hw.record_gpu_result("matmul", {"tflops": {}})
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        hw.recording_device()
    assert list(tmp_path.iterdir()) == []


def test_record_gpu_result_writes_the_named_file_with_provenance(tmp_path, monkeypatch):
    _fake_device(monkeypatch, "cuda")
    monkeypatch.setenv(hw.GPU_DATA_ENV, str(tmp_path / "gpu"))
    path = hw.record_gpu_result("train", {"precision": "bf16-amp", "tokens_per_s": 1.0}, "bf16-amp", argv=["-m", "mixprec.bench", "train"])
    assert path == tmp_path / "gpu" / hw.result_filename("train", "NVIDIA H100 80GB HBM3", "bf16-amp")
    (record,) = hw.load_recorded("train_")
    assert record["device"] == "NVIDIA H100 80GB HBM3" and record["compute_capability"] == [9, 0]
    assert record["command"] == "python -m mixprec.bench train" and record["precision"] == "bf16-amp"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    with pytest.raises(ValueError, match="provenance"):
        hw.record_gpu_result("train", {"device": "mine"})


def test_bench_cli_record_on_a_cpu_exits_with_one_line(monkeypatch, capsys):
    from mixprec import bench

    _fake_device(monkeypatch, "cpu")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["train", "--record", "--steps", "1"])  # refused before any training
    message = str(exit_.value.code)
    assert "cannot record" in message and "\n" not in message  # sys.exit(str): one line on stderr, status 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_script_record_on_a_cpu_exits_non_zero():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "matmul_dtypes.py"), "--record", "--sizes", "8"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "cannot record" in res.stderr


def test_every_writer_uses_the_one_naming_and_record_functions():
    for script in sorted((ROOT / "bench").glob("*.py")) + [ROOT / "code" / "mixprec" / "bench.py"]:
        text = script.read_text()
        if "--record" in text:
            assert "hw.record_gpu_result(" in text, f"{script.name} records without hw.record_gpu_result"
            assert ".json\"" not in text and "_data" not in text, f"{script.name} composes a result file name itself"
    gpu = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-book.yml").read_text())
    steps = [s for job in gpu["jobs"].values() for s in job.get("steps", [])]
    (record,) = [s for s in steps if s.get("name", "").startswith("Record GPU results")]
    assert "tools/record_gpu_results.sh" in record["run"]  # the one recording command, also run by hand on a GPU box
    script = (ROOT / "tools" / "record_gpu_results.sh").read_text()
    commands = [line for line in script.splitlines() if line.lstrip().startswith("run ")]
    assert commands and all("--record" in c and "--out" not in c for c in commands)
    assert ".json" not in script  # no file names: the writers name their files with hw.result_filename
    uploaded = [s["with"]["path"] for s in steps if s.get("with", {}).get("name") == "gpu-results"]
    assert uploaded == [f"{hw.PACKAGE_GPU_DATA.relative_to(ROOT)}/*.json"]


def test_chapter_executor_reads_every_code_cell_without_its_options():
    """tools/execute_chapters.py (for GPU machines without the book toolchain) runs what the book runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("execute_chapters", ROOT / "tools" / "execute_chapters.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for chapter in sorted((ROOT / "book").glob("0*.md")):
        text = chapter.read_text(encoding="utf-8")
        cells = tool.code_cells(text)
        assert len(cells) == text.count("{code-cell}"), chapter.name
        assert not any(c.lstrip().startswith((":tags:", "---")) for c in cells), chapter.name
        for cell in cells:
            compile(cell, chapter.name, "exec")  # valid Python: no option line or fence left in


def test_self_time_shares_reads_the_profile_by_device():
    from torch.autograd.profiler_util import FunctionEventAvg
    from torch.profiler import ProfilerActivity, profile

    # The attribute a CUDA profile is ranked by exists on the averaged events (the CPU build has the same class).
    assert all(hasattr(FunctionEventAvg(), attr) for attr in hw.SELF_TIME_ATTR.values())
    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            (a @ a).relu()
    shares = hw.self_time_shares(prof, "cpu", top=3)
    assert len(shares) == 3 and all(0 <= s <= 1 for _, _, s in shares)
    assert [s for _, _, s in shares] == sorted((s for _, _, s in shares), reverse=True)
    assert any(name == "aten::mm" for name, _, _ in hw.self_time_shares(prof, "cpu", top=10))
    with pytest.raises(ValueError, match="no cuda time"):
        hw.self_time_shares(prof, "cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        hw.self_time_shares(prof, "meta")


def test_recording_refuses_before_the_run_what_it_could_not_label_or_write(tmp_path, monkeypatch, capsys):
    """GPU readiness: an FP8 run that would be emulated is not recorded under the FP8 label, and an unwritable
    recorded_dir() is reported before the benchmark, naming MIXPREC_GPU_DATA (a GPU is faked: the checks come first)."""
    from mixprec import bench

    fake_gpu = hw.DeviceInfo("cuda", "NVIDIA H200", (9, 0), {"fp16": True, "bf16": True, "tf32": True, "fp8": True}, [])
    monkeypatch.setattr(hw, "device_info", lambda device=None: fake_gpu)
    monkeypatch.setattr(bench, "run_train", lambda args: pytest.fail("the benchmark ran before the check"))
    monkeypatch.setenv("MIXPREC_GPU_DATA", str(tmp_path))
    for precision in ("fp8", "fp8:blockwise"):  # no CUDA build here: torchao's kernels cannot run, so the emulation would
        with pytest.raises(SystemExit) as stop:
            bench.main(["train", "--precision", precision, "--record", "--quiet"])
        assert "would run emulated here" in str(stop.value.code) and "only native FP8 runs are recorded" in str(stop.value.code)
    from mixprec import fp8  # on an FP8 GPU too: torchao.float8 has no blockwise recipe, so that run is emulated

    monkeypatch.setattr(fp8, "device_info", lambda device=None: fake_gpu)
    assert fp8.fp8_engine("tensorwise") == (True, "torchao float8 training")
    with pytest.raises(SystemExit) as stop:
        bench.main(["train", "--precision", "fp8:blockwise", "--record", "--quiet"])
    assert "torchao.float8 has no 'blockwise' recipe" in str(stop.value.code)
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("MIXPREC_GPU_DATA", str(blocked / "sub"))
    with pytest.raises(SystemExit) as stop:
        bench.main(["train", "--precision", "bf16-amp", "--record", "--quiet"])
    assert "cannot write recorded results" in str(stop.value.code) and "MIXPREC_GPU_DATA" in str(stop.value.code)
