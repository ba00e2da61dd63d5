"""Run every generated chapter notebook top to bottom in a fresh virtual environment, as Colab would.

    python tools/run_colab_notebooks.py --workdir /tmp/colab-check

The environment starts with what Colab provides (PyTorch and a Jupyter kernel) and nothing else;
each notebook's own setup cell installs mixprec, here from this checkout instead of the repository
URL (the same cell, one variable apart). Notebooks run outside the repository. They share the book
build's model cache (``MIXPREC_CACHE``, as ``mixprec.cache.cache_dir`` finds it): the environment
has the versions of torch, transformers and tokenizers that requirements.txt pins (Colab ships all
three), and those versions are part of every cache key, so a model the book build trained is the
model a notebook would train, and is trained once (``--own-cache`` gives the notebooks an empty
cache of their own). Writes ``<workdir>/summary.json``: per notebook, the exit status, seconds and the end
of the error output; exits non-zero if any notebook failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import colab_notebooks  # noqa: E402

COLAB_PACKAGES = ("torch", "transformers", "tokenizers", "ipykernel", "nbclient")  # what Colab has before the setup cell


def colab_base() -> list[str]:
    """The pins of ``COLAB_PACKAGES`` from requirements.txt (the book build's versions)."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = f"{name}=={version.strip()}"
    missing = [name for name in COLAB_PACKAGES if name not in pins]
    if missing:
        raise SystemExit(f"requirements.txt pins no version of {missing}")
    return [pins[name] for name in COLAB_PACKAGES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per notebook")
    parser.add_argument("--only", nargs="*", help="run only the notebooks whose names contain one of these")
    parser.add_argument("--own-cache", action="store_true", help="an empty model cache in the workdir instead of the book build's")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    venv = work / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # also in an existing environment: the pins must match the book build's (they are in the cache keys)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *colab_base()], check=True)
    notebooks = colab_notebooks.main(["--out", str(work / "notebooks"), "--source", str(ROOT / "code")])
    if args.only:
        notebooks = [nb for nb in notebooks if any(key in nb.name for key in args.only)]
    from mixprec.cache import cache_dir

    cache = work / "cache" if args.own_cache else cache_dir()
    env = {**os.environ, "MIXPREC_CACHE": str(cache), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    summary = []
    for nb in notebooks:
        out = work / "executed" / nb.name
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        res = subprocess.run([str(venv / "bin" / "jupyter-execute"), f"--output={out}", f"--timeout={args.timeout}", str(nb)],
                             cwd=work, env=env, capture_output=True, text=True)
        summary.append({"notebook": nb.name, "returncode": res.returncode, "seconds": round(time.perf_counter() - start, 1),
                        "error": "" if res.returncode == 0 else (res.stdout + res.stderr)[-3000:]})
        print(f"{nb.name}: {'ok' if res.returncode == 0 else 'FAILED'} in {summary[-1]['seconds']} s", flush=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0 if all(s["returncode"] == 0 for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
