"""Where trained artifacts live, keyed by everything that determines them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import __version__


def cache_dir() -> Path:
    """``$MIXPREC_CACHE``, else ``~/.cache/mixprec``; created on first use."""
    path = Path(os.environ.get("MIXPREC_CACHE") or Path.home() / ".cache" / "mixprec")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(kind: str, **config) -> Path:
    """A directory for one artifact: ``<cache>/<kind>-<hash of config and library version>``."""
    blob = json.dumps({"mixprec": __version__, **config}, sort_keys=True, default=str)
    return cache_dir() / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
