"""The emulated autocast against PyTorch's own autocast: op lists, held dtypes, values, overflow, and the step."""

import math

import pytest
import torch
from mixprec import story
from mixprec.amp import get_policy
from mixprec.emulate import NOT_IN_PYTORCH_TEST_LISTS, OP_LISTS, EmulatedAutocast, RoundAllOps, held_in
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
    # and the reverse: what the emulation lowers or keeps in FP32 beyond PyTorch's test lists is documented, with its reason
    beyond = (OP_LISTS["cuda"]["lower"] - set(lower)) | (OP_LISTS["cuda"]["fp32"] - set(fp32))
    assert beyond == set(NOT_IN_PYTORCH_TEST_LISTS), beyond ^ set(NOT_IN_PYTORCH_TEST_LISTS)
    assert not OP_LISTS["cuda"]["lower"] & OP_LISTS["cuda"]["fp32"]
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


# --- models no one here wrote: Hugging Face models other than GPT-2, torch's own layers -------------------------------

def _hf(kind):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    if kind == "llama":  # RMSNorm, rotary embeddings (an autocast(enabled=False) block), SwiGLU, grouped-query SDPA
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config), {"input_ids": ids}
    if kind == "bert":  # LayerNorm, GELU (erf), post-norm, bidirectional attention
        config = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return transformers.BertForMaskedLM(config), {"input_ids": ids}
    # encoder-decoder, relative position bias, in-place adds into low-precision scores, ``type_as``; T5 v1.1's gated GELU: with
    # the original ReLU, one of the 2048 ReLUs of the last decoder layer falls on the other side of zero in the emulation (the
    # inputs differ by one rounding), and that one kink moves the gradient more than all of autocast's rounding does
    config = transformers.T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu")
    return transformers.T5ForConditionalGeneration(config), {"input_ids": ids, "decoder_input_ids": ids[:, :8]}


def _nn(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    if kind == "multihead_attention":
        return torch.nn.MultiheadAttention(16, 2, batch_first=True), {"query": x, "key": x, "value": x}
    if kind == "transformer_encoder_layer":
        return torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), {"src": x}
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.GELU(), torch.nn.Conv1d(8, 4, 3, padding=1)
                                if False else torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model(images)  # materialise the lazy layer
    return model, {"input": images}


MODELS = {"llama": lambda: _hf("llama"), "bert": lambda: _hf("bert"), "t5": lambda: _hf("t5"),
          "multihead_attention": lambda: _nn("multihead_attention"), "transformer_encoder_layer": lambda: _nn("transformer_encoder_layer"),
          "conv_batchnorm_linear": lambda: _nn("conv")}


