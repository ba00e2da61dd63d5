"""The book's execution budget: build the whole book from a cold cache and print each chapter's time.

Cold means a fresh jupyter cache (``BOOK_JUPYTER_CACHE``) and a fresh mixprec cache (``MIXPREC_CACHE``:
no tokenizer or trained storyteller on disk), so every chapter executes, as on a fresh CI machine. As the
test command does, ``python -m mixprec.story.warm`` first trains the storyteller that seven chapters share
(timed on its own line); every other model and ``story.compare`` run is made by the chapter that needs
it. The times are myst-nb's own (jupyter-cache records each notebook's execution seconds); the total is the build's wall time, execution plus Sphinx. With
``--cells N`` it also prints each chapter's N slowest cells (nbclient's per-cell timing, switched on
for this build only) with their line in the chapter's source.

    python bench/book_budget.py [--out DIR] [--json FILE] [--cells 5] [--timeout-scale 4]

Targets on the 2-core machine (issue 15): every chapter <= 3 minutes, the whole book <= 12 minutes.
The build folder is kept (``DIR/_build/html``, the cache in ``DIR/jupyter_cache``): a PDF build can
reuse the execution with ``BOOK_JUPYTER_CACHE=DIR/jupyter_cache jupyter-book build . --builder pdflatex``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from mixprec import cli

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_LIMIT_S, BOOK_LIMIT_S = 180, 720


# jupyter-book in a child process with nbclient's per-cell timing on (myst-nb leaves it off). The
# timings are moved out of the notebook before jupyter-cache stores it (cell metadata is part of its
# hash: left in, the cache would never match again), into BOOK_BUDGET_TIMINGS, one line per notebook.
_JB_WITH_TIMING = """
import json, os, sys
import myst_nb.core.execute.cache as c
_run = c.single_nb_execution
def timed(nb, **kwargs):
    result = _run(nb, **{**kwargs, "record_timing": True})
    rows = [[cell.metadata.pop("execution", {}), cell.source] for cell in nb.cells if cell.cell_type == "code"]
    with open(os.environ["BOOK_BUDGET_TIMINGS"], "a", encoding="utf-8") as f:
        f.write(json.dumps(rows) + "\\n")
    return result
c.single_nb_execution = timed
from jupyter_book.cli.main import main
sys.argv = ["jupyter-book"] + sys.argv[1:]
main()
"""
CELL_START = re.compile(r"^`{3,}\{code-cell\}")


def slowest_cells(cache: Path, timings: Path, n: int) -> dict[str, list[tuple[float, int, str]]]:
    """(seconds, source line, first code line) of each chapter's n slowest cells."""
    from datetime import datetime

    from jupyter_cache import get_cache

    recorded = [json.loads(line) for line in timings.read_text(encoding="utf-8").splitlines()] if timings.exists() else []
    db = get_cache(str(cache))
    result = {}
    for record in db.list_cache_records():
        source = Path(record.uri)
        lines = [i + 1 for i, line in enumerate(source.read_text(encoding="utf-8").splitlines()) if CELL_START.match(line)]
        sources = [c.source for c in db.get_cache_bundle(record.pk).nb.cells if c.cell_type == "code"]
        rows = next((r for r in recorded if [src for _, src in r] == sources), [])
        timed = []
        for k, (ex, src) in enumerate(rows):
            if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
                t0, t1 = (datetime.fromisoformat(ex[key].replace("Z", "+00:00")) for key in ("iopub.execute_input", "shell.execute_reply"))
                first = next((x for x in src.splitlines() if x.strip() and not x.startswith(("#", ":", "---"))), "")
                timed.append(((t1 - t0).total_seconds(), lines[k] if k < len(lines) else -1, first[:90]))
        result[source.stem] = sorted(timed, reverse=True)[:n]
    return dict(sorted(result.items()))


def chapter_times(cache: Path) -> dict[str, float]:
    from jupyter_cache import get_cache

    times = {}
    for record in get_cache(str(cache)).list_cache_records():
        times[Path(record.uri).stem] = float(record.data.get("execution_seconds", float("nan")))
    return dict(sorted(times.items()))


