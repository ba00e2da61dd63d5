"""The emulated autocast against PyTorch's own autocast: op lists, held dtypes, values, overflow, and the step."""

import math

import pytest
import torch
from mixprec import story
from mixprec.amp import get_policy
from mixprec.emulate import OP_LISTS, EmulatedAutocast, RoundAllOps, held_in
from mixprec.scale_experiments import first_overflowing_scale
from mixprec.scaling import NoLossScaler, StaticLossScaler
from mixprec.step import train_step
from mixprec.story.train import lm_loss

autocast_test_lists = pytest.importorskip("torch.testing._internal.autocast_test_lists", reason="needs expecttest")


def _run_listed(entries, namespace, op_lists):
    """Run each (op, args) of a PyTorch autocast test list under the emulation; yield (op, output)."""
    for entry in entries:
        op, args = entry[0], entry[1]
        fn = getattr(namespace, op, None) if namespace is not torch.Tensor else getattr(torch.Tensor, op)
        if fn is None:
            continue
        try:
            fn(*args)  # ops that cannot run on this CPU in FP32 at all (cudnn_*) are not the emulation's business
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        with EmulatedAutocast(torch.float16, op_lists):
            out = fn(*args)
        yield op, out[0] if isinstance(out, tuple) else out


def test_cuda_op_lists_hold_against_pytorchs_autocast_tests():
    lists = autocast_test_lists.AutocastTestLists(torch.device("cpu"))
    lower = [e[0] for e in lists.torch_fp16 + lists.nn_fp16 + lists.linalg_fp16 + lists.methods_fp16]
    fp32 = [e[0] for e in lists.torch_fp32 + lists.nn_fp32 + lists.methods_fp32]
    assert set(lower) <= OP_LISTS["cuda"]["lower"], set(lower) - OP_LISTS["cuda"]["lower"]
    assert set(fp32) <= OP_LISTS["cuda"]["fp32"], set(fp32) - OP_LISTS["cuda"]["fp32"]
    ran = 0
    for namespace, entries in ((torch, lists.torch_fp16), (torch._C._nn, lists.nn_fp16), (torch._C._linalg, lists.linalg_fp16),
                               (torch.Tensor, lists.methods_fp16)):
        for op, out in _run_listed(entries, namespace, "cuda"):
            assert held_in(out) == torch.float16, op
            assert torch.equal(out, out.half().float()), op  # the values are FP16 values
            ran += 1
    for namespace, entries in ((torch, lists.torch_fp32), (torch._C._nn, lists.nn_fp32), (torch.Tensor, lists.methods_fp32)):
        for op, out in _run_listed(entries, namespace, "cuda"):
            assert held_in(out) == torch.float32, op
            ran += 1
    assert ran > 50


def test_cpu_op_lists_hold_against_pytorchs_cpu_autocast_tests():
    lists = autocast_test_lists.AutocastCPUTestLists(torch.device("cpu"))
    assert {e[0] for e in lists.torch_16 + lists.nn_16} <= OP_LISTS["cpu"]["lower"]
    assert {e[0] for e in lists.torch_fp32 + lists.nn_fp32} <= OP_LISTS["cpu"]["fp32"]


@pytest.fixture(scope="module")
def tiny_batch():
    stories = story.load_stories("offline", n=800, seed=0)
    tokenizer = story.train_tokenizer(stories.train)
    data = story.encode(stories, tokenizer)
    x, y = data.batch(8, 64, torch.Generator().manual_seed(0))
    return tokenizer, x, y


def _tiny(tokenizer):
    return story.build_model("tiny", len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id)


