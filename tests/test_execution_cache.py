"""The book's execution cache key and chapter budgets (_ext/execution_cache.py): fast, no build."""

import sys
import types

import pytest
import yaml
from conftest import ROOT

sys.path.insert(0, str(ROOT / "_ext"))
import execution_cache  # noqa: E402


def _notebook_chapters():
    return sorted(p for p in (ROOT / "book").glob("*.md") if p.read_text(encoding="utf-8").startswith("---\njupytext"))


def test_every_chapter_has_an_execution_budget():
    """A hung chapter fails after its own timeout (per cell, nbclient), not the global one of 30 minutes."""
    chapters = _notebook_chapters()
    assert len(chapters) >= 9
    for path in chapters:
        front = yaml.safe_load(path.read_text(encoding="utf-8").split("\n---\n")[0].removeprefix("---\n"))
        timeout = front.get("mystnb", {}).get("execution_timeout")
        assert isinstance(timeout, int) and 60 <= timeout <= 1200, f"{path.name}: mystnb.execution_timeout = {timeout!r}"


def test_key_follows_the_library_source(tmp_path):
    lib = tmp_path / "mixprec"
    (lib / "__pycache__").mkdir(parents=True)
    (lib / "formats.py").write_text("X = 1\n")
    (lib / "data").mkdir()
    (lib / "data" / "gpu.json").write_text("{}")
    key = execution_cache.library_key(tmp_path, profile="quick", lib=lib)
    assert key == execution_cache.library_key(tmp_path, profile="quick", lib=lib)
    (lib / "__pycache__" / "formats.cpython-311.pyc").write_bytes(b"\0")  # bytecode is not source
    assert execution_cache.library_key(tmp_path, profile="quick", lib=lib) == key
    assert execution_cache.library_key(tmp_path, profile="full", lib=lib) != key
    (lib / "formats.py").write_text("X = 2\n")
    changed = execution_cache.library_key(tmp_path, profile="quick", lib=lib)
    assert changed != key
    (lib / "data" / "gpu.json").write_text('{"a": 1}')  # a recorded GPU result is an input of the chapters too
    assert execution_cache.library_key(tmp_path, profile="quick", lib=lib) != changed


def test_key_hashes_the_mixprec_the_kernels_import():
    import mixprec

    assert execution_cache.library_dir() == ROOT.joinpath(mixprec.__file__).parent.resolve()


def _app_and_config(tmp_path, mode="cache"):
    app = types.SimpleNamespace(srcdir=str(ROOT), outdir=str(tmp_path / "_build" / "html"))
    config = types.SimpleNamespace(nb_execution_mode=mode, nb_execution_cache_path="")
    return app, config


def test_cache_folder_is_named_by_the_key_and_old_ones_are_pruned(tmp_path, monkeypatch):
    monkeypatch.delenv("BOOK_JUPYTER_CACHE", raising=False)
    monkeypatch.delenv("BOOK_EXECUTE", raising=False)
    stale = [tmp_path / "_build" / ".jupyter_cache" / f"mixprec-old{i}" for i in range(execution_cache.KEEP + 2)]
    for path in stale:
        path.mkdir(parents=True)
    app, config = _app_and_config(tmp_path)
    execution_cache.configure(app, config)
    assert config.nb_execution_cache_path.endswith("mixprec-" + execution_cache.library_key(ROOT))
    left = sorted((tmp_path / "_build" / ".jupyter_cache").glob("mixprec-old*"))
    assert len(left) == execution_cache.KEEP


def test_environment_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_JUPYTER_CACHE", str(tmp_path / "fresh"))
    app, config = _app_and_config(tmp_path)
    execution_cache.configure(app, config)
    assert config.nb_execution_cache_path == str((tmp_path / "fresh").resolve())
    monkeypatch.setenv("BOOK_EXECUTE", "force")
    app, config = _app_and_config(tmp_path)
    execution_cache.configure(app, config)
    assert config.nb_execution_mode == "force" and config.nb_execution_cache_path == ""
    monkeypatch.setenv("BOOK_EXECUTE", "always")
    with pytest.raises(ValueError, match="force, cache or off"):
        execution_cache.configure(*_app_and_config(tmp_path))


def test_timeout_scale_rewrites_only_the_front_matter(monkeypatch):
    text = "---\nmystnb:\n  execution_timeout: 300   # budget\n---\n\n    execution_timeout: 7\n"
    source = [text]
    monkeypatch.setenv("BOOK_TIMEOUT_SCALE", "2.5")
    execution_cache.scale_timeout(None, "book/x", source)
    assert "  execution_timeout: 750   # budget" in source[0] and source[0].endswith("    execution_timeout: 7\n")
    monkeypatch.delenv("BOOK_TIMEOUT_SCALE")
    source = [text]
    execution_cache.scale_timeout(None, "book/x", source)
    assert source[0] == text
