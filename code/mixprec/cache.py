"""Where trained artifacts live, keyed by everything that determines them, written so they cannot come back wrong.

An entry is a directory ``<cache>/<kind>-<key>``. The key is a hash of the configuration, the
library version, the library's source code (``source_hash``) and the versions of torch,
transformers and tokenizers, so changing the training code or upgrading a dependency retrains
instead of returning a model made by older code; the manifest's copy of the key is checked on load. ``cached`` fills an entry like this:

1. take a file lock for the key (``fcntl``): a second process asking for the same entry waits for
   the first one instead of training again;
2. build the artifact into a fresh temporary directory next to the entry;
3. write ``manifest.json`` last: each file's size and SHA-256, the configuration and what produced it;
4. publish the whole directory with one ``os.rename``: readers see the complete entry or none.

Loading verifies the manifest and every checksum first; a damaged, partial or unreadable entry is
reported in one line on stderr and rebuilt, never loaded. A cache that cannot be written (a
read-only mount) still serves its entries; a missing one is built without being cached, with one
line on stderr. ``python -m mixprec.cache list|verify|clear`` inspects and clears the cache;
``clear`` takes each key's lock, so it never removes what a running writer is building.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from . import __version__

T = TypeVar("T")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PACKAGE_DIR = Path(__file__).resolve().parent
# Modules that only present results (plots, widgets, exercise checkers, the CLI, the clinic's
# stories, the schematics): editing them cannot change a trained artifact, so they stay out of the source hash.
PRESENTATION_ONLY = frozenset({"plots.py", "schematics.py", "amp_schematics.py", "widgets.py", "exercises.py", "notebook.py", "bench.py",
                               "cli.py", "clinic.py", "cache.py"})
# Libraries whose version can change what a trained artifact is (kernels, initialisation, tokenization).
DEPENDENCIES = ("torch", "transformers", "tokenizers")

# A test hook: called with the temporary directory just before the manifest is written and the
# entry is published; the fault suite kills a writer here.
_before_publish: Callable[[Path], None] | None = None


class CacheKeyError(TypeError):
    """An option that cannot be part of a cache key (a callable, an arbitrary object)."""


def cache_dir() -> Path:
    """``$MIXPREC_CACHE`` (``~`` expanded, made absolute), else ``~/.cache/mixprec``; created on first use."""
    path = Path(os.environ.get("MIXPREC_CACHE") or Path.home() / ".cache" / "mixprec").expanduser().absolute()
    if path.exists() and not path.is_dir():
        source = "MIXPREC_CACHE" if os.environ.get("MIXPREC_CACHE") else "the default cache path"
        raise NotADirectoryError(f"{source} {str(path)!r} is a file, not a directory; point MIXPREC_CACHE at a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the cache directory {str(path)!r} (set MIXPREC_CACHE to a writable directory): {error}") from error
    return path


@cache
def source_hash(root: Path = PACKAGE_DIR) -> str:
    """SHA-256 of the library source that trained artifacts depend on: every ``.py`` file under ``root``
    except the presentation-only modules (``PRESENTATION_ONLY``)."""
    digest = hashlib.sha256()
    for file in sorted(Path(root).rglob("*.py")):
        relative = file.relative_to(root).as_posix()
        if relative in PRESENTATION_ONLY or "__pycache__" in relative:
            continue
        digest.update(relative.encode() + b"\x00" + file.read_bytes() + b"\x00")
    return digest.hexdigest()


def key_value(value: Any, where: str = "option") -> Any:
    """``value`` as plain JSON data that determines it completely, or ``CacheKeyError``.

    Numbers, strings, None, lists, tuples and dicts pass through (NaN and inf as strings); a torch
    dtype or device, a Path or an enum by its name; a loss scaler by its class and full
    ``state_dict()``; a dataclass by its fields. A callable or any other object is refused: its
    ``repr`` would either hide settings (two different objects, one key) or hold a memory address
    (a key that never hits).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [key_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CacheKeyError(f"{where}: dict keys in a cache key must be strings, got {list(value)!r}")
        return {k: key_value(v, f"{where}.{k}") for k, v in sorted(value.items())}
    torch = sys.modules.get("torch")  # an object of torch's can only exist if torch is imported
    if isinstance(value, Path) or (torch is not None and isinstance(value, (torch.dtype, torch.device))):
        return str(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if all(hasattr(value, name) for name in ("state_dict", "get_scale", "unscale_")):  # a loss scaler
        cls = type(value)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "enabled": key_value(value.is_enabled(), where),
                "state": key_value(value.state_dict(), where)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"class": f"{cls.__module__}.{cls.__qualname__}", **key_value(dataclasses.asdict(value), where)}
    if callable(value):
        raise CacheKeyError(f"{where}={value!r} is a callable and cannot be part of a cache key; "
                            "call the uncached function (e.g. story.train) instead")
    raise CacheKeyError(f"{where}={value!r} ({type(value).__name__}) cannot be part of a cache key; "
                        "pass plain values (numbers, strings, loss scalers) or call the uncached function")


@cache
def dependency_versions() -> dict[str, str | None]:
    """The installed versions of ``DEPENDENCIES`` (None where one is not installed)."""
    versions = {}
    for name in DEPENDENCIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def key_config(kind: str, **config) -> dict:
    """Everything an entry's key is made of: the kind, the configuration, the version, the source hash, the dependencies' versions."""
    return {"kind": kind, "mixprec": __version__, "source": source_hash(), "versions": dependency_versions(),
            "config": key_value(config, kind)}


def cache_key(kind: str, **config) -> Path:
    """A directory for one artifact: ``<cache>/<kind>-<hash of the config, library version and source>``."""
    if not kind or not kind.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"kind must be a non-empty name of letters, digits, '-' and '_', got {kind!r}")
    blob = json.dumps(key_config(kind, **config), sort_keys=True)
    return cache_dir() / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# --- verifying and publishing entries ------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path) -> str | None:
    """None if the entry at ``path`` is complete and every file matches its manifest; else what is wrong."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (partial or written by an older mixprec)"
    except (OSError, ValueError) as error:
        return f"unreadable manifest ({type(error).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return "manifest of an unknown format"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest lists no files"
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    # hidden files a file browser leaves (.DS_Store, .ipynb_checkpoints/...) are not damage
    on_disk = {n for n in on_disk if n in files or not any(part.startswith(".") for part in n.split("/"))}
    if on_disk != set(files):
        missing, extra = sorted(set(files) - on_disk), sorted(on_disk - set(files))
        return f"files differ from the manifest (missing {missing}, unexpected {extra})"
    for name, meta in files.items():
        file = path / name
        if not isinstance(meta, dict) or file.stat().st_size != meta.get("size"):
            return f"{name}: size differs from the manifest"
        if _sha256(file) != meta.get("sha256"):
            return f"{name}: checksum mismatch"
    return None


def _write_manifest(tmp: Path, kind: str, key: dict) -> None:
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        files[file.relative_to(tmp).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    torch = sys.modules.get("torch")
    manifest = {"format": MANIFEST_FORMAT, "kind": kind, "key": key, "files": files,
                "produced_by": {"mixprec": __version__, "source": source_hash(), "torch": getattr(torch, "__version__", None),
                                "python": sys.version.split()[0], "pid": os.getpid(),
                                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _lock(path: Path, wait: bool = True):
    """An exclusive ``fcntl`` lock for one entry; released when the holder exits, even if it is killed.

    Yields True once held; with ``wait=False`` it yields False at once if another process holds it.
    """
    locks = path.parent / ".locks"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{path.name}.lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _writer_entry(tmp: Path) -> Path:
    """The entry that a temporary directory ``.tmp-<entry>-<random>`` is being built for."""
    return tmp.parent / tmp.name[len(".tmp-"):].rsplit("-", 1)[0]


def _say(message: str) -> None:
    print(f"mixprec.cache: {message}", file=sys.stderr)


def _manifest_key(path: Path) -> Any:
    try:
        return json.loads((path / MANIFEST).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _try_load(path: Path, load: Callable[[Path], T], report: bool, key: dict | None = None) -> tuple[bool, T | None]:
    if not path.exists():
        return False, None
    problem = verify(path)
    if problem is None and key is not None and _manifest_key(path) != json.loads(json.dumps(key)):
        problem = "its manifest was written for another configuration (a copied or renamed entry)"
    if problem is None:
        try:
            return True, load(path)
        except Exception as error:  # verified bytes that still do not load: treat as damaged, never half-load
            problem = f"does not load ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
    if report:
        _say(f"{path.name} is damaged ({problem}); rebuilding it")
    return False, None


def _remove(path: Path) -> None:
    """Move ``path`` out of the way atomically, then delete it."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


