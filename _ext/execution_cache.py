"""Where the book's executed notebooks are cached, and how long each chapter may run.

``execute_notebooks: cache`` (``_config.yml``) lets a local rebuild reuse every chapter whose code
cells did not change. jupyter-cache only hashes a notebook's own cells, but the chapters' numbers
come from ``mixprec``: a cached chapter would keep numbers computed by an older library. So the cache
folder is named by a key over everything outside the chapter that decides its outputs: every file of
the ``mixprec`` package the kernels import (source, explorers' JavaScript, recorded GPU results), ``requirements.txt`` and
``MIXPREC_PROFILE``. Edit the library and the next build starts from an empty cache; older keys are
pruned (the newest few are kept, so switching branches back is still fast).

Environment (read at every build):

- ``BOOK_JUPYTER_CACHE=DIR`` uses DIR as the cache instead (the tests and ``bench/book_budget.py``
  point it at a fresh folder: everything executes, and a later PDF build reuses that execution);
- ``BOOK_EXECUTE=force`` executes every chapter without any cache (what ``execute_notebooks: force``
  did); ``off`` executes nothing;
- ``BOOK_TIMEOUT_SCALE=F`` multiplies every chapter's ``mystnb.execution_timeout`` (front matter) by F:
  the timeouts are sized for the ``quick`` profile on a 2-core CPU; the GPU workflow's ``full``
  profile runs larger experiments.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path

KEEP = 3  # cache folders kept besides the current one
_TIMEOUT = re.compile(r"^(\s+execution_timeout:\s*)(\d+)", re.M)


def library_dir() -> Path:
    """The mixprec package the chapters' kernels will import (PYTHONPATH or the installed one)."""
    spec = importlib.util.find_spec("mixprec")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mixprec is not importable: pip install -e ./code (requirements.txt)")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def project_root(start: Path) -> Path:
    """The folder holding _config.yml: the source folder, or above it for a single-page build."""
    for folder in (start, *start.parents):
        if (folder / "_config.yml").exists():
            return folder
    return start


def library_key(root: Path, profile: str | None = None, lib: Path | None = None) -> str:
    """A short hash of everything outside a chapter that decides its outputs."""
    h = hashlib.sha256()
    lib = lib or library_dir()
    files = sorted(p for p in lib.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    for path in files:
        h.update(path.relative_to(lib).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    if (root / "requirements.txt").exists():
        h.update(b"requirements.txt\0" + (root / "requirements.txt").read_bytes())
    h.update(f"profile={profile if profile is not None else os.environ.get('MIXPREC_PROFILE', '')}".encode())
    return h.hexdigest()[:16]


def cache_dir(root: Path, build_dir: Path) -> Path:
    explicit = os.environ.get("BOOK_JUPYTER_CACHE")
    if explicit:
        return Path(explicit).resolve()
    return (build_dir / ".jupyter_cache" / f"mixprec-{library_key(root)}").resolve()


def _prune(current: Path) -> None:
    parent = current.parent
    if not parent.is_dir():
        return
    others = sorted((p for p in parent.glob("mixprec-*") if p.is_dir() and p != current), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in others[KEEP:]:
        shutil.rmtree(stale, ignore_errors=True)


def configure(app, config) -> None:
    mode = os.environ.get("BOOK_EXECUTE")
    if mode:
        if mode not in ("force", "cache", "off"):
            raise ValueError(f"BOOK_EXECUTE must be force, cache or off, not {mode!r}")
        config.nb_execution_mode = mode
    if config.nb_execution_mode != "cache":
        return
    root = project_root(Path(app.srcdir))
    path = cache_dir(root, Path(app.outdir).parent)
    path.mkdir(parents=True, exist_ok=True)
    os.utime(path)  # most recently used
    if "BOOK_JUPYTER_CACHE" not in os.environ:
        _prune(path)
    config.nb_execution_cache_path = str(path)


def scale_timeout(app, docname, source) -> None:
    scale = float(os.environ.get("BOOK_TIMEOUT_SCALE", "1") or 1)
    if scale != 1 and source[0].startswith("---\n"):
        head, sep, rest = source[0][4:].partition("\n---\n")
        head = _TIMEOUT.sub(lambda m: f"{m.group(1)}{round(int(m.group(2)) * scale)}", head)
        source[0] = "---\n" + head + sep + rest


def setup(app):
    app.connect("config-inited", configure, priority=100)  # before myst-nb reads the config (builder-inited)
    app.connect("source-read", scale_timeout)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
