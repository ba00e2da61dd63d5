"""Execute the chapters' code cells without Sphinx, one fresh process per chapter.

For machines that have torch and IPython but not the book toolchain (a GPU box, a quick check of a
CUDA branch): each chapter's ``{code-cell}`` blocks run in order in an IPython shell, ``myst_nb.glue``
is replaced by a recorder, and the script prints each chapter's time and its first error. It does not
build the book (no prose, no cross-references): ``jupyter-book build`` stays the real test.

    python tools/execute_chapters.py book/02_loss_scaling.md book/05_fp8.md --out results/ --timeout 300

Writes ``<out>/<chapter>.json``: {"chapter", "seconds", "ok", "error", "glue": {name: text}}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

CELL_START = re.compile(r"^(`{3,})\{code-cell\}")


def code_cells(markdown: str) -> list[str]:
    """The source of every ``{code-cell}`` in a MyST notebook, in order, without its options."""
    cells, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        start = CELL_START.match(lines[i])
        i += 1
        if not start:
            continue
        fence, body = start.group(1), []
        while i < len(lines) and lines[i].rstrip() != fence:
            body.append(lines[i])
            i += 1
        i += 1
        if body and body[0].strip() == "---":  # YAML options block
            end = body.index("---", 1) if "---" in body[1:] else 0
            body = body[end + 1:]
        while body and body[0].startswith(":"):  # short options (":tags: [...]")
            body = body[1:]
        cells.append("\n".join(body))
    return cells


def _run_one(chapter: Path, out: Path) -> None:
    """Child process: run one chapter's cells in an IPython shell, recording glue calls."""
    glued: dict[str, str] = {}

    def glue(name, variable, display=True):
        glued[name] = repr(variable)[:500]

    stub = types.ModuleType("myst_nb")
    stub.glue = glue
    sys.modules["myst_nb"] = stub
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.chdir(chapter.parent)  # chapters run from their own folder, as in the book build
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    result = {"chapter": chapter.name, "ok": True, "error": None, "cells": 0}
    start = time.perf_counter()
    for n, source in enumerate(code_cells(chapter.read_text(encoding="utf-8")), 1):
        run = shell.run_cell(source, silent=True)
        result["cells"] = n
        if not run.success:
            err = run.error_in_exec or run.error_before_exec
            result.update(ok=False, error=f"cell {n}: {type(err).__name__}: {err}\n--- cell source ---\n{source[:1500]}")
            break
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["glue"] = glued
    (out / f"{chapter.stem}.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for <chapter>.json and <chapter>.log (other files are left alone)")
    parser.add_argument("--timeout", type=_timeout, default=600, help="seconds per chapter")
    parser.add_argument("--parallel", action="store_true", help="run the chapters at the same time (timings then overlap)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _run_one(args.chapters[0].resolve(), args.out.resolve())
        return 0
    for chapter in args.chapters:  # everything checked before any chapter runs
        if not chapter.is_file():
            parser.error(f"no such chapter: {str(chapter)!r}")
        if not code_cells(chapter.read_text(encoding="utf-8", errors="replace")):
            parser.error(f"{str(chapter)!r} has no {{code-cell}} blocks: not a chapter")
    stems = [c.stem for c in args.chapters]
    if len(set(stems)) < len(stems):
        parser.error(f"two chapters share a name, and so a report: {', '.join(sorted({s for s in stems if stems.count(s) > 1}))}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {str(args.out)!r} is a file, not a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {str(args.out)!r}: cannot create the folder ({error.strerror or error})")

    def launch(chapter: Path) -> subprocess.Popen:
        (args.out / f"{chapter.stem}.json").unlink(missing_ok=True)  # an earlier run's report must never pass for this one's
        log = open(args.out / f"{chapter.stem}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen([sys.executable, __file__, str(chapter), "--out", str(args.out), "--child"],
                                stdout=log, stderr=subprocess.STDOUT)

    failed = 0
    queue = list(args.chapters)
    running = [(c, launch(c), time.perf_counter()) for c in (queue if args.parallel else queue[:1])]
    queue = [] if args.parallel else queue[1:]
    while running:
        chapter, proc, began = running.pop(0)
        try:
            proc.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - began)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        report = args.out / f"{chapter.stem}.json"
        try:
            result = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else None
        except (OSError, ValueError):  # half-written: the child was killed while writing it
            result = None
        if result is None or proc.returncode != 0:  # killed (timeout) or crashed: whatever it wrote does not count
            failed += 1
            print(f"FAIL {chapter.name}: no result (timeout {args.timeout:.0f} s or crash, exit {proc.returncode}); see {chapter.stem}.log")
        elif not result["ok"]:
            failed += 1
            print(f"FAIL {chapter.name} after {result['seconds']} s: {result['error'].splitlines()[0]}")
        else:
            print(f"ok   {chapter.name}: {result['cells']} cells, {result['seconds']} s, {len(result['glue'])} glued values")
        sys.stdout.flush()
        if queue:
            running.append((queue[0], launch(queue[0]), time.perf_counter()))
            queue = queue[1:]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