BUSY = object()  # what ``cached(..., wait=False)`` returns while another process builds the entry


def split_with_other_processes(jobs: dict[str, Callable[[bool], T]]) -> dict[str, T]:
    """Run cached jobs that another process may need at the same time; returns {name: result}, in ``jobs``' order.

    ``job(wait)`` returns its result, or ``BUSY`` when ``wait`` is False and another process is
    building that entry now (``cached(..., wait=wait)``). First every job nobody else is building
    runs, then the others are waited for: two processes that need the same entries (a chapter and
    its Colab notebook, built side by side) each build about half.
    """
    done = {}
    for wait in (False, True):
        for name, job in jobs.items():
            if name not in done:
                result = job(wait)
                if result is not BUSY:
                    done[name] = result
    return {name: done[name] for name in jobs}


def cached(kind: str, config: dict, build: Callable[[Path], T], load: Callable[[Path], T], wait: bool = True) -> T:
    """``load(entry)`` if a verified entry for ``kind`` and ``config`` exists, else ``build(tmp)`` and publish it.

    ``build`` writes its files into the empty directory it is given and returns the artifact;
    ``load`` reads an entry back. See the module docstring for the protocol. ``wait=False``: if
    another process holds the key's lock (it is building the entry), return ``BUSY`` at once.
    """
    key = key_config(kind, **config)  # now: building may change an option object (a scaler's state)
    path = cache_key(kind, **config)
    ok, value = _try_load(path, load, report=False, key=key)
    if ok:
        return value
    if not os.access(path.parent, os.W_OK | os.X_OK):  # a read-only cache (shared, mounted): build without caching
        _say(f"the cache {str(path.parent)!r} cannot be written (read-only or no permission); building {path.name} without caching it")
        with tempfile.TemporaryDirectory(prefix=f"mixprec-{kind}-") as tmp:
            return build(Path(tmp))
    with _lock(path, wait=wait) as held:
        return _fill(path, kind, key, build, load) if held else BUSY


