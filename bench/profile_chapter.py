"""Where a chapter's execution time goes: each code cell's wall time, and the calls inside the slow ones.

Runs one chapter's code cells in order in an IPython shell (as ``tools/execute_chapters.py`` does:
``myst_nb.glue`` is stubbed, the cwd is the chapter's folder), each cell under ``cProfile``, and
prints every cell's seconds with its line in the chapter, then, for each cell over ``--min-seconds``,
the mixprec/torch calls with the largest cumulative time. cProfile slows Python-heavy code (training
loops) by roughly a third; compare cells with each other, and use ``bench/book_budget.py`` for times.

    MIXPREC_CACHE=/tmp/cold python bench/profile_chapter.py book/04_bf16_fp16.md [--top 8] [--min-seconds 5]
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from execute_chapters import CELL_START, code_cells  # noqa: E402
from mixprec import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = cli.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("chapter", type=Path)
    parser.add_argument("--top", type=cli.at_least(1), default=8, help="calls shown per slow cell")
    parser.add_argument("--min-seconds", type=cli.non_negative_float, default=5.0, help="profile details for cells slower than this")
    parser.add_argument("--calls", type=cli.regex, default=r"mixprec|torch/(nn|optim|autograd|_tensor)|transformers",
                        help="regular expression on file paths of the calls to show")
    args = parser.parse_args(argv)
    chapter = args.chapter.resolve()
    if not chapter.is_file():
        parser.error(f"no such chapter: {str(args.chapter)!r} (give a book/NN_*.md file)")
    text = chapter.read_text(encoding="utf-8")
    lines = [i + 1 for i, line in enumerate(text.splitlines()) if CELL_START.match(line)]
    cells = code_cells(text)
    if not cells:
        parser.error(f"{str(args.chapter)!r} has no {{code-cell}} blocks: not a chapter")

    stub = types.ModuleType("myst_nb")
    stub.glue = lambda name, variable, display=True: None
    sys.modules["myst_nb"] = stub
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.chdir(chapter.parent)
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    wanted = args.calls
    total = 0.0
    print(f"{chapter.name}: {len(cells)} code cells, MIXPREC_CACHE={os.environ.get('MIXPREC_CACHE', '(default)')}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for n, (source, line) in enumerate(zip(cells, lines), 1):
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        run = shell.run_cell(source, silent=True)
        profile.disable()
        seconds = time.perf_counter() - start
        total += seconds
        first = next((x for x in source.splitlines() if x.strip() and not x.startswith("#")), "")[:80]
        print(f"cell {n:2d} line {line:4d} {seconds:7.1f} s  {first}")
        if not run.success:
            print(f"  failed: {run.error_in_exec or run.error_before_exec}")
            return 1
        if seconds >= args.min_seconds:
            out = io.StringIO()
            stats = pstats.Stats(profile, stream=out)
            rows = []
            for (path, lineno, func), (_, calls, _, cumulative, _) in stats.stats.items():
                if wanted.search(path) and not func.startswith("<"):
                    short = path.split("site-packages/")[-1].split("code/")[-1]
                    rows.append((cumulative, calls, f"{short}:{lineno} {func}"))
            for cumulative, calls, where in sorted(rows, reverse=True)[: args.top]:
                print(f"      {cumulative:7.1f} s  {calls:8d} calls  {where}")
        sys.stdout.flush()
    print(f"total {total:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
