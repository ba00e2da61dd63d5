"""The fault suite: one test per class of the reliability review (``../shared/reviews/reliability-2026-11.md``).

Each test names the review rows it covers and asserts the behaviour (the right result, or a clear
error), not just "no exception". Kept fast: tiny models and step counts; where a test is about the
cache and not about training, training is replaced by a counter.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mixprec import cache as mcache

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "code"
TINY = dict(size="tiny", steps=2, n_stories=300, batch_size=4, block_size=32, progress=False)


def _env(cache_root: Path) -> dict[str, str]:
    return {**os.environ, "MIXPREC_CACHE": str(cache_root), "PYTHONPATH": str(CODE), "OMP_NUM_THREADS": "1"}


# --- cache integrity (rows 1-5, 13, 21, 33: MIXPREC_CACHE a file) --------------------------------------


def _fake_train(calls: list):
    """Stands in for ``story.train`` where a test is about the cache: no steps, a fixed history."""
    from mixprec.step import TrainHistory

    def train(model, data, precision="fp32", **options):
        calls.append(precision)
        with torch.no_grad():
            model.transformer.wte.weight.mul_(0.5)  # trained weights differ from the initial ones
        history = TrainHistory(precision, "cpu", 1, 1)
        history.loss.append(1.25)
        return history

    return train


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory):
    """A cache holding one tiny storyteller and its tokenizer, and the model's weights, filled once."""
    from mixprec import story

    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIXPREC_CACHE", str(root))
        patch.setattr(story, "train", _fake_train([]))
        model, tokenizer, _, history = story.storyteller(**TINY)
    return root, {k: v.clone() for k, v in model.state_dict().items()}, tokenizer.get_vocab(), history.loss


@pytest.fixture
def counted_training(monkeypatch):
    """Counts the storyteller's training runs (each one fake: the test is about the cache)."""
    from mixprec import story

    calls = []
    monkeypatch.setattr(story, "train", _fake_train(calls))
    return calls


def _entry(root: Path, kind: str) -> Path:
    (entry,) = [p for p in root.iterdir() if p.name.startswith(kind + "-")]
    return entry


def _overwrite_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64  # the end of the last tensor: NaN weights in bfloat16/float32
    path.write_bytes(bytes(data))


def _edit_config(path: Path) -> None:
    config = json.loads(path.read_text())
    config["n_layer"] = 1
    path.write_text(json.dumps(config))


def _swap_vocab(path: Path) -> None:
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))


DAMAGE = {
    "safetensors-bytes": ("storyteller", "model.safetensors", _overwrite_bytes),  # row 1
    "config-n_layer": ("storyteller", "config.json", _edit_config),  # row 2
    "tokenizer-swap": ("tokenizer", "tokenizer.json", _swap_vocab),  # row 3
    "history-truncated": ("storyteller", "history.json", lambda p: p.write_text(p.read_text()[:20])),  # rows 5, 21
    "safetensors-truncated": ("storyteller", "model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:1000])),  # row 21
    "safetensors-deleted": ("storyteller", "model.safetensors", Path.unlink),  # row 21
    "config-deleted": ("storyteller", "config.json", Path.unlink),  # row 21
    "tokenizer-garbage": ("tokenizer", "tokenizer.json", lambda p: p.write_text("garbage")),  # row 21
    "manifest-deleted": ("storyteller", "manifest.json", Path.unlink),  # a partial entry
    "manifest-garbage": ("storyteller", "manifest.json", lambda p: p.write_text("{")),
    "extra-file": ("storyteller", "pytorch_model.bin", lambda p: p.write_bytes(b"planted")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cache_entry_is_rebuilt_never_loaded(damage, filled_cache, tmp_path, monkeypatch, counted_training, capsys):
    """Rows 1, 2, 3, 5, 21: corrupt, truncate, delete or swap a cached file -> one line on stderr, rebuilt, right result."""
    from mixprec import story

    source, weights, vocab, loss = filled_cache
    root = tmp_path / "cache"
    shutil.copytree(source, root)
    monkeypatch.setenv("MIXPREC_CACHE", str(root))
    kind, name, damage_fn = DAMAGE[damage]
    damage_fn(_entry(root, kind) / name)
    model, tokenizer, _, history = story.storyteller(**TINY)
    err = capsys.readouterr().err
    damaged_lines = [line for line in err.splitlines() if "damaged" in line]
    assert len(damaged_lines) == 1 and _entry(root, kind).name in damaged_lines[0], err
    assert len(counted_training) == (1 if kind == "storyteller" else 0)
    assert tokenizer.get_vocab() == vocab and history.loss == loss
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items()) and model.config.n_layer == 2
    assert mcache.verify(_entry(root, kind)) is None  # healed: the next call loads it
    story.storyteller(**TINY)
    assert "damaged" not in capsys.readouterr().err and len(counted_training) == (1 if kind == "storyteller" else 0)


def test_cache_key_covers_library_source(tmp_path, monkeypatch):
    """Row 4: the training code changed, same arguments and version -> a different key (retrain)."""
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))
    copy = tmp_path / "pkg"
    shutil.copytree(mcache.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert mcache.source_hash.__wrapped__(copy) == mcache.source_hash(mcache.PACKAGE_DIR)
    step = copy / "step.py"
    step.write_text(step.read_text() + "\n# a change to the training step\n")
    assert mcache.source_hash.__wrapped__(copy) != mcache.source_hash(mcache.PACKAGE_DIR)
    widgets = copy / "widgets.py"  # presentation only: not part of the hash
    before = mcache.source_hash.__wrapped__(copy)
    widgets.write_text(widgets.read_text() + "\n# a change to a widget\n")
    assert mcache.source_hash.__wrapped__(copy) == before
    key = mcache.cache_key("storyteller", size="tiny")
    monkeypatch.setattr(mcache, "source_hash", lambda root=None: "0" * 64)
    assert mcache.cache_key("storyteller", size="tiny") != key


def test_cache_key_of_object_options(tmp_path, monkeypatch):
    """Row 13: scalers keyed by their full configuration; callables and arbitrary objects refused before any work."""
    from mixprec import story
    from mixprec.scaling import DynamicLossScaler, StaticLossScaler

    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))
    key = lambda **o: mcache.cache_key("storyteller", options=o)  # noqa: E731
    assert key(scaler=DynamicLossScaler(growth_interval=100)) != key(scaler=DynamicLossScaler(growth_interval=200))
    assert key(scaler=DynamicLossScaler(backoff_factor=0.25)) != key(scaler=DynamicLossScaler())
    assert key(scaler=DynamicLossScaler()) == key(scaler=DynamicLossScaler())  # a fresh object hits
    assert key(scaler=StaticLossScaler(1024.0)) != key(scaler=DynamicLossScaler(1024.0, growth_interval=10**9))
    assert key(scaler=torch.amp.GradScaler("cpu", growth_interval=7)) != key(scaler=torch.amp.GradScaler("cpu"))
    assert key(lr=float("nan")) == key(lr=float("nan"))
    with pytest.raises(mcache.CacheKeyError, match="callable"):
        key(after_backward=lambda step, model: None)
    with pytest.raises(mcache.CacheKeyError, match="cannot be part of a cache key"):
        key(thing=object())
    monkeypatch.setattr(story, "load_stories", lambda *a, **k: pytest.fail("work started before the option was refused"))
    with pytest.raises(mcache.CacheKeyError, match="after_backward"):
        story.storyteller("tiny", steps=2, after_backward=lambda step, model: None)


def test_cache_dir_that_is_a_file(tmp_path, monkeypatch):
    """Row 33: MIXPREC_CACHE pointing at a file -> a clear error naming it."""
    target = tmp_path / "not-a-dir"
    target.write_text("x")
    monkeypatch.setenv("MIXPREC_CACHE", str(target))
    with pytest.raises(NotADirectoryError, match="MIXPREC_CACHE .*not-a-dir.* is a file"):
        mcache.cache_dir()
    res = subprocess.run([sys.executable, "-m", "mixprec.cache", "list"], env=_env(target), capture_output=True, text=True)
    assert res.returncode != 0 and "is a file" in res.stderr and "Traceback" not in res.stderr


_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from mixprec import cache
    log, mode = Path(sys.argv[1]), sys.argv[2]

    def build(directory):
        with open(log, "a") as f:
            f.write("build\\n")
        (directory / "a.txt").write_text("first half")
        if mode == "slow":
            time.sleep(1.5)
        (directory / "b.txt").write_text("second half")
        return "built"

    if mode == "kill":
        cache._before_publish = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)
    value = cache.cached("demo", {"x": 1}, build, lambda entry: "loaded:" + (entry / "a.txt").read_text())
    print(value)