def _fill(path: Path, kind: str, key: dict, build: Callable[[Path], T], load: Callable[[Path], T]) -> T:
    """Under the key's lock: load the entry if another process filled it meanwhile, else build and publish it."""
    ok, value = _try_load(path, load, report=True, key=key)  # another process may have filled it while we waited
    if ok:
        return value
    for stale in path.parent.glob(f".tmp-{path.name}-*"):  # left by a killed writer: no live writer holds this key's lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        value = build(tmp)
        if _before_publish is not None:
            _before_publish(tmp)
        _write_manifest(tmp, kind, key)
        if path.exists():
            _remove(path)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return value


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (for files inside a temporary entry directory; the entry is published atomically)."""
    Path(path).write_text(json.dumps(data))


# --- the command line: python -m mixprec.cache list|verify|clear ------------------------------------


def entries(root: Path | None = None) -> list[Path]:
    """The published entries in the cache (not temporary, trash or lock files)."""
    root = cache_dir() if root is None else root
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixprec.cache", description="List, verify or clear mixprec's cache of trained artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="each entry: name, size, what produced it")
    sub.add_parser("verify", help="check every entry against its manifest; exit 1 if any is damaged")
    clear = sub.add_parser("clear", help="delete entries (all, or one kind) and leftover temporary directories")
    clear.add_argument("--kind", help="only entries of this kind, e.g. storyteller or tokenizer")
    args = parser.parse_args(argv)
    try:
        root = cache_dir()
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "list":
        print(f"cache: {root}")
        for entry in entries(root):
            try:
                produced = json.loads((entry / MANIFEST).read_text())["produced_by"]
                note = f"mixprec {produced['mixprec']}, source {produced['source'][:12]}, {produced['date']}"
            except (OSError, ValueError, KeyError, TypeError):
                note = "no valid manifest"
            print(f"{entry.name}\t{_size(entry) / 1e6:.1f} MB\t{note}")
        return 0
    if args.command == "verify":
        bad = 0
        for entry in entries(root):
            problem = verify(entry)
            bad += problem is not None
            print(f"{entry.name}\t{'ok' if problem is None else 'DAMAGED: ' + problem}")
        leftovers = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
        building = [p for p in leftovers if p.name.startswith(".tmp-") and _building(p)]
        if building:
            print(f"{len(building)} entr{'y' if len(building) == 1 else 'ies'} being built now (a writer holds the lock): "
                  + ", ".join(sorted(_writer_entry(p).name for p in building)))
        left = len(leftovers) - len(building)
        if left:
            print(f"{left} unfinished temporary director{'y' if left == 1 else 'ies'} (left by killed writers; `clear` removes them)")
        return 1 if bad else 0
    if not os.access(root, os.W_OK | os.X_OK):
        print(f"error: the cache {str(root)!r} cannot be written (read-only or no permission): nothing removed", file=sys.stderr)
        return 2
    removed, busy = 0, []

    def wanted(entry: Path) -> bool:
        return args.kind is None or entry.name.rsplit("-", 1)[0] == args.kind

    for item in sorted(root.iterdir()):
        if item.name.startswith(".trash-"):  # an entry already moved aside by a remover
            shutil.rmtree(item, ignore_errors=True)
            removed += 1
            continue
        entry = _writer_entry(item) if item.name.startswith(".tmp-") else item
        if not (item.is_dir() and not entry.name.startswith(".") and wanted(entry)):
            continue
        with _lock(entry, wait=False) as held:  # a writer of this key holds it while it builds: leave its work alone
            if not held:
                busy.append(entry.name)
                continue
            shutil.rmtree(item, ignore_errors=True)
            removed += 1
    print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {root}")
    if busy:
        print(f"left {len(busy)} in use (being built by a running process; clear again when it has finished): {', '.join(sorted(set(busy)))}")
    return 0


def _building(tmp: Path) -> bool:
    """Whether a writer is building into the temporary directory ``tmp`` now (it holds the entry's lock)."""
    try:
        with _lock(_writer_entry(tmp), wait=False) as held:
            return not held
    except OSError:  # a read-only cache: no writer can be building in it
        return False


if __name__ == "__main__":
    sys.exit(main())
