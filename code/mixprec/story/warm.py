"""``python -m mixprec.story.warm``: build (or load) the trained tiny storyteller that seven chapters share.

The test command and ``bench/book_budget.py`` run it before the book build (on one thread, as the
chapters run there), so that no chapter's time includes a model they all read; it prints the seconds.
"""

import time

from ..cache import cache_dir
from . import storyteller


def main() -> int:
    start = time.perf_counter()
    storyteller("tiny", progress=False)
    print(f"warm: the tiny storyteller is in {cache_dir()} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