""")


def _writer(tmp_path: Path, root: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "builds.log"), mode], env=_env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_writer_leaves_no_entry_and_heals(tmp_path):
    """Row 5: a writer killed mid-write (at the hook before publishing) leaves nothing a reader can load; the next call rebuilds."""
    root = tmp_path / "cache"
    killed = _writer(tmp_path, root, "kill")
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in root.iterdir() if p.name.startswith("demo-")] == []  # nothing published
    assert any(p.name.startswith(".tmp-demo-") for p in root.iterdir())  # the half-written directory is aside
    verify = subprocess.run([sys.executable, "-m", "mixprec.cache", "verify"], env=_env(root), capture_output=True, text=True)
    assert verify.returncode == 0 and "unfinished temporary" in verify.stdout
    again = _writer(tmp_path, root, "fast")  # the lock died with the killed writer: no deadlock
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0 and out.strip() == "built", err
    assert (tmp_path / "builds.log").read_text().count("build") == 2
    assert not any(p.name.startswith(".tmp-demo-") for p in root.iterdir())  # the next writer of the key cleared the leftover
    loaded = _writer(tmp_path, root, "fast")
    assert loaded.communicate(timeout=60)[0].strip() == "loaded:first half"
    clear = subprocess.run([sys.executable, "-m", "mixprec.cache", "clear"], env=_env(root), capture_output=True, text=True)
    assert clear.returncode == 0 and [p for p in root.iterdir() if not p.name.startswith(".locks")] == []


def test_two_writers_at_once_train_once(tmp_path):
    """Two processes filling the same key: the second waits on the lock and loads what the first built."""
    root = tmp_path / "cache"
    first = _writer(tmp_path, root, "slow")
    second = _writer(tmp_path, root, "slow")
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in (first, second))
    assert outputs == ["built", "loaded:first half"]
    assert (tmp_path / "builds.log").read_text().count("build") == 1


def test_cache_cli_list_verify_clear(filled_cache, tmp_path):
    """``python -m mixprec.cache``: list names every entry, verify flags a damaged one (exit 1), clear --kind removes one kind."""
    root = tmp_path / "cache"
    shutil.copytree(filled_cache[0], root)
    run = lambda *args: subprocess.run([sys.executable, "-m", "mixprec.cache", *args], env=_env(root), capture_output=True, text=True)  # noqa: E731
    listed = run("list")
    assert listed.returncode == 0 and _entry(root, "storyteller").name in listed.stdout and _entry(root, "tokenizer").name in listed.stdout
    assert run("verify").returncode == 0
    _edit_config(_entry(root, "storyteller") / "config.json")
    verify = run("verify")
    assert verify.returncode == 1 and "DAMAGED: config.json: " in verify.stdout
    assert run("clear", "--kind", "storyteller").returncode == 0
    assert [p.name.split("-")[0] for p in root.iterdir() if not p.name.startswith(".")] == ["tokenizer"]


# --- loss scalers: GradScaler-grade misuse checks (rows 6, 7, 12, 30, 31) ---------------------------------


def _one_step_setup(dtype=torch.float32, grad=1.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    return model, optimizer


def _scalers():
    from mixprec.scaling import DynamicLossScaler, StaticLossScaler

    scalers = {"ours-dynamic": DynamicLossScaler(init_scale=0.5), "ours-static": StaticLossScaler(0.5),
               "GradScaler": torch.amp.GradScaler("cpu", init_scale=0.5)}
    for scaler in scalers.values():
        scaler.scale(torch.ones(()))  # GradScaler makes its scale tensor on first use
    return scalers


@pytest.mark.parametrize("name", ["ours-dynamic", "ours-static", "GradScaler"])
def test_scaler_refuses_unscaling_fp16_gradients(name):
    """Row 6: FP16 gradients of 60000 unscaled by 0.5 would be inf and the weights -inf; GradScaler refuses, so do we."""
    scaler = _scalers()[name]
    model, optimizer = _one_step_setup(torch.float16, grad=60000.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.step(optimizer)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # nothing half-divided
    assert scaler.get_scale() == 0.5


MISUSE = {
    "step-twice": (lambda s, o: (s.step(o), s.step(o)), RuntimeError, "step\\(\\) has already been called"),
    "unscale-twice": (lambda s, o: (s.unscale_(o), s.unscale_(o)), RuntimeError, "already been called on this optimizer"),
    "unscale-after-step": (lambda s, o: (s.step(o), s.unscale_(o)), RuntimeError, "after step"),
    "update-without-step": (lambda s, o: s.update(), AssertionError, "No inf checks were recorded"),
    "update-twice": (lambda s, o: (s.step(o), s.update(), s.update()), AssertionError, "No inf checks were recorded"),
    "step-without-gradients": (lambda s, o: (o.zero_grad(), s.step(o)), AssertionError, "No inf checks were recorded for this optimizer"),
    "update-after-unscale-without-gradients": (lambda s, o: (o.zero_grad(), s.unscale_(o), s.update()), AssertionError,
                                               "No inf checks were recorded prior to update"),
    "closure": (lambda s, o: s.step(o, closure=lambda: 0.0), RuntimeError, "Closure"),
    "scale-float": (lambda s, o: s.scale(1.0), ValueError, "outputs must be a Tensor"),
    "scale-dict": (lambda s, o: s.scale({"loss": torch.tensor(1.0)}), ValueError, "outputs must be a Tensor"),
    "load-empty": (lambda s, o: s.load_state_dict({}), RuntimeError, "state dict is empty"),
}


@pytest.mark.parametrize("misuse", list(MISUSE))
@pytest.mark.parametrize("name", ["ours-dynamic", "ours-static", "GradScaler"])
def test_scaler_misuse_raises_what_gradscaler_raises(name, misuse):
    """Rows 12, 30: step() twice (the update applied twice), update() without step() (the scale grew), and the rest."""
    scaler = _scalers()[name]
    model, optimizer = _one_step_setup()
    call, error, message = MISUSE[misuse]
    if name == "GradScaler" and misuse == "scale-dict":
        return  # GradScaler returns a lazy map over the dict's keys that fails later; ours refuses at once
    before = scaler.get_scale()
    with pytest.raises(error, match=message):
        call(scaler, optimizer)
    if misuse in ("step-twice", "update-without-step", "step-without-gradients", "update-after-unscale-without-gradients"):
        assert scaler.get_scale() == before
    if misuse == "step-twice":
        assert torch.allclose(model.weight, _one_step_setup()[0].weight - 0.1 * 2.0)  # stepped once (grad 1 / scale 0.5)


def test_scaler_options_and_loaded_state_are_validated():
    """Rows 7, 30, 31: scales that are 0 or inf in float32, NaN/inf factors, bool intervals, bad loaded state."""
    from mixprec.scaling import DynamicLossScaler, StaticLossScaler

    for bad in (1e-50, 1e39, 0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="representable in float32"):
            StaticLossScaler(bad)
    for bad in (dict(growth_factor=math.nan), dict(growth_factor=math.inf), dict(growth_factor=0.5), dict(backoff_factor=2.0),
                dict(backoff_factor=math.nan), dict(backoff_factor=1e-60), dict(growth_interval=0), dict(min_scale=math.nan),
                dict(min_scale=1e9)):
        with pytest.raises(ValueError):
            DynamicLossScaler(**bad)
    for bad in (dict(growth_factor="2"), dict(growth_interval=True), dict(growth_interval=2.0), dict(init_scale="1024"),
                dict(init_scale=None)):
        with pytest.raises(TypeError, match="must be"):
            DynamicLossScaler(**bad)
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    good = scaler.state_dict()
    for bad, error in ((dict(scale=math.nan), ValueError), (dict(scale=-1.0), ValueError), (dict(backoff_factor=2.0), ValueError),
                       (dict(growth_interval=True), TypeError), (dict(_growth_tracker=5), ValueError), (dict(growth_factor=math.inf), ValueError)):
        with pytest.raises(error):
            scaler.load_state_dict({**good, **bad})
        assert scaler.state_dict() == good  # nothing half-loaded
    with pytest.raises(ValueError, match="missing"):
        scaler.load_state_dict(StaticLossScaler(4.0).state_dict())  # static state into a dynamic scaler
    gradscaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=7)
    scaler.load_state_dict(gradscaler.state_dict())  # GradScaler's state is accepted
    assert scaler.get_scale() == 4.0 and scaler.growth_interval == 7


# --- BF16AdamW resumes exactly (row 8) -------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
def test_bf16_adamw_resumes_bit_for_bit(rounding, tmp_path):
    """Row 8: N steps == k steps + save/load (through a file) + N-k steps, bit for bit, for all three roundings."""
    from mixprec.optim import BF16AdamW

    def run(steps, model=None, optimizer_state=None):
        if model is None:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(torch.bfloat16)
        optimizer = BF16AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, rounding=rounding, seed=3)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        for step in steps:
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
            model.zero_grad()
            model(x).float().pow(2).mean().backward()
            optimizer.step()
        return model, optimizer

    whole, _ = run(range(10))
    half, optimizer = run(range(4))
    torch.save({"model": half.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    state = checkpoint["optimizer"]["state"][0]
    assert state["exp_avg"].dtype == torch.float32 and ("compensation" in state) == (rounding == "kahan")
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(torch.bfloat16)
    fresh.load_state_dict(checkpoint["model"])
    resumed, optimizer = run(range(4, 10), fresh, checkpoint["optimizer"])
    assert all(optimizer.state[p]["exp_avg"].dtype == torch.float32 for p in resumed.parameters())
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    other = "kahan" if rounding != "kahan" else "nearest"
    with pytest.raises(ValueError, match="rounding"):
        BF16AdamW(fresh.parameters(), rounding=other).load_state_dict(checkpoint["optimizer"])


# --- the autocast inspector never runs an op twice (row 9) --------------------------------------------------


def _inspected_run(inspector):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(inplace=True), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 2)).train()
    x = torch.randn(16, 4)
    with torch.amp.autocast("cpu", dtype=torch.bfloat16), (inspector() if inspector else torch.autograd.grad_mode.no_grad()) as seen:
        y = model(x)
        z = torch.ones(3)
        z.add_(1)  # an in-place op
        torch.nn.functional.dropout(z, 0.5, inplace=True)
    return y.detach(), model[1].running_mean.clone(), model[1].running_var.clone(), z, torch.rand(4), seen


def _assert_same_as_without_inspector(inspector):
    plain, inspected = _inspected_run(None), _inspected_run(inspector)
    for a, b in zip(plain[:5], inspected[:5]):
        assert torch.equal(a, b)  # outputs, running stats, in-place results and the RNG stream after the forward
    return inspected[5]


def test_autocast_inspector_has_no_side_effects():
    """Row 9: BatchNorm running stats, in-place ops, dropout and the RNG stream are the same with and without the inspector."""
    from mixprec.amp import AutocastInspector

    seen = _assert_same_as_without_inspector(AutocastInspector)
    summary = seen.summary()
    assert summary["linear"] == {"lowered": 2} and summary["batch_norm"] == {"unchanged": 1}
    a = torch.randn(4, 4)  # and it still tells autocast's doing from type promotion
    with torch.amp.autocast("cpu", dtype=torch.bfloat16), AutocastInspector() as seen:
        torch.mm(a, a)
        a.bfloat16() + a
        torch.nn.functional.cross_entropy(a.bfloat16(), torch.zeros(4, dtype=torch.long))
    assert {r.name: r.category for r in seen.records} == {"mm": "lowered", "add": "promoted", "bfloat16": "unchanged", "cross_entropy": "fp32"}


# --- exercise checkers never raise on a reader's answer, and never pass a wrong one (rows 10, 26) ----------


def _raises(*args):
    raise RuntimeError("boom")


BAD_NUMBERS = [None, "1.0", True, math.nan, math.inf, -math.inf, 10**400, [1.0], torch.ones(3), object()]


@pytest.mark.parametrize("answer", BAD_NUMBERS, ids=lambda v: type(v).__name__ + ":" + repr(v)[:12])
def test_number_checkers_give_feedback_on_bad_answers(answer):
    from mixprec import exercises as ex

    results = [
        ex.check_format_limits("fp16", max=answer, min_normal=2.0**-14, min_subnormal=2.0**-24, eps=2.0**-10),
        ex.check_memory("fp32", 1000, weights=answer, grads=4000, optimizer=8000),
        ex.check_smallest_update("bf16", 1.0, answer),
        ex.check_tokens_per_second(lambda tokens, eos, seconds: answer),
        ex.check_kahan_sum(lambda values, dtype: answer),
    ]
    for result in results:
        assert not result and result.messages and str(result).startswith("✘")
        assert all("Traceback" not in m for m in result.messages)


def test_checkers_feedback_is_specific():
    """Row 10: NaN or a plain FP32 sum no longer pass the Kahan checker; row 26: NaN gets its own hint, not an unrelated one."""
    from mixprec import exercises as ex

    nan_sum = ex.check_kahan_sum(lambda v, d: math.nan)
    assert not nan_sum and "NaN" in nan_sum.messages[0]
    fp32_sum = ex.check_kahan_sum(lambda v, d: float(v.sum()))
    assert not fp32_sum and "不是 torch.bfloat16 能表示的数" in fp32_sum.messages[0]
    tps = ex.check_tokens_per_second(lambda tokens, eos, seconds: math.nan)
    assert not tps and "NaN" in tps.messages[0] and "EOS 本身" not in tps.messages[0]
    assert "None" in ex.check_tokens_per_second(lambda tokens, eos, seconds: None).messages[0]
    assert "运行出错" in ex.check_tokens_per_second(_raises).messages[0]
    assert "字符串" in ex.check_memory("fp32", 1000, weights="4000", grads=4000, optimizer=8000).messages[0]
    assert not ex.check_memory(["fp32"], 1000, weights=4000, grads=4000, optimizer=8000)
    assert not ex.check_memory("fp32", -5, weights=4000, grads=4000, optimizer=8000)
    assert not ex.check_format_limits("fp17", max=1, min_normal=1, min_subnormal=1, eps=1)
    assert not ex.check_format_limits("fp16", max="✔", min_normal=2.0**-14, min_subnormal=2.0**-24, eps=2.0**-10)
    assert not ex.check_smallest_update("fp16", math.nan, 1.0)
    for fn, expected in ((_raises, "异常"), (lambda x: None, "同形状"), (lambda x: x[:2], "同形状"), (lambda x: x.to(torch.complex64), "实数"),
                         (lambda x: torch.full_like(x, math.nan), "应得到"), ("not a function", "需要一个函数")):
        result = ex.check_round_to_fp16(fn)
        assert not result and expected in result.messages[-1], result.messages
    for fn, expected in ((_raises, "运行出错"), (lambda x, w, b, eps: None, "应返回张量"), (lambda x, w, b, eps: x[0], "不一致"), (None, "需要一个函数")):
        result = ex.check_mystery_fix(fn)
        assert not result and expected in result.messages[0], result.messages
    for make, expected in ((_raises, "运行出错"), (3, "需要一个创建缩放器的函数")):
        result = ex.check_loss_scaler(make)
        assert not result and expected in result.messages[0]
    assert ex.check_kahan_sum(lambda v, d: float(ex.running_sum(v, d, "kahan")[-1]))  # the right answer still passes


# --- the CLI validates everything before any work (rows 22, 23, 24, 33: --warmup-steps) ------------------

BAD_CLI = {
    "precision": (["train", "--precision", "fp17"], "--precision: unknown precision 'fp17'"),
    "steps-0": (["train", "--steps", "0"], "--steps must be >= 1"),
    "steps-neg": (["train", "--steps", "-3"], "--steps must be >= 1"),
    "stories": (["train", "--stories", "0"], "--stories must be >="),
    "batch": (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
    "block": (["train", "--block-size", "1000"], "--block-size must be in 2..256"),
    "warmup": (["train", "--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
    "out-dir": (["train", "--out", "{tmp}"], "is a directory"),
    "out-under-file": (["train", "--out", "{tmp}/file.txt/r.json"], "is a file, not a directory"),
    "out-empty": (["train", "--out", ""], "--out needs a file name"),
    "out-unwritable": (["train", "--out", "/proc/r.json"], "cannot write in"),
    "repeat": (["generate", "--repeat", "0"], "--repeat must be >= 1"),
    "new-tokens-0": (["generate", "--new-tokens", "0"], "--new-tokens must be >= 1"),
    "new-tokens-neg": (["generate", "--new-tokens", "-5"], "--new-tokens must be >= 1"),
    "new-tokens-past-context": (["generate", "--new-tokens", "300"], "--new-tokens must be at most"),
    "generate-precision": (["generate", "--precision", "fp17"], "--precision: unknown precision 'fp17'"),
    "train-steps": (["generate", "--train-steps", "0"], "--train-steps must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_cli_user_error_is_one_line_before_any_work(case, tmp_path, monkeypatch, capsys):
    from mixprec import bench

    (tmp_path / "file.txt").write_text("x")
    argv, message = BAD_CLI[case]
    monkeypatch.setattr(bench, "load_stories", lambda *a, **k: pytest.fail("work started before the arguments were checked"))
    monkeypatch.setattr(bench, "storyteller", lambda *a, **k: pytest.fail("work started before the arguments were checked"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_cli_in_a_subprocess_prints_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mixprec.bench", "train", "--steps", "0"], env=_env(tmp_path), capture_output=True, text=True)
    lines = [line for line in res.stderr.splitlines() if "mixprec.bench" in line or "Traceback" in line]
    assert res.returncode == 2 and lines == ["python -m mixprec.bench train: error: --steps must be >= 1, got 0"], res.stderr


@pytest.fixture(scope="module")
def tiny_lm(filled_cache, tmp_path_factory):
    from mixprec import story

    root = tmp_path_factory.mktemp("lm-cache")
    shutil.copytree(filled_cache[0], root, dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIXPREC_CACHE", str(root))
        patch.setattr(story, "train", lambda *a, **k: pytest.fail("the cache should have held this model"))
        model, tokenizer, _, _ = story.storyteller(**TINY)
    return model, tokenizer


def test_generate_checks_prompt_and_context_window(tiny_lm):
    """Rows 24, 25: past n_positions, a prompt longer than the window, an empty prompt -> clear errors before generating."""
    from mixprec.story import generate, time_generation

    model, tokenizer = tiny_lm
    n = model.config.n_positions
    prompt = "Once upon a time"
    k = len(tokenizer(prompt)["input_ids"])
    with pytest.raises(ValueError, match=f"context window of {n} positions: ask for at most {n - k} new tokens"):
        generate(model, tokenizer, prompt, max_new_tokens=n)
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate(model, tokenizer, "the cat " * 300, max_new_tokens=5)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tokenizer, "", max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate(model, tokenizer, prompt, max_new_tokens=0)
    with pytest.raises(TypeError, match="prompt must be a string"):
        generate(model, tokenizer, None)
    with pytest.raises(ValueError, match="context window"):
        time_generation(model, tokenizer, prompt, max_new_tokens=n, repeat=1)
    long = "the cat " * 126
    k = len(tokenizer(long)["input_ids"])
    assert n - 20 < k < n
    result = generate(model, tokenizer, long, max_new_tokens=n - k, greedy=True)  # exactly the window: allowed
    assert 1 <= len(result.token_ids) <= n - k


# --- recorded GPU results (rows 11, 27, 28) ------------------------------------------------------------------

GOOD_RECORD = {"device": "NVIDIA H100", "torch_version": "2.5.0", "date": "2026-01-01", "command": "python -m mixprec.bench train"}
BAD_RECORDS = {
    "malformed": ("{", "not a readable JSON file"),
    "empty": ("", "not a readable JSON file"),
    "number": ("3", "must be a JSON object, got int"),
    "list": ("[1, 2]", "must be a JSON object, got list"),
    "directory": (None, "not a readable JSON file"),
    "provenance-list": (json.dumps({**GOOD_RECORD, "device": ["H100"]}), "must be non-empty strings"),
    "provenance-null": (json.dumps({**GOOD_RECORD, "date": None}), "must be non-empty strings"),
    "provenance-int": (json.dumps({**GOOD_RECORD, "command": 5}), "must be non-empty strings"),
    "provenance-blank": (json.dumps({**GOOD_RECORD, "torch_version": "  "}), "must be non-empty strings"),
    "provenance-missing": (json.dumps({"device": "H100"}), "lacks provenance fields"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_load_recorded_names_the_file_in_every_error(case, tmp_path):
    from mixprec import hw

    text, message = BAD_RECORDS[case]
    path = tmp_path / f"train_{case}.json"
    if text is None:
        path.mkdir()
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        hw.load_recorded("train_", tmp_path)
    assert str(path) in str(info.value)


def test_load_recorded_bom_name_and_package_data(tmp_path):
    from mixprec import hw

    (tmp_path / "train_bom.json").write_text("\ufeff" + json.dumps(GOOD_RECORD), encoding="utf-8")
    assert hw.load_recorded("train_", tmp_path) == [GOOD_RECORD]  # a BOM is not an error
    for name in ("*", "../train_", "a/b"):
        with pytest.raises(ValueError, match="plain file-name prefix"):
            hw.load_recorded(name, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hw.load_recorded("train_", tmp_path / "missing")
    # row 11: the default directory is package data, so an installed package (Colab) finds it
    assert hw.PACKAGE_GPU_DATA.is_dir() and hw.PACKAGE_GPU_DATA.is_relative_to(Path(hw.__file__).parent)
    assert '"data/gpu/*.json"' in (CODE / "pyproject.toml").read_text()


# --- formats (rows 17, 18, 19, 33: ulp of NaN) ----------------------------------------------------------------


def _nearest_even_reference(x: torch.Tensor, grid: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Round each |x| to the nearest of ``grid`` (sorted, finite, >= 0), ties to the even code; brute force."""
    out = []
    for v in x.abs().tolist():
        i = int(torch.searchsorted(grid, torch.tensor(v, dtype=grid.dtype)))
        if i < len(grid) and grid[i] == v:
            out.append(float(grid[i]))
            continue
        lo, hi = max(i - 1, 0), min(i, len(grid) - 1)
        dlo, dhi = abs(v - float(grid[lo])), abs(float(grid[hi]) - v)
        pick = lo if dlo < dhi or (dlo == dhi and int(codes[lo]) % 2 == 0) else hi
        out.append(float(grid[pick]))
    return torch.tensor(out)


