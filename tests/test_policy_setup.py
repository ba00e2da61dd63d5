"""One training setup, one vocabulary, and a policy that means the same numerics on every device (issue 19)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import warnings

import pytest
import torch
from mixprec import fp8
from mixprec.amp import FP8_POLICIES, INFERENCE_POLICIES, POLICY_NAMES, TrainingSetup, get_policy
from mixprec.emulate import EmulatedAutocast, held_in
from mixprec.scaling import NoLossScaler
from mixprec.step import forward_backward, train_step

# --- one training setup -----------------------------------------------------------------------


def test_train_step_takes_the_setup_and_the_batch():
    assert list(inspect.signature(train_step).parameters) == ["setup", "inputs", "targets", "after_backward"]


@pytest.mark.parametrize("name, master, scaler, param_dtype", [
    ("fp32", False, NoLossScaler, torch.float32),
    ("fp16-amp", False, torch.amp.GradScaler, torch.float32),
    ("bf16-master", True, NoLossScaler, torch.bfloat16),
    ("round-all:fp16", True, NoLossScaler, torch.float32),
])
def test_the_policy_builds_everything_a_step_needs(name, master, scaler, param_dtype):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    setup = get_policy(name).setup(model, lr=1e-2, loss_fn=lambda out, y: (out.float() - y).pow(2).mean(), schedule=lambda u: 0.5,
                                   device="cpu")
    assert isinstance(setup, TrainingSetup) and setup.model is model and setup.forward is model
    assert (setup.master is not None) == master and isinstance(setup.scaler, scaler)
    assert {p.dtype for p in model.parameters()} == {param_dtype}
    assert setup.optimizer.param_groups[0]["lr"] == 0.5e-2  # the schedule's multiplier, applied
    trained = setup.master.master if master else list(model.parameters())
    assert setup.optimizer.param_groups[0]["params"] == trained  # the optimizer owns the masters where there are any
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    losses = [train_step(setup, x.to(param_dtype), y).loss for _ in range(20)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_forward_backward_runs_on_the_models_device_and_moves_the_batch():
    model = torch.nn.Linear(3, 1, device="meta")  # a device the CPU batch is not on: it must be moved there
    loss = forward_backward(model, torch.randn(2, 3), None, lambda out, _: out.sum())
    assert loss.device.type == "meta" and model.weight.grad is not None


# --- one vocabulary ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp8-weight", "bf16-amp", "round-all:e4m3fn"])
def test_inference_precisions_are_policies(name):
    from mixprec.story import for_inference

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = copy.deepcopy(model.state_dict())
    prepared = for_inference(model, name)
    assert prepared.policy == get_policy(name) and prepared.precision == name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    with prepared.context():
        out = prepared.model(torch.randn(2, 4).to(next(prepared.model.parameters()).dtype))
    assert out.shape == (2, 4)


def test_one_parser_one_error_message():
    from mixprec.story import for_inference

    with pytest.raises(ValueError, match="unknown precision 'int4'.*fp8-weight.*round-all:<format>") as inference:
        for_inference(torch.nn.Linear(1, 1), "int4")
    with pytest.raises(ValueError, match="unknown precision 'int4'") as training:
        get_policy("int4")
    assert str(inference.value) == str(training.value)


@pytest.mark.parametrize("name", INFERENCE_POLICIES)
def test_inference_only_policies_refuse_to_train(name):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=f"'{name}' is an inference policy.*training policies: fp32"):
        get_policy(name).setup(model, lr=1e-3)
    assert next(model.parameters()).dtype == torch.float32  # refused before any work


def test_one_parameter_name_across_the_library():
    import importlib

    from mixprec import amp, exercises, scale_experiments, step

    generate, inference, train = (importlib.import_module(f"mixprec.story.{m}") for m in ("generate", "inference", "train"))

    functions = [amp.memory_breakdown, amp.saved_activation_bytes, exercises.check_memory, scale_experiments.first_overflowing_scale,
                 step.forward_backward, train.train, train.evaluate, generate.for_inference, generate.generate, inference.time_generation]
    for fn in functions:
        names = inspect.signature(fn).parameters
        assert "precision" in names and "policy" not in names, fn.__qualname__


def test_clinic_cases_are_policies():
    from mixprec.clinic import CASES, MYSTERY

    for case in (*CASES.values(), MYSTERY):
        assert get_policy(case.precision).name == case.precision


@pytest.mark.parametrize("name, peak", [("fp32", "fp32"), ("tf32", "tf32"), ("fp16-amp", "fp16"), ("bf16-amp", "bf16"),
                                        ("bf16-pure", "bf16"), ("fp16-master", "fp16"), ("fp8:mxfp8", "fp8"), ("round-all:fp16", "fp32")])
def test_the_mfu_peak_comes_from_the_policy(name, peak):
    assert get_policy(name).peak_dtype() == peak


# --- the same numerics on every device --------------------------------------------------------


@pytest.mark.parametrize("name", ("fp8", *FP8_POLICIES))
def test_fp8_is_bf16_autocast_plus_fp8_linears_on_every_device(name):
    policy = get_policy(name)
    assert policy.autocast_dtype == torch.bfloat16 and policy.fp8
    assert policy.autocast_mode("cpu") == "emulate-cuda" and policy.autocast_mode("cuda") == "native"  # only the kernels differ
    assert policy.describe()["compute"] == f"FP8 linears ({policy.fp8}) + BF16 autocast"


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_emulated_float8_linear_is_the_same_under_real_and_emulated_autocast(recipe):
    """Under autocast the layer does what torchao's does: input and output in the autocast dtype, the
    bias cast to it; real CPU autocast and the emulation give bit-equal outputs and gradients."""
    torch.manual_seed(0)
    layer = fp8.Float8Linear.from_float(torch.nn.Linear(256, 128), fp8.Float8LinearConfig.from_recipe_name(recipe))
    x, grad = torch.randn(128, 256), torch.randn(128, 128) * 1e-3
    results = []
    for context in (torch.amp.autocast("cpu", dtype=torch.bfloat16), EmulatedAutocast(torch.bfloat16)):
        ours = copy.deepcopy(layer)
        inp = x.clone().requires_grad_(True)
        with context:
            out = ours(inp)
        assert held_in(out) == torch.bfloat16
        out.backward(grad.to(out.dtype))
        results.append((out.float(), inp.grad, ours.weight.grad, ours.bias.grad))
    for what, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias"), *results):
        assert torch.equal(a, b), f"{recipe}: {what}"
    plain = layer(x.bfloat16().float())  # outside autocast: FP32 out, the same FP8 arithmetic
    assert plain.dtype == torch.float32 and not torch.equal(plain, results[0][0])


@pytest.mark.parametrize("recipe", fp8.TORCHAO_RECIPES)
def test_emulated_float8_linear_under_emulated_autocast_equals_torchao(recipe):
    """torchao's Float8Linear under autocast sees a BF16 input and returns BF16; ours under the emulated
    autocast gives the same output and gradients, bit for bit (the weight gradient of
    ``rowwise_with_gw_hp``, a BF16 matmul that CPU kernels round differently from FP32-accumulating GPUs,
    within one BF16 unit in the last place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = pytest.importorskip("torchao.float8")
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 128)
    x, grad = torch.randn(64, 256), torch.randn(64, 128) * 1e-3
    theirs = torch.nn.Sequential(copy.deepcopy(layer))
    ao.convert_to_float8_training(theirs, config=dataclasses.replace(ao.Float8LinearConfig.from_recipe_name(recipe), emulate=True))
    ours = torch.nn.Sequential(copy.deepcopy(layer))
    fp8.convert_to_float8_training(ours, config=fp8.Float8LinearConfig.from_recipe_name(recipe))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a = theirs(xa.to(torch.bfloat16))  # what autocast hands torchao's layer (it casts its input to the autocast dtype)
    a.backward(grad.to(a.dtype))
    with EmulatedAutocast(torch.bfloat16):
        b = ours(xb)
    b.backward(grad.to(b.dtype))
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, b) and torch.equal(xa.grad, xb.grad) and torch.equal(theirs[0].bias.grad, ours[0].bias.grad)
    gw_a, gw_b = theirs[0].weight.grad, ours[0].weight.grad
    if recipe == "rowwise_with_gw_hp":
        ulp = torch.finfo(torch.bfloat16).eps * gw_a.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert bool(((gw_a - gw_b).abs() <= ulp).all())
    else:
        assert torch.equal(gw_a, gw_b)


