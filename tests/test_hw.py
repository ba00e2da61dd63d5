import json

import pytest
import torch
from mixprec import hw


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
    assert set(hw.PEAK_TFLOPS) == set(hw.PEAK_TFLOPS_SOURCE)
    with pytest.raises(ValueError):
        hw.peak_tflops("H100", "int8")


def test_benchmark_and_matmul():
    calls = []
    t = hw.benchmark(lambda: calls.append(1), warmup=2, repeat=5)
    assert len(calls) == 7 and len(t.times) == 5 and t.spread[0] <= t.median <= t.spread[1]
    assert hw.matmul_tflops(64, torch.float32, "cpu", repeat=2) > 0


def test_load_recorded_requires_provenance(tmp_path):
    (tmp_path / "demo_ok.json").write_text(json.dumps({"device": "H100", "torch_version": "2.13", "date": "2026-11-01", "command": "x", "v": 1}))
    assert hw.load_recorded("demo", tmp_path)[0]["v"] == 1
    (tmp_path / "demo_bad.json").write_text(json.dumps({"device": "H100"}))
    with pytest.raises(ValueError, match="provenance"):
        hw.load_recorded("demo", tmp_path)
    for record in hw.load_recorded(""):  # whatever the book has recorded must say where it came from
        assert all(k in record for k in hw.PROVENANCE_KEYS)