@pytest.mark.parametrize("name", ["e1m1", "e1m2", "e1m3", "e1m1fn", "e1m3fn", "e2m1", "e2m3fn", "e3m2"])
def test_tiny_formats_round_onto_their_own_grid(name):
    """Row 17: E1Mx rounded values stay on decode_all's grid (max 1.5 for E1M1 was off it), to the nearest value."""
    from mixprec import formats as F

    fmt = F.get_format(name)
    values = F.decode_all(fmt)
    finite = torch.isfinite(values) & (values >= 0) & ~((values == 0) & (torch.signbit(values)))
    grid, order = values[finite].sort()
    codes = torch.arange(len(values))[finite][order]
    assert fmt.max == float(grid[-1])
    x = torch.linspace(0, fmt.max, 997)
    got = F.round_to_format(x, fmt)
    assert torch.equal(got, _nearest_even_reference(x, grid, codes))
    above = F.round_to_format(torch.tensor([fmt.max * 1.6]), fmt, overflow="saturate")
    assert above.item() == fmt.max


def test_custom_format_names_round_trip():
    """Row 18: get_format(custom_format(...).name) is that format, not a different one with the same short name."""
    from mixprec import formats as F

    for fmt in (F.custom_format(4, 3), F.custom_format(4, 3, "fn"), F.custom_format(3, 4), F.custom_format(5, 2, bias=20),
                F.custom_format(2, 1, "fn", bias=0), F.custom_format(1, 2)):
        back = F.get_format(fmt.name)
        assert (back.exponent_bits, back.mantissa_bits, back.bias, back.special, back.max) == \
               (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.special, fmt.max), fmt.name
    assert F.custom_format(4, 3).max == 240.0 and F.get_format("e4m3").max == 448.0  # 'e4m3' still means E4M3FN
    with pytest.raises(ValueError, match="no positive finite value"):
        F.custom_format(1, 0)
    with pytest.raises(TypeError, match="must be an int"):
        F.custom_format(4.0, 3)


