"""Command-line arguments checked before any work, and outputs that never destroy what they did not create.

Shared by ``python -m mixprec.bench``, the scripts in ``bench/`` and ``tools/``. A bad argument is one
line naming the value and what is valid, exit status 2 (``Parser``); an ``--out`` file replaces only a
regular file, through a symlink if there is one (``check_out_file``, ``write_out_file``); an ``--out``
folder is used only if it is new, empty, or an earlier output of the same command (``check_out_folder``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import tempfile
from pathlib import Path


class UsageError(ValueError):
    """A bad command-line argument: reported in one line, before any work."""


class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line, ``<prog>: error: <message>``, exit status 2 (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(low: int):
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _finite(text: str, bound: str) -> float:
    """A finite float that is ``> 0`` or ``>= 0`` (``bound``), or the argparse error that names the bound."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}") from None
    if not (math.isfinite(value) and (value > 0 if bound == "> 0" else value >= 0)):
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    return _finite(text, "> 0")


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    return _finite(text, ">= 0")


def regex(text: str) -> re.Pattern:
    """An argparse ``type``: a regular expression, compiled."""
    try:
        return re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"not a valid regular expression {text!r}: {error}") from None


def training_precision(text: str) -> str:
    """An argparse ``type``: a precision policy name that ``amp.get_policy`` accepts."""
    from .amp import get_policy

    try:
        get_policy(text)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def inference_precision(text: str) -> str:
    """An argparse ``type``: an inference precision that ``story.for_inference`` accepts."""
    import torch

    from .story.generate import for_inference

    if text != "fp8-weight":  # the one precision that quantizes (needs a weight); its name is all we need
        try:
            for_inference(torch.nn.Linear(1, 1), text)
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return text


def device(text: str) -> str:
    """An argparse ``type``: a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: cpu, cuda, cuda:<index>, mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        have = ", ".join(name for name, ok in available.items() if ok)
        raise argparse.ArgumentTypeError(f"device {text!r} is not available on this machine; available: {have}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def check_out_file(out: Path, option: str = "--out") -> None:
    """``out`` can be created or replaced as a regular file; anything else is refused.

    A symlink is followed (its target is what gets written); a FIFO, a device or a socket is refused,
    as writing a result there would replace the node, not write into it.
    """
    if str(out) in ("", "."):
        raise UsageError(f"{option} needs a file name")
    if out.is_symlink():
        try:
            target = out.resolve(strict=False)
        except (OSError, RuntimeError) as error:  # a symlink loop
            raise UsageError(f"{option} {str(out)!r} is a symlink that cannot be followed ({error})") from None
        if not target.exists() and not target.parent.is_dir():
            raise UsageError(f"{option} {str(out)!r} is a symlink to {str(target)!r}, whose folder does not exist")
        out = target
    if out.is_dir():
        raise UsageError(f"{option} {str(out)!r} is a directory; give a file name such as {str(out / 'result.json')!r}")
    if out.exists() and not stat.S_ISREG(out.stat().st_mode):
        raise UsageError(f"{option} {str(out)!r} exists and is not a regular file (a FIFO, device or socket): give a file name")
    parent = out.parent
    while not parent.exists():  # the directories that the output would create
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {str(out)!r}: {str(parent)!r} is a file, not a directory")
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"{option} {str(out)!r}: no permission to overwrite it")
    try:  # the real test: create a file there (permissions, read-only mounts, /proc...)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".mixprec-out-"):
            pass
    except OSError as error:
        raise UsageError(f"{option} {str(out)!r}: cannot write in {str(parent)!r} ({error.strerror or error})") from None


def write_out_file(out: Path, text: str) -> Path:
    """Write ``text`` to ``out`` atomically (a temporary file renamed into place), through a symlink; returns the path written."""
    out = out.resolve() if out.is_symlink() else out
    if out.exists() and not stat.S_ISREG(out.stat().st_mode):  # appeared since the check
        raise OSError(f"{str(out)!r} is not a regular file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False, encoding="utf-8") as f:
        f.write(text)
    os.replace(f.name, out)
    return out


def check_out_folder(out: Path, marker: str, option: str = "--out") -> None:
    """``out`` may be used as a command's output folder: new, empty, or holding ``marker`` (an earlier output of the command).

    Anything else is refused: a file, or a folder with other content, which the command did not create
    and must never delete or mix with its own.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {str(out)!r} is a file, not a folder: give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise UsageError(f"{option} {str(out)!r} is a folder with other content (no {marker}, so not an earlier output of "
                         f"this command); give a new or empty folder")
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {str(out)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(out)!r}: no permission to write in {str(parent)!r}")
