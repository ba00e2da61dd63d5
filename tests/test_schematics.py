"""The book's schematics state what the code does: their numerics come from runs, and a test holds each to it."""

import pytest
import torch
import torch.nn.functional as F
from mixprec import amp_schematics as schematics

# --- chapter 3 (ch-amp): one mixed-precision step ---------------------------------------------------------------

SHORT = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}


def _plain_torch_amp_step(dtype: torch.dtype) -> dict:
    """One step written as the chapter's quick start writes it, with no mixprec code, dtypes read by hand."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    x, y = torch.randn(64, 16), torch.randint(0, 8, (64,))
    seen = {"master": net[2].weight.dtype}
    with torch.amp.autocast(device_type="cpu", dtype=dtype):
        h = net[0](x)
        h.register_hook(lambda g: seen.__setitem__("activation_grad", g.dtype))
        logits = net[2](net[1](h))
    seen.update(activation=h.dtype, logits=logits.dtype)
    loss = F.cross_entropy(logits.float(), y)
    scaled = scaler.scale(loss)
    seen.update(loss=loss.dtype, scaled_loss=scaled.dtype)
    scaled.backward()
    seen["grad"] = net[2].weight.grad.dtype
    scaler.unscale_(opt)
    seen["unscaled_grad"] = net[2].weight.grad.dtype
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    seen["clipped_grad"] = net[2].weight.grad.dtype
    scaler.step(opt)
    scaler.update()
    seen.update(updated=net[2].weight.dtype, optimizer_state=opt.state[net[2].weight]["exp_avg"].dtype)
    seen["working_weight"] = dtype  # what autocast casts a matmul's FP32 weight to (its documented rule)
    return {k: SHORT[v] for k, v in seen.items()}


@pytest.mark.parametrize("precision, dtype", [("fp16-amp:native", torch.float16), ("bf16-amp:native", torch.bfloat16)])
def test_step_schematic_draws_the_dtypes_of_a_real_step(precision, dtype):
    trace = schematics.trace_step(precision)
    fig = schematics.mixed_precision_step(trace)
    drawn = fig.mixprec_labels
    assert set(drawn) == set(schematics.STEP_STAGES) - {"input"}
    assert drawn == {k: v for k, v in _plain_torch_amp_step(dtype).items()}
    texts = [t.get_text() for t in fig.axes[0].texts]
    for stage, dtype_text in drawn.items():  # every box shows its dtype
        assert any(text.endswith("\n" + dtype_text) for text in texts), stage
    low = SHORT[dtype]
    assert drawn["activation"] == drawn["logits"] == drawn["activation_grad"] == low  # the low-precision part of the step
    assert drawn["master"] == drawn["grad"] == drawn["optimizer_state"] == drawn["updated"] == drawn["loss"] == "FP32"
    assert (trace["scale"] is not None) == (dtype == torch.float16)


def test_step_trace_of_master_weights_and_pure_bf16():
    master = schematics.trace_step("bf16-master")
    assert master["master"] == "float32" and master["grad"] == "bfloat16" and master["unscaled_grad"] == "float32"
    pure = schematics.trace_step("bf16-pure")
    assert pure["master"] == pure["updated"] == "bfloat16" and pure["optimizer_state"] == "float32"


def test_memory_schematic_numbers_are_the_librarys():
    from mixprec.amp import memory_breakdown

    fig = schematics.memory_by_tokens(n_layer=2, n_embd=128, shapes=((1, 64), (4, 64)))
    coefficients = {p: schematics.activation_coefficients(p) for p in ("fp32", "bf16-amp")}
    n = int(schematics.gpt2_parameters(2, 128))
    for (b, s, p), parts in fig.mixprec_values.items():
        assert {k: v for k, v in parts.items() if k != "activations"} == memory_breakdown(n, p)
        assert parts["activations"] == schematics.activation_bytes(coefficients[p], 2, 128, b * s)
    bars = [patch.get_width() for patch in fig.axes[0].patches]
    assert sum(bars) * 2**30 == pytest.approx(sum(sum(v.values()) for v in fig.mixprec_values.values()))


def test_activation_model_predicts_a_measured_gpt2():
    """The per-token coefficients, fitted on four small GPT-2s, predict a fifth, wider and deeper one within 0.5%."""
    from mixprec.amp import saved_activation_bytes
    from transformers import GPT2Config, GPT2LMHeadModel

    for precision in ("fp32", "bf16-amp", "bf16-pure"):
        c = schematics.activation_coefficients(precision)
        config = GPT2Config(vocab_size=96, n_positions=64, n_embd=192, n_layer=3, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(
            torch.bfloat16 if precision == "bf16-pure" else torch.float32)
        ids = torch.randint(0, 96, (4, 64))
        measured = (saved_activation_bytes(model, ids, precision) - saved_activation_bytes(model, ids[:2], precision)) / 128
        assert schematics.activation_bytes(c, 3, 192, 1, vocab_size=96) == pytest.approx(measured, rel=5e-3), precision