def test_float64_statistics_are_exact():
    """Row 19: 1e-300 is flushed (not zero) and 1e300 overflows (is not non-finite) in float64 input; no double rounding."""
    from mixprec import formats as F
    from mixprec.debug import tensor_stats

    x = torch.tensor([1e-300, -1e-300, 1e300, 0.0, 1.0, 1e-6], dtype=torch.float64)
    assert F.zone_fractions(x, 1.0, "fp16") == {"zero": 1 / 6, "flushed": 2 / 6, "subnormal": 1 / 6, "normal": 1 / 6, "overflow": 1 / 6}
    assert F.zone_fractions(x, 1.0, "fp64")["normal"] == 5 / 6
    stats = tensor_stats(x, "fp16")
    assert stats.nonfinite == 0 and stats.above_max == 1 / 6 and stats.flushed == 2 / 6 and stats.min == -1e-300 and stats.max == 1e300
    just_above_tie = torch.tensor([1 + 2**-11 + 2**-40, -(1 + 2**-11 + 2**-40), 65519.99999], dtype=torch.float64)
    rounded = F.round_to_format(F.float32_for_rounding(just_above_tie, "fp16"), "fp16")
    assert rounded.tolist() == [1 + 2**-10, -(1 + 2**-10), 65504.0]  # naive .float() first would give 1.0 for the first


def test_ulp_of_nan_or_inf_is_an_error():
    from mixprec.formats import FP16

    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            FP16.ulp(bad)
    assert FP16.ulp(1.0) == 2.0**-10


# --- widgets: bad inputs show a message; every string put into a page is escaped (rows 20, 32) ------------------

_FAKE_DOM = """
function El(tag) { this.tag = tag; this.children = []; this.textContent = ""; this.innerHTML = ""; this.value = "";
                   this.listeners = {}; this.dataset = {}; this.style = {}; this.q = {}; }
El.prototype.appendChild = function (c) { this.children.push(c); return c; };
El.prototype.addEventListener = function (t, f) { this.listeners[t] = f; };
El.prototype.querySelector = function (s) { return this.q[s] || (this.q[s] = new El(s)); };
const root = new El("div"), created = [];
global.document = { getElementById: () => root, createElement: t => { const e = new El(t); created.push(e); return e; },
                    createTextNode: t => new El("#text") };
global.__type = function (selector, text) { const el = root.querySelector(selector); el.value = text; el.listeners.input(); };
"""


