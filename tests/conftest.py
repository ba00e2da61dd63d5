"""Shared fixtures: the book is built once per test session, for the book tests and the browser tests.

Before the build, ``python -m mixprec.story.warm`` trains the storyteller the chapters share.
When the session also runs the Colab test, its notebooks start running in a fresh virtual
environment in the background just before the book build, each process on one core, so that the
two long jobs overlap instead of adding up.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
# The tests' own jupyter cache, emptied before the build: every chapter executes (no result of an
# earlier local build is reused), and the PDF build (tests/test_pdf.py) then reuses this execution.
TEST_CACHE = ROOT / "_build" / ".jupyter_cache" / "tests"
COLAB_WORK = ROOT / "_build" / "colab-check"
_background: dict[str, subprocess.Popen] = {}


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: a fast run (`-m "not book"`) starts no Colab run
def pytest_collection_modifyitems(session, config, items):
    config.run_colab = any(item.nodeid.startswith("tests/test_colab.py") and "colab_run" in item.fixturenames for item in items)


def _one_core_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def book_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the tests' book builds: cache mode on the tests' own jupyter cache."""
    env = {**(base if base is not None else os.environ), "BOOK_JUPYTER_CACHE": str(TEST_CACHE)}
    env.pop("BOOK_EXECUTE", None)
    return env


def start_colab_run() -> subprocess.Popen:
    if "colab" not in _background:
        COLAB_WORK.mkdir(parents=True, exist_ok=True)
        log = open(COLAB_WORK / "run.log", "w")  # noqa: SIM115 (closed with the process)
        _background["colab"] = subprocess.Popen([sys.executable, str(ROOT / "tools" / "run_colab_notebooks.py"), "--workdir", str(COLAB_WORK)],
                                                cwd=ROOT, env=_one_core_env(), stdout=log, stderr=subprocess.STDOUT)
    return _background["colab"]


@pytest.fixture(scope="session")
def build_log(request):
    jb = shutil.which("jupyter-book")
    assert jb, "jupyter-book is not installed (it is in requirements.txt)"
    parallel = getattr(request.config, "run_colab", False)
    # The trained storyteller that seven chapters (and their Colab notebooks) read is built first and timed
    # on its own (_build/warm.log): no chapter's time includes a model they all share. One thread, as the
    # chapters run here: the weights depend on the thread count (summation order), and the chapters'
    # assertions were measured on the one-thread model.
    (ROOT / "_build").mkdir(exist_ok=True)
    warm = subprocess.run([sys.executable, "-m", "mixprec.story.warm"], cwd=ROOT, capture_output=True, text=True,
                          env=_one_core_env())
    (ROOT / "_build" / "warm.log").write_text(warm.stdout + warm.stderr)
    assert warm.returncode == 0, "python -m mixprec.story.warm failed:\n" + (warm.stdout + warm.stderr)[-4000:]
    if parallel:
        start_colab_run()
    cmd = [jb, "build", str(ROOT), "--all", "-W", "-n", "--keep-going"]  # --all: no stale pages
    shutil.rmtree(TEST_CACHE, ignore_errors=True)  # a fresh execution of every chapter
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=book_env(_one_core_env() if parallel else None))
    log = res.stdout + res.stderr
    (ROOT / "_build").mkdir(exist_ok=True)
    (ROOT / "_build" / "build.log").write_text(log)
    assert res.returncode == 0, "book build failed:\n" + log[-6000:]
    return log


@pytest.fixture(scope="session")
def pdf_log(build_log):
    """The PDF edition (xelatex), built after the HTML build from its execution cache: nothing runs again."""
    jb = shutil.which("jupyter-book")
    shutil.rmtree(ROOT / "_build" / "latex", ignore_errors=True)
    cmd = [jb, "build", str(ROOT), "--builder", "pdflatex", "-n", "--keep-going"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=book_env())
    log = res.stdout + res.stderr
    (ROOT / "_build" / "pdf.log").write_text(log)
    assert res.returncode == 0, "PDF build failed:\n" + log[-6000:]
    return log


@pytest.fixture(scope="session")
def colab_run():
    """The finished Colab run: its process (started in the background by the build, or now)."""
    process = start_colab_run()
    try:
        process.wait(timeout=3600)
    finally:
        if process.poll() is None:
            process.kill()
    return process