def autocast_distance(build, dtype: torch.dtype, train: bool) -> dict:
    """Run one model three ways, FP32, CPU's autocast and the emulation with CPU's lists, in training (forward and backward of
    a squared-output loss) or in inference (``eval()`` under ``no_grad``). Returns the dtype mismatches of every module's output,
    the forward distances in units of the format's unit roundoff u (2**-11 for FP16, 2**-8 for BF16), and the gradient distances."""
    import contextlib
    import copy
    import warnings

    model, inputs = build()
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8

    def run(context):
        m = copy.deepcopy(model).train(train)
        outputs = {}
        hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: outputs.__setitem__(n, o[0] if isinstance(o, tuple) else o))
                 for n, mod in m.named_modules() if n]  # a hook on the root would turn torch's fused path off
        with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(train), context:
            warnings.simplefilter("always")
            out = m(**inputs)
        out = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
        for h in hooks:
            h.remove()
        if train:
            out.float().square().mean().backward()
        outputs[""] = out
        out = out.detach()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        messages = [str(w.message) for w in caught if "EmulatedAutocast" in str(w.message)]
        return out, outputs, grads, messages

    fp32, _, g32, _ = run(contextlib.nullcontext())
    real, real_outs, g_real, _ = run(torch.amp.autocast("cpu", dtype=dtype))
    emu, emu_outs, g_emu, warned = run(EmulatedAutocast(dtype, "cpu"))
    relative = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731

    def grad_distance(a, b):
        return float(sum((a[k] - b[k]).square().sum() for k in b).sqrt() / sum(b[k].square().sum() for k in b).sqrt()) if b else 0.0

    mismatches = [n for n, t in real_outs.items() if isinstance(t, torch.Tensor) and held_in(emu_outs[n]) != t.dtype]
    return {"modules": len(real_outs), "dtype_mismatches": mismatches, "warned": warned,
            "forward_emulation_vs_real_u": relative(emu, real) / unit, "forward_real_vs_fp32_u": relative(real, fp32) / unit,
            "forward_max_abs_u": float((emu.float() - real.float()).abs().max() / (real.float().abs().max() * unit)),
            "grad_emulation_vs_real": grad_distance(g_emu, g_real), "grad_real_vs_fp32": grad_distance(g_real, g32)}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-no_grad"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_emulation_with_cpu_lists_equals_cpu_autocast_on_models_no_one_here_wrote(name, dtype, train):
    """Held dtypes equal module by module; the output within two units of rounding of the real one (norm-wise); gradients
    no further from real autocast than real autocast is from FP32. One documented exception, warned by name: in eval mode
    CPU autocast lets ``nn.TransformerEncoderLayer`` take torch's fused path (CUDA's autocast turns it off), whose result is
    held in low precision; the emulation, like any ``__torch_function__`` mode, makes torch take the unfused path."""
    d = autocast_distance(MODELS[name], dtype, train)
    fused_path = name == "transformer_encoder_layer" and not train
    assert d["dtype_mismatches"] == [] and d["modules"] >= 1 and (d["warned"] == []) != fused_path
    if fused_path:  # torch takes its fused path only with no hook on the layer, which the module-wise comparison needs
        model, inputs = MODELS[name]()
        with torch.no_grad(), torch.amp.autocast("cpu", dtype=dtype):
            real = model.eval()(**inputs)
        with torch.no_grad(), pytest.warns(UserWarning, match="'TransformerEncoderLayer'"), EmulatedAutocast(dtype, "cpu"):
            emulated = model(**inputs)
        assert real.dtype == dtype and held_in(emulated) == torch.float32
    assert d["forward_emulation_vs_real_u"] <= 2.0
    assert d["grad_emulation_vs_real"] <= d["grad_real_vs_fp32"]
    if train:
        assert d["grad_real_vs_fp32"] > 0


@pytest.mark.parametrize("layer", ["LSTM", "GRU"])
def test_recurrent_layers_are_refused_by_name(layer):
    """A recurrent layer rounds its hidden state at every time step in low precision; rounding its result cannot reproduce
    that, so the emulation runs it in FP32, reports FP32 and warns with the op's name, never reporting FP16 for FP32 values."""
    rnn = getattr(torch.nn, layer)(8, 16, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), pytest.warns(UserWarning, match=f"cannot emulate '{layer.lower()}'"), EmulatedAutocast(torch.bfloat16, "cpu") as mode:
        out, _ = rnn(x)
    assert held_in(out) == torch.float32 and mode.opaque == {layer.lower(): layer.lower()}
    with torch.no_grad():
        assert torch.equal(out, rnn(x)[0])  # it really is the FP32 result


def test_a_cpp_composite_with_a_listed_op_inside_is_named():
    """``einsum`` is on CUDA's list; on CPU's, autocast lowers the ``bmm`` inside it, which a Python-level mode cannot reach."""
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with EmulatedAutocast(torch.float16, "cuda"):
        cuda_rule = torch.einsum("ij,jk->ik", a, b)
    assert held_in(cuda_rule) == torch.float16
    with pytest.warns(UserWarning, match="cannot emulate 'einsum'"), EmulatedAutocast(torch.float16, "cpu") as mode:
        cpu_rule = torch.einsum("ij,jk->ik", a, b)
    assert held_in(cpu_rule) == torch.float32 and "einsum" in mode.opaque


# --- regions, in-place ops, reciprocal ---------------------------------------------------------------------------------