def _run_page_scripts(tmp_path, page: str, after: str) -> dict:
    """Run the page's inline scripts in node with a fake DOM, then ``after``; returns what ``after`` prints as JSON."""
    from html.parser import HTMLParser

    class Scripts(HTMLParser):
        def __init__(self):
            super().__init__()
            self.scripts, self.inside = [], False

        def handle_starttag(self, tag, attrs):
            self.inside = tag == "script"
            if self.inside:
                self.scripts.append("")

        def handle_endtag(self, tag):
            self.inside = False

        def handle_data(self, data):
            if self.inside:
                self.scripts[-1] += data

    parser = Scripts()
    parser.feed(page)
    file = tmp_path / "page.js"
    file.write_text(_FAKE_DOM + "\n".join(parser.scripts) + "\n" + after)
    res = subprocess.run(["node", str(file)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return {"scripts": len(parser.scripts), "out": json.loads(res.stdout.strip().splitlines()[-1])}


node_only = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@node_only
def test_widget_strings_cannot_inject_script(tmp_path):
    """Row 32: a format name containing </script> stays text: one script block, the name shown as typed, nothing injected."""
    from mixprec.formats import FloatFormat
    from mixprec.widgets import format_explorer

    evil = '</script><script>globalThis.pwned = 1</script><img src=x onerror="globalThis.pwned=2">'
    page = format_explorer("0.1", formats=("fp16", FloatFormat(evil, 5, 2, 15)))._repr_html_()
    assert evil not in page
    after = ("__type('input', '0.1'); console.log(JSON.stringify([globalThis.pwned || 0, "
             "created.filter(e => e.className === 'mp-name').map(e => e.textContent)]))")
    result = _run_page_scripts(tmp_path, page, after)
    assert result["scripts"] == 1
    assert result["out"] == [0, ["fp16", evil]]


@node_only
def test_memory_calculator_bad_inputs_show_a_message(tmp_path):
    """Row 32: inf, 1e400, NaN, negative, empty and huge inputs show a message, not 'NaN GiB' or a dead widget."""
    from mixprec.widgets import MemoryCalculator

    for bad in (math.inf, math.nan, -1.0, 1e30, "12", None, True):
        with pytest.raises(ValueError, match="millions must be a number"):
            MemoryCalculator(bad)
    typed = ["1e400", "NaN", "-5", "", "abc", "1e12", "124.4", "0"]
    after = "const body = root.querySelector('tbody'); const out = [];\n" + "".join(
        f"__type('input', {json.dumps(t)}); out.push(body.innerHTML);\n" for t in typed) + "console.log(JSON.stringify(out));"
    out = _run_page_scripts(tmp_path, MemoryCalculator()._repr_html_(), after)["out"]
    messages = dict(zip(typed, out))
    for t in ("1e400", "1e12"):
        assert "参数量太大" in messages[t]
    assert "请输入一个数" in messages["NaN"] and "请输入一个数" in messages["abc"] and "负数" in messages["-5"] and "请输入参数量" in messages[""]
    assert all("NaN" not in v and "Infinity" not in v for v in out)
    assert "GiB" in messages["124.4"] and "0.00 GiB" in messages["0"]


@node_only
def test_scale_explorer_nan_inf_and_empty(tmp_path):
    """Row 20: NaN and inf count as overflow (zones sum to 1, as in Python); inf no longer crashes; empty input is refused clearly."""
    from mixprec.formats import zone_fractions
    from mixprec.widgets import LossScaleExplorer, scale_histogram

    values = torch.tensor([1.0, 2.0**-30, math.nan, math.inf, -math.inf, 0.0, 1e-3, 70000.0])
    data = scale_histogram(values)
    assert data["nonfinite"] == 3 and data["total"] == 8
    after = "console.log(JSON.stringify([0, 8].map(k => MixprecScale.zones(" + json.dumps(data) + ", k)).concat([root.querySelector('tbody').innerHTML])))"
    out = _run_page_scripts(tmp_path, LossScaleExplorer(values)._repr_html_(), after)["out"]
    for k, got in zip([0, 8], out[:2]):
        assert sum(got.values()) == pytest.approx(1.0) and got == pytest.approx(zone_fractions(values, 2.0**k), abs=1e-12)
    assert "NaN%" not in out[2] and "%" in out[2]
    with pytest.raises(ValueError, match="values is empty"):
        scale_histogram(torch.tensor([]))
    with pytest.raises(ValueError, match="initial_log2_scale"):
        LossScaleExplorer(values, initial_log2_scale=100)
    empty = {"lo": 0, "width": 0.25, "counts": [], "zeros": 0, "total": 0, "fmt": data["fmt"]}
    script = "console.log(JSON.stringify(MixprecScale.zones(" + json.dumps(empty) + ", 0)))"
    assert _run_page_scripts(tmp_path, LossScaleExplorer(values)._repr_html_(), script)["out"] is None


# --- row 33: the rest ---------------------------------------------------------------------------------------


def test_misc_entry_points_give_clear_results():
    """Row 33: LayerMonitor on an empty batch, perplexity(1000), evaluate([]), token_kl with -inf masks."""
    from mixprec.debug import LayerMonitor
    from mixprec.story import evaluate, perplexity, token_kl

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    with LayerMonitor(model) as monitor:
        monitor.step = 0
        model(torch.zeros(0, 4))  # an empty batch: nothing to record, no crash
        model(torch.ones(2, 4))
    assert [r.name for r in monitor.records] == ["0", "1"]
    assert perplexity(1000) == math.inf and perplexity(math.log(5)) == pytest.approx(5) and math.isnan(perplexity(math.nan))
    with pytest.raises(ValueError, match="cannot be negative"):
        perplexity(-1.0)
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(model, [])
    masked = torch.tensor([[0.0, 1.0, -math.inf, -math.inf]])
    assert token_kl(masked, masked).item() == 0.0  # was NaN: 0 * (-inf - -inf)
    assert token_kl(masked, torch.tensor([[0.0, 1.0, 2.0, -math.inf]])).item() > 0
    assert token_kl(torch.tensor([[0.0, 1.0, 2.0, 0.0]]), masked).item() == math.inf  # p rules out what the reference allows
    with pytest.raises(ValueError, match="all -inf"):
        token_kl(torch.full((1, 4), -math.inf), masked)


def test_gpu_workflow_cache_is_scoped_to_the_commit():
    """Row 4 (CI): the GPU runner is persistent; its cache must not outlive the commit it was filled for."""
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-book.yml").read_text())
    cache = workflow["jobs"]["build"]["env"]["MIXPREC_CACHE"]
    assert "${{ github.sha }}" in cache and cache.startswith("${{ github.workspace }}")


def test_master_weights_with_a_frozen_parameter():
    """Row 33: a frozen weight is converted with the rest (one working dtype), and gets no master copy."""
    from mixprec.amp import MasterWeights

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    master = MasterWeights(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(master.master) == 3 and all(m.dtype == torch.float32 for m in master.master)
    model(torch.randn(3, 4).bfloat16()).sum().backward()  # runs: no mixed-dtype error
    master.grads_to_master()
    assert model[0].weight.grad is None


# --- branch one-setup (issues 19, 21, 25): the training setup refuses bad options before any work ------------------


def _tiny_story():
    from mixprec import story

    stories = story.load_stories("offline", n=300)
    tokenizer = story.train_tokenizer(stories.train)
    data = story.encode(stories, tokenizer)
    return story.build_model("tiny", len(tokenizer), eos_token_id=tokenizer.eos_token_id), data


@pytest.mark.parametrize("option, value, message", [
    ("clip", 0.0, "clip must be None (no clipping) or a finite number > 0, got 0.0"),
    ("clip", -1.0, "clip must be None (no clipping) or a finite number > 0, got -1.0"),
    ("clip", math.nan, "clip must be None"),
    ("clip", math.inf, "clip must be None"),
    ("clip", "1", "clip must be None"),
    ("lr", math.nan, "lr must be a finite number >= 0, got nan"),
    ("lr", math.inf, "lr must be a finite number >= 0"),
    ("lr", -1e-3, "lr must be a finite number >= 0"),
    ("weight_decay", math.nan, "weight_decay must be a finite number >= 0"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
])
def test_training_refuses_bad_optimizer_settings_before_any_work(option, value, message):
    """Issue 21 (S2, S15): clip is None or a finite number > 0; learning rate and optimizer settings are finite; one line, before any work."""
    import re

    from mixprec.story import train

    model, data = _tiny_story()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        train(model, data, precision="bf16-pure", steps=2, batch_size=2, block_size=16, progress=False, **{option: value})
    assert "\n" not in str(error.value)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16-pure did not convert the model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("betas", [(1.0, 0.9), (0.9, math.nan), (0.9,), "0.9"])
def test_policy_setup_refuses_bad_betas(betas):
    from mixprec.amp import get_policy

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"betas must be two finite numbers in \[0, 1\)"):
        get_policy("fp16-master").setup(model, lr=1e-3, betas=betas)
    assert model.weight.dtype == torch.float32


def test_policy_setup_refuses_a_scaler_without_the_gradscaler_interface():
    from mixprec.amp import get_policy

    with pytest.raises(TypeError, match="scaler must be None, False or have GradScaler's methods"):
        get_policy("fp16-amp").setup(torch.nn.Linear(2, 2), lr=1e-3, scaler=2.0**16)


def test_clip_none_means_no_clipping():
    """Issue 21: clip=None is documented as "no clipping": the update uses the whole gradient."""
    from mixprec.amp import get_policy
    from mixprec.step import train_step

    results = {}
    for clip in (None, 1e-3):
        model = torch.nn.Linear(4, 1)
        torch.nn.init.constant_(model.weight, 1.0)
        setup = get_policy("fp32").setup(model, lr=0.1, clip=clip, loss_fn=lambda out, _: 100 * out.sum())
        results[clip] = (train_step(setup, torch.ones(8, 4), None), model.weight.detach().clone())
    (free, w_free), (clipped, w_clipped) = results[None], results[1e-3]
    assert free.grad_norm == clipped.grad_norm > 1e-3  # the norm is measured before clipping either way
    assert not torch.equal(w_free, w_clipped)


def test_first_overflowing_scale_runs_on_the_models_device():
    """Issue 25: no device="cpu" default; the batch goes to the model's device."""
    import inspect

    from mixprec.scale_experiments import first_overflowing_scale
    from mixprec.step import forward_backward

    assert inspect.signature(first_overflowing_scale).parameters["device"].default is None
    assert inspect.signature(forward_backward).parameters["device"].default is None
    model = torch.nn.Linear(3, 1)
    assert first_overflowing_scale(model, torch.ones(2, 3, dtype=torch.float32), None, lambda out, _: out.sum(), "fp32",
                                   exponents=[0, 200]) == 200

# --- branch emulation: the inspector labels data-dependent ops truthfully (reliability review S6) ---------------------


def test_inspector_labels_data_dependent_ops_truthfully():
    """``masked_select``, ``unique`` and ``repeat_interleave`` have no meta kernel (their output size depends on the data),
    so the inspector cannot re-run them without autocast: that is "unknown", not "autocast made it FP32"."""
    from mixprec.amp import AutocastInspector

    x = torch.randn(4, 8)
    with torch.amp.autocast("cpu", dtype=torch.bfloat16), AutocastInspector() as seen:
        torch.masked_select(x, x > 0)
        torch.unique(x)
        torch.repeat_interleave(x[0], torch.arange(8))
    categories = {r.name: r.category for r in seen.records if r.name in ("masked_select", "unique", "repeat_interleave")}
    assert categories == {"masked_select": "unknown", "unique": "unknown", "repeat_interleave": "unknown"}

# ==== branch reliability2: the second reliability pass (../shared/reviews/reliability-2026-12.md) ==============
# One test per finding class; each names the findings (D = data loss, S = silent wrong result, C = crash,
# U = unclear error, X = security) it covers.


def _load_script(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_book_budget_out_never_deletes_what_it_did_not_create(tmp_path, monkeypatch, capsys):
    """D1: --out of a folder with other content (or a file) is refused in one line, before anything is deleted."""
    budget = _load_script(ROOT / "bench" / "book_budget.py", "book_budget_under_test")
    monkeypatch.setattr(budget.shutil, "which", lambda name: None)  # never start a real book build from a test
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "precious.txt").write_text("data")
    (tmp_path / "a-file").write_text("x")
    for out, message in ((mine, "folder with other content"), (tmp_path / "a-file", "is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            budget.main(["--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert (mine / "precious.txt").read_text() == "data" and (tmp_path / "a-file").read_text() == "x"
    earlier = tmp_path / "earlier"  # an earlier build of the script (its marker) is accepted; an empty folder too
    earlier.mkdir()
    (earlier / budget.MARKER).write_text("")
    for out in (earlier, tmp_path / "new"):
        with pytest.raises(SystemExit, match="jupyter-book is not installed"):
            budget.main(["--out", str(out)])


def test_out_file_never_replaces_a_symlink_fifo_or_device(tmp_path, monkeypatch, capsys):
    """D2: --out through a symlink writes the link's target; a FIFO or a device node is refused before any work."""
    from mixprec import bench, cli

    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "r.json"
    link.symlink_to(real)
    cli.check_out_file(link)
    cli.write_out_file(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    nodes = [fifo]
    if os.geteuid() == 0:  # a character device like /dev/null, made here, never the real one
        os.mknod(tmp_path / "null", 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
        nodes.append(tmp_path / "null")
    monkeypatch.setattr(bench, "load_stories", lambda *a, **k: pytest.fail("work started before the arguments were checked"))
    for node in nodes:
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["train", "--steps", "1", "--out", str(node)])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "not a regular file" in err and len(err.splitlines()) == 1, err
        assert not node.is_file()  # still the node it was


def test_cache_clear_leaves_a_running_writers_work(tmp_path, monkeypatch, capsys):
    """C1: `clear` and `verify` while a writer builds: the writer's temporary folder stays, and verify says it is in progress."""
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))
    entry = mcache.cache_key("demo", n=1)
    tmp = tmp_path / f".tmp-{entry.name}-abc123_x"
    tmp.mkdir()
    (tmp / "b.bin").write_bytes(b"half")
    dead = tmp_path / ".tmp-demo-0123456789abcdef-zz"  # left by a killed writer: nobody holds its lock
    dead.mkdir()
    with mcache._lock(entry):  # a live writer of this key
        assert mcache.main(["verify"]) == 0
        assert "being built now" in capsys.readouterr().out
        assert mcache.main(["clear"]) == 0
        out = capsys.readouterr().out
        assert (tmp / "b.bin").read_bytes() == b"half" and "in use" in out and entry.name in out
    assert not dead.exists()
    assert mcache.main(["clear"]) == 0 and not tmp.exists()  # once the writer is done, clear removes it


def test_cache_key_holds_dependency_versions_and_the_manifest_key_is_checked(tmp_path, monkeypatch):
    """S7: other torch/transformers/tokenizers versions give another key; S8: an entry copied to another key's name is rebuilt."""
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))
    versions = mcache.dependency_versions()
    assert versions["torch"] == torch.__version__ and set(versions) == {"torch", "transformers", "tokenizers"}
    before = mcache.cache_key("storyteller", size="tiny")
    for name in versions:
        monkeypatch.setattr(mcache, "dependency_versions", lambda name=name: {**versions, name: "0.0.1"})
        assert mcache.cache_key("storyteller", size="tiny") != before, name
    monkeypatch.undo()
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))
    built = []

    def build(lr):
        def write(directory):
            built.append(lr)
            (directory / "lr.txt").write_text(str(lr))
            return lr
        return write

    def load(directory):
        return float((directory / "lr.txt").read_text())

    assert mcache.cached("demo", {"lr": 0.1}, build(0.1), load) == 0.1
    shutil.copytree(mcache.cache_key("demo", lr=0.1), mcache.cache_key("demo", lr=0.5))  # a manual copy under another key
    assert mcache.cached("demo", {"lr": 0.5}, build(0.5), load) == 0.5 and built == [0.1, 0.5]


