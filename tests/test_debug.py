"""mixprec.debug (the non-finite tracer, tensor statistics, the monitor) and mixprec.clinic."""

import json
import math

import pytest
import torch
import torch.nn as nn
from mixprec import clinic, debug


class Poison(nn.Module):
    """Multiplies by NaN in the forward pass."""

    def forward(self, x):
        return x * float("nan")


class SqrtOfZero(nn.Module):
    """Finite in the forward pass (sqrt(0) = 0); the backward's 0.5 / sqrt(0) is inf."""

    def forward(self, x):
        return torch.sqrt(x * 0)


def _model(middle: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), middle), nn.Linear(4, 2))


def test_tracer_names_module_of_forward_nan():
    model = _model(Poison())
    found = debug.trace_nonfinite(model, lambda: model(torch.randn(3, 4)).sum().backward())
    assert found is not None
    assert (found.phase, found.module, found.op, found.kind) == ("forward", "1.1", "mul", "nan")
    assert found.inputs_finite


def test_tracer_names_module_of_backward_inf():
    model = _model(SqrtOfZero())
    found = debug.trace_nonfinite(model, lambda: model(torch.randn(3, 4)).sum().backward())
    assert found is not None
    assert (found.phase, found.module) == ("backward", "1.1")
    assert found.backward_node == "SqrtBackward0" and found.kind == "inf"


def test_tracer_tags_every_node_of_a_composite_op_and_the_loss():
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        model.weight[0, 0] = float("inf")  # a poisoned parameter: the first op only passes it on
    found = debug.trace_nonfinite(model, lambda: nn.functional.cross_entropy(model(x), y).backward())
    assert found.phase == "forward" and found.module == "" and not found.inputs_finite


def test_tracer_finds_nothing_in_a_healthy_step():
    model = _model(nn.Identity())
    assert debug.trace_nonfinite(model, lambda: model(torch.randn(3, 4)).sum().backward()) is None
    with pytest.raises(TypeError):
        debug.trace_nonfinite(model, None)


def test_tensor_stats_fractions_are_exact():
    fp16_max, tiny = 65504.0, 2.0**-14
    values = [1e5, 7e4, fp16_max, 65519.0, 1.0, -2.0, tiny, tiny / 2, 1e-8, -1e-8, 0.0, float("nan"), float("inf"), 3.0, 2.0**-25, 2.0**-24]
    s = debug.tensor_stats(torch.tensor(values), "fp16")
    n = len(values)
    assert s.numel == n
    assert s.above_max == 3 / n  # 1e5, 7e4, 65519 (which still rounds down to 65504)
    assert s.below_min_normal == 5 / n  # tiny/2, ±1e-8, 2^-25, 2^-24 and nothing else
    assert s.flushed == 3 / n  # ±1e-8 and 2^-25 (a tie, rounds to even = 0); 2^-24 survives
    assert s.nonfinite == 2 / n
    assert (s.min, s.max) == (-2.0, 1e5)
    finite = [abs(v) for v in values if math.isfinite(v)]
    assert s.abs_mean == pytest.approx(sum(finite) / len(finite), rel=1e-6)
    assert debug.tensor_stats(torch.tensor([1e-40, 1.0]), "bf16").below_min_normal == 0.5
    with pytest.raises(TypeError):
        debug.tensor_stats(torch.tensor([1, 2]))


def test_layer_monitor_records_activations_and_gradients():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Identity())
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([1e5, 1e-6, 1.0])))
    with debug.LayerMonitor(model, fmt="fp16") as monitor:
        monitor.step = 0
        model(torch.ones(2, 3)).sum().backward()
        monitor.record_gradients(0)
        monitor.step = None
        model(torch.ones(2, 3))  # paused: not recorded
    acts = monitor.series("activation", "above_max")
    assert acts == {"0": ([0], [1 / 3]), "1": ([0], [1 / 3])}
    below = monitor.series("activation", "below_min_normal")
    assert below["0"] == ([0], [1 / 3])
    grads = monitor.series("gradient", "abs_mean")
    assert grads == {"0.weight": ([0], [2.0])}  # d(sum)/dW_ij = sum over the batch of x_j = 2
    with pytest.raises(ValueError):
        monitor.series("gradient", "median")
    with pytest.raises(ValueError):
        debug.LayerMonitor(model, modules=["nope"])
    assert not model[0]._forward_hooks  # closed


@pytest.mark.parametrize("case", list(clinic.CASES))
def test_clinic_case_fails_before_its_fix_and_trains_after(case):
    broken = clinic.run_case(case, fixed=False, steps=300)
    fixed = clinic.run_case(case, fixed=True, steps=300, trace_steps=80)  # every broken case fails within 80 steps (next test)
    assert not broken.trained and broken.accuracy < 0.5
    assert broken.first_failure is not None  # the tracer found an inf or NaN
    assert fixed.trained and fixed.accuracy >= 0.9
    assert fixed.first_failure is None


def test_clinic_tracer_points_at_the_cause():
    expected = {
        "naive_softmax": ("attn", "sum"),  # Σ exp(s) passes 65504
        "layernorm_eps": ("norm", "div"),  # 0 / sqrt(0 + 0)
        "fp16_loss": (debug.OUTSIDE, "log"),  # log(0): p underflowed
        "additive_mask": ("attn", "lift_fresh"),  # the constant -1e9 is already -inf in FP16
        "exploding_lr": ("attn", "bmm"),  # weights blown up: the scores overflow
        "custom_op": ("head_norm", "mul"),  # x·x in FP16 inside the custom Function
    }
    for case, (module, op) in expected.items():
        found = clinic.run_case(case, fixed=False, steps=80).first_failure
        assert (found.phase, found.module, found.op) == ("forward", module, op), (case, found)
    with pytest.raises(ValueError):
        clinic.run_case("nope", fixed=False)


