"""tools/gpu_first_run.sh: the one script of a GPU machine's first run. Its deadlines are tested here with a stub
interpreter (PY): a hung step is cut at the time left, later steps are skipped, and the call still returns on time
with its log; a failed environment check stops everything."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_first_run.sh"


def _stub(tmp_path: Path, hang: str = "", fail: str = "") -> Path:
    stub = tmp_path / "py"
    stub.write_text(f"""#!/usr/bin/env bash
echo "stub: $*" >> "{tmp_path}/calls"
[ "$1" = "-" ] && cat > /dev/null
case "$*" in
  {hang or "@none@"}) exec sleep 60 ;;
  {fail or "@none@"}) exit 3 ;;
esac
exit 0
""")
    stub.chmod(0o755)
    return stub


def _run(tmp_path: Path, budget: int, **env) -> tuple[subprocess.CompletedProcess, str, float]:
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    (wheels / "fake-1.0-py3-none-any.whl").write_text("")
    environ = {**os.environ, "OUT": str(tmp_path / "out"), "WHEELS": str(wheels), "SITE": str(tmp_path / "site"),
               "BUDGET_S": str(budget), "MIN_STEP_S": "2", "MIXPREC_CACHE": str(tmp_path / "cache"), **env}
    start = time.perf_counter()
    res = subprocess.run(["bash", str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=budget + 60)
    took = time.perf_counter() - start
    time.sleep(0.2)  # the log's tee may finish a moment after the script
    return res, (tmp_path / "out" / "run.log").read_text(), took


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_every_step_runs_when_there_is_time(tmp_path):
    res, log, _ = _run(tmp_path, 120, PY=str(_stub(tmp_path)))
    assert res.returncode == 0, log
    calls = (tmp_path / "calls").read_text()
    for expected in ("-m pip install", "bench/matmul_dtypes.py --record", "bench/fp8_gemm.py --record", "bench/generation.py --record",
                     "tools/execute_chapters.py", "--precision fp8 ", "--precision bf16-amp", "--precision fp32", "--precision tf32"):
        assert expected in calls, expected
    assert "FAILED" not in log and "SKIPPED" not in log and "0 step(s) failed or skipped" in log


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_a_hung_step_is_cut_at_the_deadline_and_the_rest_is_skipped(tmp_path):
    budget = 8
    res, log, took = _run(tmp_path, budget, PY=str(_stub(tmp_path, hang="*matmul_dtypes*")))
    assert took < budget + 8  # the deadline holds (timeout's kill grace is 5 s)
    assert "FAILED (124, timed out): bench/matmul_dtypes.py" in log
    skipped = log.count("SKIPPED (no time left)")
    assert skipped == 7 and res.returncode == 1 + skipped, log  # the exit status counts what did not finish


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_a_failed_step_does_not_stop_the_others_but_a_failed_environment_check_does(tmp_path):
    res, log, _ = _run(tmp_path, 120, PY=str(_stub(tmp_path, fail="*fp8_gemm*")))
    assert res.returncode == 1 and "FAILED (3): bench/fp8_gemm.py" in log and "train tf32" in log
    (tmp_path / "calls").unlink()
    res, log, _ = _run(tmp_path, 120, PY=str(_stub(tmp_path, fail="-")))
    assert res.returncode == 4 and "nothing else runs" in log
    assert "bench/" not in (tmp_path / "calls").read_text()