def _forward_backward(model, x, y, context):
    model.zero_grad(set_to_none=True)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o[0] if isinstance(o, tuple) else o))
             for n, m in model.named_modules() if n.count(".") >= 3]
    with context:
        out = model(x)
    for h in hooks:
        h.remove()
    loss = lm_loss(out, y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, outputs


def test_emulation_with_cpu_lists_matches_cpu_autocast(tiny_batch):
    """EmulatedAutocast(op_lists="cpu") against torch.amp.autocast("cpu", dtype=torch.float16) on the tiny storyteller.

    Exact: every module's output is held in the same dtype. Tolerances, and why they are not zero:
    CPU's FP16 kernels round inside fused ops (the attention kernel rounds its probabilities blockwise)
    and accumulate in their own order, while the emulation rounds only each op's result; so values
    differ by a few FP16 units in the last place (2**-11 ≈ 4.9e-4 relative) that accumulate through
    the network: the loss agrees to 1e-5 relative, each gradient tensor to 5e-3 relative (norm).
    """
    tokenizer, x, y = tiny_batch
    model = _tiny(tokenizer)
    real_loss, real_grads, real_out = _forward_backward(model, x, y, torch.amp.autocast("cpu", dtype=torch.float16))
    emu_loss, emu_grads, emu_out = _forward_backward(model, x, y, EmulatedAutocast(torch.float16, "cpu"))
    assert real_out.keys() == emu_out.keys() and len(real_out) > 10
    for name in real_out:
        assert held_in(emu_out[name]) == real_out[name].dtype, name
    first_linear = emu_out["transformer.h.0.attn.c_attn"]  # its inputs are exact in both: only accumulation order differs
    assert (first_linear != real_out["transformer.h.0.attn.c_attn"].float()).float().mean() < 0.01
    assert abs(emu_loss - real_loss) / real_loss < 1e-5
    for name, g in real_grads.items():
        assert ((emu_grads[name] - g).norm() / g.norm()) < 5e-3, name
        if ".c_" in name and name.endswith("weight"):  # a weight only a lowered matmul uses: its gradient is an FP16 matmul's result
            assert torch.equal(emu_grads[name], emu_grads[name].half().float()), name


def test_emulation_overflows_at_the_same_scale_as_real_autocast(tiny_batch):
    tokenizer, x, y = tiny_batch
    model = _tiny(tokenizer)
    exponents = range(15, 30)
    real = first_overflowing_scale(model, x, y, lm_loss, "fp16-amp:native", exponents)
    emulated_cpu = first_overflowing_scale(model, x, y, lm_loss, "fp16-amp:cpu-lists", exponents)
    emulated_cuda = first_overflowing_scale(model, x, y, lm_loss, get_policy("fp16-amp"), exponents)  # CUDA's lists on a CPU
    round_all = first_overflowing_scale(model, x, y, lm_loss, "round-all:fp16", exponents)
    assert real is not None and real == emulated_cpu
    assert emulated_cuda is not None and emulated_cuda > 16  # the GradScaler default 2**16 works
    assert round_all == 16  # pure FP16: the backward seed d(S·L)/dL = S = 65536 is already inf


def test_static_2_16_trains_under_emulated_fp16_amp(tiny_batch):
    tokenizer, x, y = tiny_batch
    model = _tiny(tokenizer)
    policy = get_policy("fp16-amp")
    assert policy.autocast_mode(torch.device("cpu")) == "emulate-cuda"
    setup = policy.setup(model, lr=1e-2, loss_fn=lm_loss, scaler=StaticLossScaler(2.0**16), device="cpu")
    results = [train_step(setup, x, y) for _ in range(12)]
    assert not any(r.skipped for r in results) and all(r.loss_scale == 2.0**16 for r in results)
    assert results[-1].loss < 0.8 * results[0].loss


def test_backward_never_runs_under_autocast(tiny_batch):
    tokenizer, x, y = tiny_batch
    seen = []
    for name in ("bf16-amp:native", "fp16-amp", "fp16-amp:cpu-lists"):
        model = _tiny(tokenizer)
        policy = get_policy(name)
        setup = policy.setup(model, lr=1e-3, loss_fn=lm_loss, device="cpu")
        for p in model.parameters():
            p.register_hook(lambda g: seen.append((torch.is_autocast_enabled("cpu"), torch._C._len_torch_function_stack())) or g)
        train_step(setup, x, y)
    assert seen and all(state == (False, 0) for state in seen)


def test_a_disabled_scaler_is_gradscaler_enabled_false(tiny_batch):
    tokenizer, x, y = tiny_batch
    losses = []
    for scaler in (NoLossScaler(), torch.amp.GradScaler("cpu", enabled=False)):
        model = _tiny(tokenizer)
        setup = get_policy("fp32").setup(model, lr=1e-2, loss_fn=lm_loss, scaler=scaler, device="cpu")
        results = [train_step(setup, x, y) for _ in range(3)]
        assert all(r.loss_scale is None and not r.skipped for r in results)
        losses.append([r.loss for r in results])
    assert losses[0] == losses[1]


def test_explicit_casts_and_promotion_follow_autocast():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with EmulatedAutocast(torch.bfloat16) as mode:
        low = a @ b
        up = low.float()
        mixed = low + torch.randn(4, 3)  # BF16 + FP32 → FP32 (type promotion)
        scaled = low * 3.0  # a Python scalar does not promote
        zero_dim = low * torch.tensor(3.0)  # nor does a 0-dim tensor
        soft = torch.softmax(low, -1)  # on CUDA's FP32 list
        view = low.t()
    assert held_in(low) == torch.bfloat16 and held_in(up) == torch.float32 and held_in(low) == torch.bfloat16
    assert held_in(mixed) == torch.float32 and held_in(soft) == torch.float32
    assert held_in(scaled) == held_in(zero_dim) == held_in(view) == torch.bfloat16
    assert torch.equal(scaled, (low * 3.0).bfloat16().float())
    assert mode.counts["lowered"] == 1 and mode.counts["fp32"] == 1
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        EmulatedAutocast(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="op_lists"):
        EmulatedAutocast(torch.float16, "tpu")


def test_round_all_is_not_amp():
    """Whole-network rounding rounds the loss scale's seed too: S = 2**16 is inf in FP16 before any model is involved."""
    w = torch.ones(3, requires_grad=True)
    with RoundAllOps("fp16"):
        (w.sum() * 2.0**16).backward()
    assert math.isinf(w.grad[0])


def test_unlisted_ops_take_the_dtype_real_cpu_autocast_gives():
    """Ops on neither list: elementwise ops follow type promotion, normalisations follow their input."""
    import torch.nn.functional as F

    x, w, b, W = torch.randn(4, 8), torch.randn(8), torch.randn(8), torch.randn(8, 8)

    def run(h):
        return {"layer_norm": F.layer_norm(h, (8,), w, b), "group_norm": F.group_norm(h.view(4, 8, 1), 2, w, b),
                "gelu": F.gelu(h), "mul_fp32": h * w, "softmax": torch.softmax(h, -1)}

    with torch.amp.autocast("cpu", dtype=torch.bfloat16):
        real = run(x @ W)
    with EmulatedAutocast(torch.bfloat16, "cpu"):
        emulated = run(x @ W)
    assert {k: held_in(v) for k, v in emulated.items()} == {k: v.dtype for k, v in real.items()}


def test_policies_validate_their_autocast_settings():
    from mixprec.amp import Policy

    with pytest.raises(ValueError, match="autocast must be"):
        Policy("x", autocast_dtype=torch.float16, autocast="tpu")
    with pytest.raises(ValueError, match="autocast_dtype"):
        Policy("x", autocast_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="round-all"):
        get_policy("emulate:fp16")  # the old name of whole-network rounding says where it went
    assert get_policy("bf16-amp").autocast_mode(torch.device("cuda")) == "native"
    assert get_policy("bf16-amp:cpu-lists").autocast_mode(torch.device("cpu")) == "emulate-cpu"