@pytest.fixture(scope="module")
def story_data():
    from mixprec.story import encode, load_stories, train_tokenizer

    stories = load_stories("offline", n=2000)
    tokenizer = train_tokenizer(stories.train)
    return tokenizer, encode(stories, tokenizer)


@pytest.mark.parametrize("name", FP8_POLICIES)
def test_the_cpu_fp8_policy_runs_under_emulated_bf16_autocast(name, story_data):
    """On a CPU, fp8:<recipe> is the emulated BF16 autocast around the emulated FP8 linears: the linears
    see and return BF16 values, and the tiny storyteller trains (finite, falling loss)."""
    from mixprec.story import build_model, train

    tokenizer, data = story_data
    model = build_model("tiny", len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id)
    history = train(model, data, precision=name, steps=8, batch_size=4, block_size=32, device="cpu", progress=False)
    assert all(math.isfinite(v) for v in history.loss) and history.loss[-1] < history.loss[0]
    assert any("autocast bfloat16: emulated with cuda op lists" in note for note in history.notes), history.notes
    assert any(note.startswith("fp8 linears: emulated") for note in history.notes)
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((held_in(args[0]), held_in(out))))
             for m in model.modules() if isinstance(m, fp8.Float8Linear)]
    x, _ = data.batch(4, 32, torch.Generator().manual_seed(0))
    policy = get_policy(name)
    with torch.no_grad(), policy.compute("cpu"):
        model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 4 * len(model.transformer.h) and all(out == torch.bfloat16 for _, out in seen)


def test_policy_names_are_one_list():
    assert len(set(POLICY_NAMES)) == len(POLICY_NAMES)
    for name in POLICY_NAMES:
        if "<" not in name:
            assert get_policy(name).name == name