def test_nested_regions_innermost_wins_without_double_rounding():
    """Reliability S4 (nested regions): the innermost region wins, as in torch.autocast."""
    a = torch.full((1, 2), 1000.0)
    b = torch.full((2, 1), 1000.0 + 4)  # a @ b = 2 008 000: finite in BF16, inf in FP16
    with EmulatedAutocast(torch.float16):
        with EmulatedAutocast(torch.bfloat16):
            inner = a @ b
        outer = a @ b
    assert held_in(inner) == torch.bfloat16 and torch.isfinite(inner).all() and torch.equal(inner, (a @ b).bfloat16().float())
    assert held_in(outer) == torch.float16 and torch.isinf(outer).all()
    x = torch.full((1, 1), 1.0 + 2.0**-10)  # on FP16's grid, between two BF16 values
    with EmulatedAutocast(torch.bfloat16), EmulatedAutocast(torch.float16):
        y = x @ torch.ones(1, 1)
    assert held_in(y) == torch.float16 and y.item() == 1.0 + 2.0**-10
    with torch.amp.autocast("cpu", dtype=torch.bfloat16), EmulatedAutocast(torch.float16):  # real autocast outside: switched off
        z = x @ torch.ones(1, 1)
    assert z.dtype == torch.float32 and held_in(z) == torch.float16
    with EmulatedAutocast(torch.float16), torch.amp.autocast("cpu", dtype=torch.bfloat16):  # real autocast inside: it decides
        w = x @ torch.ones(1, 1)
    assert w.dtype == torch.bfloat16 and held_in(w) == torch.bfloat16


def test_autocast_disabled_inside_stops_the_rounding():
    """Reliability S4: Hugging Face models force FP32 with ``torch.autocast(device_type, enabled=False)``: inside it, nothing is lowered."""
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with EmulatedAutocast(torch.float16) as mode:
        low = a @ b
        with torch.autocast("cpu", enabled=False):
            exact = a @ b
            soft = torch.softmax(low, -1)
            promoted = low * 2.0  # type promotion still applies: a low tensor times a scalar stays low, as with a real FP16 tensor
        again = a @ b
    assert held_in(exact) == torch.float32 and torch.equal(exact, a @ b)
    assert held_in(low) == held_in(again) == torch.float16 and mode.counts["lowered"] == 2 and mode.counts["fp32"] == 0
    assert held_in(soft) == torch.float16 and held_in(promoted) == torch.float16
    with torch.amp.autocast("cpu", dtype=torch.float16):
        real = torch.softmax((a @ b), -1)
        with torch.autocast("cpu", enabled=False):
            real_inside = torch.softmax(a.half() @ b.half(), -1)
    assert real.dtype == real_inside.dtype == torch.float16


def test_in_place_ops_keep_a_low_tensor_on_its_grid():
    """Reliability S4 (in-place ops): a low tensor stays on its format's grid."""
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    fine = torch.randn(4, 3) * (1 + 2.0**-15)  # off FP16's grid
    with EmulatedAutocast(torch.float16):
        h = a @ b
        h.add_(fine)
        g = a @ b
        g += fine
        k = a @ b
        k[0] = fine[0]
        c = a @ b
        c.copy_(fine)
        fp32 = torch.zeros(4, 3)
        fp32.add_(h)  # written into an FP32 tensor: stays FP32
    for t in (h, g, k, c):
        assert held_in(t) == torch.float16 and torch.equal(t, t.half().float())
    assert held_in(fp32) == torch.float32
    with torch.amp.autocast("cpu", dtype=torch.float16):
        real = a @ b
        real.add_(fine)
    assert torch.equal(h, real.float())


@pytest.mark.parametrize("op_lists", ["cuda", "cpu"])
def test_reciprocal_division_follows_the_op_lists(op_lists):
    """``1.0 / h`` calls ``Tensor.__rtruediv__``, which dispatches to ``reciprocal``: CUDA's FP32 list has both (PyTorch's AMP op
    reference, "CUDA Ops that can autocast to float32"); CPU's list has neither, and real CPU autocast leaves it FP16."""
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with EmulatedAutocast(torch.float16, op_lists):
        h = a @ b
        divided, reciprocal = 1.0 / h, h.reciprocal()
    expected = torch.float32 if op_lists == "cuda" else torch.float16
    assert held_in(divided) == held_in(reciprocal) == expected
    assert {"__rtruediv__", "__rdiv__", "reciprocal"} <= OP_LISTS["cuda"]["fp32"]
    if op_lists == "cpu":
        with torch.amp.autocast("cpu", dtype=torch.float16):
            real_h = a @ b
            assert (1.0 / real_h).dtype == real_h.reciprocal().dtype == torch.float16