def test_relative_error_and_capture():
    exact = torch.tensor([3.0, 4.0])
    assert debug.relative_error(torch.tensor([3.0, 4.5]), exact) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same shape"):
        debug.relative_error(torch.zeros(3), exact)
    with pytest.raises(ValueError, match="all zeros"):
        debug.relative_error(exact, torch.zeros(2))
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = torch.randn(2, 4)
    with debug.capture(model, ["0", "1"], what="both") as seen:
        y = model(x)
    assert torch.equal(seen["0"][0], x) and torch.equal(seen["1"][1], y)
    assert not model[0]._forward_hooks  # removed on exit
    with pytest.raises(ValueError, match="no module"):
        with debug.capture(model, "nope"):
            pass


def _first_inf(model, x, context, scale):
    def step():
        with context():
            out = model(x)
        (out.float().sum() * scale).backward()  # the loss and its scale outside autocast, as in a training step
    found = debug.trace_nonfinite(model, step)
    model.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_the_tracer_names_the_op_that_overflowed_under_the_emulation_as_under_real_autocast(phase):
    """Real FP16 autocast makes the inf in the FP16 op itself; the emulation computes that op in FP32 and its rounding
    (``_to_copy``) makes the inf. The tracer reports the op whose result did not fit in both cases, not the cast."""
    from mixprec.emulate import EmulatedAutocast

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(64, 8).clamp(-3, 3)
    if phase == "forward":  # inputs and weights that fit FP16, products whose sums do not
        x = x * 2e4
        with torch.no_grad():
            model[0].weight.mul_(10)
    real = lambda: torch.amp.autocast("cpu", dtype=torch.float16)  # noqa: E731
    emulated = lambda: EmulatedAutocast(torch.float16, "cpu")  # noqa: E731
    scale = next(2.0**k for k in range(0, 40) if _first_inf(model, x, real, 2.0**k) is not None)
    found_real, found_emulated = _first_inf(model, x, real, scale), _first_inf(model, x, emulated, scale)
    same = lambda f: (f.phase, f.module, f.op, f.backward_node, f.shape, f.dtype, f.kind)  # noqa: E731
    assert same(found_real) == same(found_emulated) and found_real.phase == phase
    assert found_real.rounded_by is None and found_emulated.rounded_by == "_to_copy"
    assert found_emulated.op not in ("_to_copy", "copy_") and found_emulated.backward_node != "_RoundBackward"


class _Stop(Exception):
    pass


@pytest.mark.parametrize("case", list(clinic.CASES))
def test_the_fifteen_line_finder_stops_at_the_tracers_first_op(case, monkeypatch, tmp_path):
    """The chapter shows ``FindFirstNonFinite``; on every clinic case it stops at the op ``trace_nonfinite`` names."""
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))  # the run must train here (a cached run would not call the tracer)
    start = {"naive_softmax": 60}.get(case, 0)  # its first inf comes at step 64: skip the tracing before (cost only)
    seen = {"calls": 0}

    def both(model, step):
        seen["calls"] += 1
        if seen["calls"] <= start:
            return None
        found = debug.trace_nonfinite(model, step)
        model.zero_grad(set_to_none=True)
        if found is None:
            return None
        with pytest.raises(clinic.NonFiniteOp) as raised, clinic.FindFirstNonFinite():
            step()
        seen["pair"] = (found, raised.value)
        raise _Stop

    monkeypatch.setattr(clinic, "trace_nonfinite", both)
    with pytest.raises(_Stop):
        clinic.run_case(case, fixed=False, steps=start + 20)
    found, raised = seen["pair"]
    assert raised.op == found.op, f"{case}: the minimal finder stops at {raised.op}, the tracer names {found.op}"
    assert raised.phase.startswith("前向") == (found.phase == "forward")


def test_run_case_is_cached_and_read_back_whole(monkeypatch, tmp_path):
    """A clinic run is cached like a compare run: read back equal (its NonFinite too); the reader's norm_fn is never cached."""
    monkeypatch.setenv("MIXPREC_CACHE", str(tmp_path))
    first = clinic.run_case("layernorm_eps", fixed=False, steps=3)
    assert first.first_failure is not None
    trained = []
    real = clinic._train_case
    monkeypatch.setattr(clinic, "_train_case", lambda **kw: trained.append(kw) or real(**kw))
    again = clinic.run_case("layernorm_eps", fixed=False, steps=3)
    assert not trained, "a cached run was trained again"
    assert json.dumps(again.as_dict()) == json.dumps(first.as_dict())
    assert isinstance(again.first_failure, debug.NonFinite) and again.first_failure == first.first_failure
    clinic.run_case("layernorm_eps", fixed=False, steps=4)
    assert len(trained) == 1, "another setting is another run"
    runs = clinic.run_cases({"a": dict(case="layernorm_eps", fixed=False), "b": dict(case="custom_op", fixed=False)}, steps=3)
    assert [r.case for r in runs.values()] == ["layernorm_eps", "custom_op"] and len(trained) == 2
    for _ in range(2):
        clinic.run_case("mystery", fixed=True, steps=2, norm_fn=clinic.layer_norm_one_pass)
    assert len(trained) == 4, "a run with the reader's norm_fn is trained every time"