def test_mixprec_cache_is_expanded_and_absolute(tmp_path, monkeypatch):
    """S9: MIXPREC_CACHE='~/...' is under the home folder, a relative one under the cwd of the first use, made absolute."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIXPREC_CACHE", "~/mixcache")
    monkeypatch.chdir(tmp_path)
    assert mcache.cache_dir() == tmp_path / "home" / "mixcache" and not (tmp_path / "~").exists()
    monkeypatch.setenv("MIXPREC_CACHE", "rel")
    assert mcache.cache_dir() == tmp_path / "rel" and mcache.cache_dir().is_absolute()


def test_read_only_cache_builds_without_caching_and_ignores_hidden_files(tmp_path, monkeypatch, capsys):
    """U1: a cache that cannot be written serves its entries, and builds a missing one uncached (one line, no OSError);
    U3: .DS_Store or .ipynb_checkpoints inside an entry are not damage."""
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))

    def build(directory):
        (directory / "v.txt").write_text("1")
        return 1

    assert mcache.cached("demo", {"n": 1}, build, lambda d: int((d / "v.txt").read_text())) == 1
    entry = mcache.cache_key("demo", n=1)
    (entry / ".DS_Store").write_bytes(b"\0")
    (entry / ".ipynb_checkpoints").mkdir()
    (entry / ".ipynb_checkpoints" / "v-checkpoint.txt").write_text("1")
    assert mcache.verify(entry) is None
    real_access = os.access
    monkeypatch.setattr(mcache.os, "access", lambda path, mode, **k: False if Path(path) == tmp_path else real_access(path, mode, **k))
    assert mcache.cached("demo", {"n": 1}, lambda d: pytest.fail("rebuilt"), lambda d: int((d / "v.txt").read_text())) == 1
    assert mcache.cached("demo", {"n": 2}, build, lambda d: pytest.fail("loaded")) == 1
    err = capsys.readouterr().err
    assert "cannot be written" in err and "without caching" in err and not mcache.cache_key("demo", n=2).exists()


def _chapter(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"# t\n\n```{{code-cell}} ipython3\n{body}\n```\n", encoding="utf-8")
    return path


def test_execute_chapters_never_reports_a_stale_or_empty_run_as_ok(tmp_path, capsys):
    """S10: a killed child's chapter is FAIL even with an earlier run's report there; S11: a file without code cells
    is refused; U11, C3: --timeout <= 0 and --out <a file> are one-line errors before any chapter runs."""
    tool = _load_script(ROOT / "tools" / "execute_chapters.py", "execute_chapters_under_test")
    out = tmp_path / "out"
    out.mkdir()
    slow = _chapter(tmp_path, "01_slow.md", "import time\ntime.sleep(60)")
    (out / "01_slow.json").write_text(json.dumps({"chapter": "01_slow.md", "ok": True, "error": None, "cells": 99, "seconds": 1.0, "glue": {}}))
    assert tool.main([str(slow), "--out", str(out), "--timeout", "1"]) == 1
    assert "FAIL 01_slow.md" in capsys.readouterr().out and not (out / "01_slow.json").exists()
    (tmp_path / "notes.md").write_text("# no code here\n")
    (tmp_path / "a-file").write_text("x")
    for argv, message in (([str(tmp_path / "notes.md"), "--out", str(out)], "no {code-cell} blocks"),
                          ([str(slow), "--out", str(out), "--timeout", "-5"], "--timeout: must be a finite number"),
                          ([str(slow), "--out", str(tmp_path / "a-file")], "is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


BAD_SCRIPTS = {
    "storyteller-samples": ("storyteller_cpu.py", ["--samples", "0"], "--samples: must be >= 1, got 0"),
    "storyteller-seconds": ("storyteller_cpu.py", ["--seconds", "nan"], "--seconds: must be a finite number > 0"),
    "storyteller-precision": ("storyteller_cpu.py", ["--precision", "fp17"], "unknown precision 'fp17'; valid: fp32"),
    "emulated-policies": ("emulated_amp_speed.py", ["--policies", "fp32", "fp17"], "unknown precision 'fp17'"),
    "generation-precisions": ("generation.py", ["--precisions", "fp32", "fp17"], "unknown precision 'fp17'; valid: fp32"),
    "generation-batch": ("generation.py", ["--batch-sizes", "0"], "--batch-sizes: must be >= 1"),
    "generation-new-tokens": ("generation.py", ["--new-tokens", "300"], "--new-tokens must be at most 240"),
    "rounding-repeat": ("round_to_format_speed.py", ["--repeat", "0"], "--repeat: must be >= 1"),
    "rounding-n": ("round_to_format_speed.py", ["--n", "-1"], "--n: must be >= 1"),
    "rounding-device": ("round_to_format_speed.py", ["--device", "cuda:99"], "is not available on this machine"),
    "matmul-sizes": ("matmul_dtypes.py", ["--sizes", "-8"], "--sizes: must be >= 1, got -8"),
    "fp8-sizes": ("fp8_gemm.py", ["--sizes", "0"], "--sizes: must be >= 16"),
    "profile-missing": ("profile_chapter.py", ["nosuch.md"], "no such chapter: 'nosuch.md'"),
    "profile-top": ("profile_chapter.py", ["README.md", "--top", "0"], "--top: must be >= 1"),
    "budget-scale": ("book_budget.py", ["--timeout-scale", "0"], "--timeout-scale: must be a finite number > 0"),
}


@pytest.mark.parametrize("case", list(BAD_SCRIPTS))
def test_bench_scripts_validate_arguments_before_any_work(case, monkeypatch, capsys):
    """C3: every bench/ script checks its arguments first: one line naming the value (and the valid choices), exit 2."""
    from mixprec import story

    script, argv, message = BAD_SCRIPTS[case]
    module = _load_script(ROOT / "bench" / script, "bench_" + script.removesuffix(".py"))
    work = lambda *a, **k: pytest.fail("work started before the arguments were checked")  # noqa: E731
    for name in ("load_stories", "storyteller", "train_tokenizer", "train"):
        monkeypatch.setattr(story, name, work)
        if hasattr(module, name):
            monkeypatch.setattr(module, name, work)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # never a real book build from a test
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv) if script in ("emulated_amp_speed.py", "profile_chapter.py", "book_budget.py") else module.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_bench_train_too_few_tokens_is_one_line(tmp_path, monkeypatch, capsys):
    """C2: --stories 20 --block-size 256 is refused in one line once the stream length is known, before any training step."""
    from mixprec import bench

    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))
    monkeypatch.setattr(bench, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["train", "--stories", "20", "--block-size", "256", "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--block-size 256 is too long for --stories 20" in err, err


def test_prepared_inference_model_keeps_or_refuses_its_precision(tiny_lm):
    """S3: a precision asked of an InferenceModel is its own (kept) or refused, never relabelled."""
    from mixprec import story

    model, tokenizer = tiny_lm
    prepared = story.for_inference(model, "fp32")
    assert story.for_inference(prepared) is prepared and story.for_inference(prepared, "fp32") is prepared
    with pytest.raises(ValueError, match="already prepared for inference at 'fp32', not 'bf16'"):
        story.for_inference(prepared, "bf16")
    with pytest.raises(ValueError, match="already prepared"):
        story.generate(prepared, tokenizer, "Once", precision="bf16", max_new_tokens=2)
    with pytest.raises(ValueError, match="already prepared"):
        story.time_generation(prepared, tokenizer, "Once", precision="bf16", max_new_tokens=2, repeat=1)
    bf16 = story.for_inference(model, "bf16")
    timing = story.time_generation(bf16, tokenizer, "Once", max_new_tokens=2, repeat=1)
    assert timing.precision == "bf16" and timing.weight_bytes == sum(p.numel() * 2 for p in model.parameters())
    assert len(story.generate(bf16, tokenizer, "Once", max_new_tokens=2, greedy=True).token_ids) >= 1  # its own precision


def test_kahan_checker_passes_only_a_compensated_sum_held_in_the_dtype():
    """S1 (row 10): torch's .sum() (FP32 accumulator), an FP32 or exact sum rounded at the end, a pairwise sum and
    a Kahan sum in FP32 are all refused; the Kahan sum with sum and compensation in the dtype passes."""
    from mixprec import exercises as ex
    from mixprec.summation import running_sum

    def pairwise(v, d):
        x = v.to(d)
        while x.numel() > 1:
            x = torch.cat([x, torch.zeros(x.numel() % 2, dtype=d)])
            x = x[0::2] + x[1::2]
        return float(x[0])

    wrong = {"torch .sum()": lambda v, d: float(v.to(d).sum()), "fp32 then round": lambda v, d: float(v.sum().to(d)),
             "exact then round": lambda v, d: float(torch.tensor(float(v.double().sum())).to(d)), "pairwise": pairwise,
             "kahan in fp32": lambda v, d: float(torch.tensor(float(running_sum(v, torch.float32, "kahan")[-1])).to(d))}
    for name, fn in wrong.items():
        result = ex.check_kahan_sum(fn)
        assert not result and str(result).startswith("✘"), name

    def my_kahan(values, dtype):  # the chapter's solution
        s, c = torch.zeros((), dtype=dtype), torch.zeros((), dtype=dtype)
        for v in values.to(dtype):
            y = v - c
            t = s + y
            c = (t - s) - y
            s = t
        return float(s)

    assert ex.check_kahan_sum(my_kahan)


def test_checkers_never_raise_on_any_answer():
    """C5 (row 26): amax beyond float32, a meta tensor (as an answer or from the reader's function), huge ints."""
    from mixprec import exercises as ex

    meta = torch.empty(1, device="meta")
    odd = [1e39, -1e39, 10**400, meta, torch.tensor(1e39), complex(1, 1)]
    calls = [lambda a: ex.check_mx_block(a, 448.0), lambda a: ex.check_mx_block(1.0, a),
             lambda a: ex.check_format_limits("fp16", max=a, min_normal=a, min_subnormal=a, eps=a),
             lambda a: ex.check_memory("fp32", a, weights=1, grads=1, optimizer=1),
             lambda a: ex.check_memory("fp32", 10, weights=a, grads=a, optimizer=a), lambda a: ex.check_smallest_update("bf16", a, a),
             lambda a: ex.check_tokens_per_second(lambda t, e, s: a), lambda a: ex.check_kahan_sum(lambda v, d: a)]
    for call in calls:
        for answer in odd:
            result = call(answer)
            assert isinstance(result, ex.CheckResult) and not result and result.messages, (answer, result)
    result = ex.check_round_to_fp16(lambda x: torch.empty_like(x, device="meta"))
    assert not result and "读不出数值" in result.messages[-1]


def test_markdown_reprs_escape_markup():
    """X1: names from code are literal text in the Markdown reprs, as in the HTML ones."""
    from mixprec.exercises import CheckResult
    from mixprec.formats import FloatFormat
    from mixprec.widgets import LossScaleExplorer, escape_markdown, format_explorer

    evil = "<img src=x onerror=alert(1)>"
    fmt = FloatFormat(evil, 5, 2, 15)
    for text in (format_explorer("1", formats=(fmt,))._repr_markdown_(), LossScaleExplorer([1.0, 2.0], fmt)._repr_markdown_(),
                 CheckResult(False, [evil + " `x` [a](b)\n# heading"])._repr_markdown_()):
        assert "\\<img" in text and not re.search(r"(?<!\\)[<>`\[\]]", text) and "\n#" not in text, text
    assert escape_markdown("1.5e-3 *a*") == "1\\.5e\\-3 \\*a\\*"


def test_float8_conversion_converts_a_root_linear():
    """S5: convert_to_float8_training(nn.Linear) returns the converted layer, as torchao's does; a filter can keep it."""
    from mixprec.fp8 import Float8Linear, convert_to_float8_training

    layer = torch.nn.Linear(32, 32)
    assert isinstance(convert_to_float8_training(layer), Float8Linear)
    assert convert_to_float8_training(layer, module_filter_fn=lambda mod, fqn: False) is layer
    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    assert convert_to_float8_training(model) is model and isinstance(model[0], Float8Linear)


def test_round_all_master_weights_put_frozen_weights_on_the_grid():
    """S12 (row 33): MasterWeights(model, <format>) rounds a frozen weight too (the model computes on the grid)."""
    from mixprec.amp import MasterWeights
    from mixprec.formats import round_to_format

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(0.1)
    model[0].weight.requires_grad_(False)
    master = MasterWeights(model, "e4m3fn")
    assert float(model[0].weight[0, 0]) == 0.1015625 and len(master.master) == 3
    for p in model.parameters():
        assert torch.equal(p, round_to_format(p, "e4m3fn"))


def test_policy_fields_are_checked_and_counted():
    """C8: round_all given by name works; U7: a non-float param_dtype or unknown update_rounding is refused at once;
    S13: param_dtype without masters counts its own bytes; U8: a scaler given as a string is refused."""
    from mixprec.amp import Policy, get_policy

    assert Policy("x", round_all="fp16", master_weights=True).bytes_per_parameter()["weights"] == 6
    with pytest.raises(ValueError, match="param_dtype must be a floating-point"):
        Policy("x", param_dtype=torch.int8)
    with pytest.raises(ValueError, match="update_rounding must be None, 'nearest'"):
        Policy("x", update_rounding="bogus")
    assert Policy("mine", param_dtype=torch.bfloat16).bytes_per_parameter() == {"weights": 2, "grads": 2, "optimizer": 4, "autocast_cache": 0}
    assert Policy("mine", param_dtype=torch.float64).bytes_per_parameter()["weights"] == 8
    with pytest.raises(TypeError, match="scaler must be None.* got 'dynamic'"):
        get_policy("fp16-amp").scaler("cpu", "dynamic")


def _tiny_data(vocab: int = 50):
    from mixprec.story import TokenData

    g = torch.Generator().manual_seed(0)
    return TokenData(torch.randint(0, vocab, (3000,), generator=g), torch.randint(0, vocab, (800,), generator=g), vocab)


def test_train_refuses_options_that_fail_at_the_end_before_any_step(monkeypatch):
    """C4: eval_batches=0 is refused before the first step, naming eval_batches; U8: scaler='dynamic' too;
    S14: train_step refuses an empty batch."""
    from mixprec import story
    from mixprec.amp import get_policy
    from mixprec.step import train_step

    monkeypatch.setattr(sys.modules["mixprec.story.train"], "train_step", lambda *a, **k: pytest.fail("a training step ran"))
    model = story.build_model("tiny", 50)
    with pytest.raises(ValueError, match="eval_batches must be an integer >= 1"):
        story.train(model, _tiny_data(), steps=2, batch_size=2, block_size=16, eval_batches=0, progress=False)
    with pytest.raises(TypeError, match="scaler must be None"):
        story.train(model, _tiny_data(), steps=2, batch_size=2, block_size=16, scaler="dynamic", progress=False)
    setup = get_policy("fp32").setup(torch.nn.Linear(4, 1), lr=0.1, loss_fn=lambda o, t: (o - t).pow(2).mean(), device="cpu")
    with pytest.raises(ValueError, match="empty batch"):
        train_step(setup, torch.zeros(0, 4), torch.zeros(0, 1))


def test_storyteller_checks_its_precision_before_any_work(monkeypatch):
    """U2: an fp8 Policy object is refused like the name; U4: a misspelt precision fails before stories and tokenizer."""
    from mixprec import story
    from mixprec.amp import get_policy

    monkeypatch.setattr(story, "load_stories", lambda *a, **k: pytest.fail("work started before the precision was checked"))
    with pytest.raises(ValueError, match="caches plain GPT-2 checkpoints"):
        story.storyteller("tiny", precision=get_policy("fp8"))
    with pytest.raises(ValueError, match="unknown precision 'bf16_amp'"):
        story.storyteller("tiny", precision="bf16_amp")


def test_fp8_scale_and_block_arguments():
    """C6: scale_from_amax takes a Python number; S16: a negative amax is its magnitude in every mode;
    C9, U13: non-integer block sizes (1.5, True) are clear errors."""
    from mixprec.fp8 import quantize_blockwise, quantize_mx, scale_from_amax

    assert float(scale_from_amax(2.0)) == float(scale_from_amax(torch.tensor(2.0))) == 224.0
    for mode in ("real", "floor", "rceil"):
        assert torch.equal(scale_from_amax(torch.tensor(-2.0), mode=mode), scale_from_amax(torch.tensor(2.0), mode=mode))
    with pytest.raises(ValueError, match=r"block must be two positive integers .*\(1.5, 64\)"):
        quantize_blockwise(torch.ones(2, 128), block=(1.5, 64))
    with pytest.raises(ValueError, match="MX block size must be a positive integer .* got True"):
        quantize_mx(torch.ones(2, 32), block=True)


def test_small_unclear_errors_are_clear():
    """C7: ulp(10**400), bias -12345; U6: EmulatedAutocast lists its spellings; U10: 'off'/'False' mean off;
    U12: load_recorded on a file says so; U14: scale_histogram with None; S18: zone_fractions refuses complex values."""
    from mixprec import formats, hw
    from mixprec.emulate import EmulatedAutocast
    from mixprec.widgets import scale_histogram

    with pytest.raises(ValueError, match="beyond float64's range"):
        formats.FP16.ulp(10**400)
    with pytest.raises(ValueError, match="bias must be in"):
        formats.custom_format(4, 3, bias=-12345)
    with pytest.raises(ValueError, match="'fp16' or 'bf16', got 'float16'"):
        EmulatedAutocast("float16")
    with pytest.MonkeyPatch.context() as patch:
        for value, on in (("off", False), ("False", False), ("No", False), ("0 ", False), ("disabled", False), ("1", True), ("true", True)):
            patch.setenv("MIXPREC_COMPILE_ROUNDING", value)
            assert formats.compiled_rounding_enabled() is on, value
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        hw.load_recorded("train_", Path(__file__))
    with pytest.raises(TypeError, match="values must be numbers"):
        scale_histogram([1.0, None])
    with pytest.raises(TypeError, match="real values"):
        formats.zone_fractions(torch.tensor([1 + 1j]))


def test_float8_linear_errors_name_the_layer_and_empty_batches_work():
    """U5: a layer whose out_features does not fit the recipe's blocks fails in the forward, naming the layer's size
    (not an internal operand in the backward); an empty batch gives nn.Linear's empty result."""
    from mixprec import fp8

    config = fp8.Float8LinearConfig.from_recipe_name("mxfp8")
    layer = fp8.convert_to_float8_training(torch.nn.Linear(96, 40), config=config)
    with pytest.raises(ValueError, match=r"along out_features; this layer \(Linear\(96, 40\)\) has out_features = 40"):
        layer(torch.randn(32, 96))
    with torch.no_grad():
        assert layer(torch.randn(32, 96)).shape == (32, 40)  # inference: no grad-input product
    for recipe in ("tensorwise", "mxfp8"):
        empty = fp8.convert_to_float8_training(torch.nn.Linear(32, 32), config=fp8.Float8LinearConfig.from_recipe_name(recipe))
        assert empty(torch.randn(0, 32)).shape == (0, 32)


# --- lead (issue 21, S15 and S17): settings that would silently train wrong are refused ---------------------------


@pytest.mark.parametrize("setting", [dict(lr=math.nan), dict(eps=math.nan), dict(weight_decay=math.nan), dict(lr=math.inf)])
def test_bf16_adamw_refuses_non_finite_settings(setting):
    """S15: NaN fails every `< 0` test; BF16AdamW tests for what is valid, as torch.optim.AdamW does."""
    from mixprec.optim import BF16AdamW

    with pytest.raises(ValueError, match="invalid hyperparameters"):
        BF16AdamW([torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))], **setting)