MARKER = "book_budget.marker"  # in every build folder this script made: only such a folder is ever emptied


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        help=f"build folder: new, empty, or an earlier one of this script (holding {MARKER}), which is emptied "
                             "(default: a new temporary folder, kept)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--cells", type=cli.at_least(0), default=0, help="print each chapter's N slowest cells")
    parser.add_argument("--timeout-scale", type=cli.positive_float, default=1.0,
                        help="multiply the chapters' execution timeouts (to measure chapters that exceed them)")
    args = parser.parse_args(argv)
    try:  # everything checked before anything is deleted or built
        if args.out is not None:
            cli.check_out_folder(args.out, MARKER)
        if args.json is not None:
            cli.check_out_file(args.json, "--json")
    except cli.UsageError as error:
        parser.error(str(error))
    jb = shutil.which("jupyter-book") or sys.exit("jupyter-book is not installed (requirements.txt)")
    out = (args.out or Path(tempfile.mkdtemp(prefix="book_budget_"))).resolve()
    if (out / MARKER).is_file():  # an earlier build of this script: start cold
        for item in out.iterdir():
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("a build folder of bench/book_budget.py: its next run with --out here empties it\n")
    cache, mixprec_cache = out / "jupyter_cache", out / "mixprec_cache"
    timings = out / "cell_timings.jsonl"
    # One thread, as the test command builds the book (tests/conftest.py): the trained weights and runs depend on
    # the thread count, and the chapters' assertions were measured on one thread.
    env = {**os.environ, "BOOK_JUPYTER_CACHE": str(cache), "MIXPREC_CACHE": str(mixprec_cache), "BOOK_BUDGET_TIMINGS": str(timings),
           "BOOK_TIMEOUT_SCALE": str(args.timeout_scale), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("BOOK_EXECUTE", None)  # cache mode: the executions are recorded in the (empty) cache
    load_before = os.getloadavg()[0]
    # the storyteller seven chapters share, built first as the test command builds it (python -m mixprec.story.warm)
    start = time.perf_counter()
    warm = subprocess.run([sys.executable, "-m", "mixprec.story.warm"], env=env,
                          cwd=ROOT, capture_output=True, text=True)
    warm_s = time.perf_counter() - start
    if warm.returncode != 0:
        sys.exit("python -m mixprec.story.warm failed:\n" + (warm.stdout + warm.stderr)[-4000:])
    start = time.perf_counter()
    cmd = [sys.executable, "-c", _JB_WITH_TIMING] if args.cells else [jb]
    res = subprocess.run([*cmd, "build", str(ROOT), "--all", "--path-output", str(out)], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "build.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        print((res.stdout + res.stderr)[-4000:])
        sys.exit(f"book build failed (log: {out / 'build.log'})")
    times = chapter_times(cache)
    executed = sum(times.values())
    print(f"{date.today()}  {platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, MIXPREC_PROFILE={os.environ.get('MIXPREC_PROFILE', '(default)')}")
    # other work on the machine stretches every figure: the load average says how much there was
    print(f"load average (1 min): {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores")
    print(f"{'shared storyteller':24s} {warm_s:8.1f}  (python -m mixprec.story.warm, before the build)")
    print(f"{'chapter':24s} {'seconds':>8s}")
    for name, seconds in times.items():
        flag = "" if seconds <= CHAPTER_LIMIT_S else f"  over the {CHAPTER_LIMIT_S} s target"
        print(f"{name:24s} {seconds:8.1f}{flag}")
    print(f"{'all chapters executing':24s} {executed:8.1f}")
    print(f"{'whole build (wall)':24s} {wall:8.1f}" + ("" if wall <= BOOK_LIMIT_S else f"  over the {BOOK_LIMIT_S} s target"))
    print(f"build folder: {out}")
    cells = slowest_cells(cache, timings, args.cells) if args.cells else {}
    for name, rows in cells.items():
        print(f"{name}: " + "; ".join(f"line {line} {sec:.1f} s `{first}`" for sec, line, first in rows))
    if args.json:
        cli.write_out_file(args.json, json.dumps({"date": str(date.today()), "cores": os.cpu_count(), "chapters": times,
                                         "executing_s": executed, "wall_s": wall, "warm_s": warm_s,
                                         "slowest_cells": cells}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