@pytest.mark.parametrize("min_ratio, warmup", [(-1.0, 5), (1.5, 5), (math.nan, 5), (0.1, -1)])
def test_lr_schedule_refuses_a_negative_or_nan_floor(min_ratio, warmup):
    """S17: min_lr_ratio=-1 ended in negative learning rates (gradient ascent) without an error."""
    from mixprec.story.train import warmup_cosine

    with pytest.raises(ValueError, match="min_lr_ratio must be a number in \\[0, 1\\]|warmup must be an integer >= 0"):
        warmup_cosine(warmup, 100, min_ratio)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_scale_explorer_counts_edge_values_as_the_cast_does(tmp_path):
    """S19: on a zone's edge the page agrees with zone_fractions: 2**-25 ties to 0, 65520 overflows, 2**-14 is normal."""
    from mixprec.formats import zone_fractions
    from mixprec.widgets import scale_explorer_script, scale_histogram

    values = torch.tensor([2.0**-25, 2.0**-24, 65504.0, 65520.0, 2.0**-14, 2.0**-14 - 2.0**-26], dtype=torch.float64)
    script = tmp_path / "zones.js"
    script.write_text(scale_explorer_script() + """
const data = JSON.parse(require('fs').readFileSync(process.argv[2], 'utf8'));
console.log(JSON.stringify([-8, -1, 0, 1, 32, 33].map(k => MixprecScale.zones(data, k))));
""")
    payload = tmp_path / "data.json"
    payload.write_text(json.dumps(scale_histogram(values)))
    got = json.loads(subprocess.run(["node", str(script), str(payload)], capture_output=True, text=True, check=True).stdout)
    for k, page in zip([-8, -1, 0, 1, 32], got):
        assert page == pytest.approx(zone_fractions(values, 2.0**k), abs=1e-12), k
    assert got[2]["flushed"] == pytest.approx(1 / 6) and got[2]["overflow"] == pytest.approx(1 / 6)
    assert got[5] is None  # beyond the slider: nothing, rather than a guess


@pytest.mark.parametrize("name", ["ours-dynamic", "ours-static", "GradScaler"])
def test_a_second_scaler_step_after_train_step_is_refused_at_once(name):
    """U9: scaler.step(opt) again after train_step (which leaves no gradients) fails there, as GradScaler does, and changes nothing."""
    from mixprec.amp import get_policy
    from mixprec.step import train_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    scaler = _scalers()[name]
    setup = get_policy("fp16-amp").setup(model, lr=0.1, loss_fn=lambda out, t: (out - t).pow(2).mean(), scaler=scaler)
    assert setup.scaler is scaler  # not the policy's default GradScaler
    x, y = torch.randn(3, 4), torch.randn(3, 1)
    train_step(setup, x, y)
    assert all(p.grad is None for p in model.parameters())
    weights, scale = [p.detach().clone() for p in model.parameters()], setup.scaler.get_scale()
    with pytest.raises(AssertionError, match="^No inf checks were recorded for this optimizer"):
        setup.scaler.step(setup.optimizer)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights)) and setup.scaler.get_scale() == scale
    with pytest.raises(AssertionError, match="^No inf checks were recorded prior to update"):
        setup.scaler.update()  # the refused step recorded nothing, in GradScaler as here
    assert setup.scaler.get_scale() == scale


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e4m3fn", "e5m2"])
def test_explorer_zone_table_is_zone_fractions_at_every_scale(fmt):
    """S19: the explorer's bisection over sorted values gives zone_fractions exactly, edges, zeros, inf and NaN included."""
    from mixprec.formats import zone_fractions
    from mixprec.widgets import SLIDER_LOG2, exact_zones_at_powers_of_two

    torch.manual_seed(0)
    edges = torch.tensor([2.0**-25, 2.0**-24, 65504.0, 65520.0, 2.0**-14, 2.0**-14 - 2.0**-26, 448.0, 464.0, 0.0, math.nan, -math.inf], dtype=torch.float64)
    for values in (edges, torch.randn(5000) * 1e-4, torch.exp2(torch.arange(-60, 40.0)), torch.tensor([])):
        ks = range(SLIDER_LOG2[0], SLIDER_LOG2[1] + 1)
        assert exact_zones_at_powers_of_two(values, fmt, ks) == [zone_fractions(values, 2.0**k, fmt) for k in ks]
