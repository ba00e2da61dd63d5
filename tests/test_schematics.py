"""The book's schematics state what the library computes: each test fails if a drawing and the code disagree."""

import pytest
import torch
import torch.nn.functional as F
from mixprec import amp_schematics, fp8, schematics

# --- chapter 5 (FP8) ------------------------------------------------------------------------------

def _geometric_groups(kind: str, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """The groups each granularity should make, from its geometry alone (reading-order ids)."""
    i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    if kind == "tensorwise":
        key = torch.zeros(rows, cols, dtype=torch.long)
    elif kind == "axiswise":
        key = i
    else:
        key = (i // block[0]) * (cols // block[1]) + j // block[1]
    _, ids = torch.unique(key.flatten(), return_inverse=True)
    return ids.reshape(rows, cols)


def test_granularity_grid_draws_the_groups_the_scales_make():
    fig = schematics.fp8_granularity(rows=8, cols=32)
    data = fig.schematic_data
    assert len(data) == 5
    seen = set()
    for title, panel in data.items():
        config, grid = panel["config"], torch.as_tensor(panel["groups"])
        expected = _geometric_groups(config.granularity, 8, 32, config.block)
        assert torch.equal(grid, expected), f"{title}: the drawn groups are not the {config.granularity} {config.block} blocks"
        # and every drawn group really shares one scale in mixprec.fp8, different groups different scales
        x = torch.rand(8, 32, generator=torch.Generator().manual_seed(3)) * torch.exp2(torch.arange(256.0).reshape(8, 32) % 7)
        scale = config.quantize(x, 1).scale.expand_as(x)
        for g in grid.unique():
            assert scale[grid == g].unique().numel() == 1, f"{title}: group {int(g)} holds several scales"
        seen.add((config.granularity, config.block, config.scale_mode))
    down = schematics.GRANULARITY_SCALE_DOWN
    block = fp8.Float8LinearConfig.from_recipe_name("blockwise")
    mx = fp8.Float8LinearConfig.from_recipe_name("mxfp8").cast_config_input
    assert ("blockwise", (1, block.cast_config_input.block[1] // down), "real") in seen
    assert ("blockwise", (block.cast_config_weight.block[0] // down, block.cast_config_weight.block[1] // down), "real") in seen
    assert ("mx", (1, mx.block[1] // down), mx.scale_mode) in seen
    assert {kind for kind, _, _ in seen} == {"tensorwise", "axiswise", "blockwise", "mx"}


def test_scale_groups_fails_when_the_scale_is_not_a_partition():
    class Overlapping:  # a fake config whose scale of x[0, 0] depends on everything: not a partition
        def quantize(self, t, k_dim):
            s = t.abs().amax(-1, keepdim=True).expand_as(t).clone()
            s[0, 0] = t.abs().sum()
            return fp8.Quantized(t, s, fp8.E4M3)

    with pytest.raises(AssertionError):
        schematics.scale_groups(Overlapping(), torch.rand(2, 4) + 0.5)


def test_operand_diagram_reads_every_operand_from_the_recipes():
    fig = schematics.fp8_linear_operands()
    data = fig.schematic_data
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert {recipe for recipe, _, _ in data} == set(fp8.RECIPES)
    for (recipe, product, index), (fmt, granularity) in data.items():
        assert f"{fmt}\n{granularity}" in texts, f"{recipe} {product} operand {index}: not drawn"


@pytest.mark.parametrize("recipe", fp8.TORCHAO_RECIPES)
def test_operand_diagram_agrees_with_torchaos_configs(recipe):
    """The three torchao recipes: format and granularity of every operand as torchao's own config says."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = pytest.importorskip("torchao.float8")
    config = ao.Float8LinearConfig.from_recipe_name(recipe)
    data = schematics.fp8_linear_operands([recipe]).schematic_data
    names = {torch.float8_e4m3fn: "E4M3", torch.float8_e5m2: "E5M2"}
    for product, fields, _ in schematics.LINEAR_PRODUCTS:
        for index, field in enumerate(fields):
            cast = getattr(config, field)
            fmt, granularity = data[recipe, product, index]
            if cast.scaling_type.value == "disabled":
                assert fmt == "BF16", f"{recipe} {field}: torchao keeps it in high precision"
                continue
            assert fmt == names[cast.target_dtype or torch.float8_e5m2 if "grad_output" in field else cast.target_dtype or torch.float8_e4m3fn]
            kind = cast.scaling_granularity.value  # "tensorwise" or "axiswise"
            assert granularity.startswith({"tensorwise": ("张量", "tensor"), "axiswise": ("行", "row")}[kind]), (recipe, field, granularity)
            assert granularity.endswith("2ᵏ") == bool(config.round_scales_to_power_of_2), (recipe, field, granularity)


# --- chapter 6 (debugging) ------------------------------------------------------------------------

def test_clinic_stages_are_the_models_modules():
    from mixprec import clinic, debug

    children = {name for name, _ in clinic.ClinicModel().named_children()}
    for name, _ in schematics.CLINIC_STAGES:
        assert name in children or name in ("", debug.OUTSIDE), f"{name}: not a module of clinic.ClinicModel"
    assert schematics.clinic_stage("attn.q") == "attn"
    with pytest.raises(ValueError):
        schematics.clinic_stage("nowhere")


@pytest.mark.parametrize("case", ["layernorm_eps", "fp16_loss", "additive_mask"])  # each fails on its first step
def test_clinic_figure_marks_the_stage_a_real_run_fails_in(case):
    from mixprec import clinic

    found = clinic.run_case(case, fixed=False, steps=1).first_failure
    fig = schematics.clinic_model({case: found}, titles={case: "病例"})
    stage = fig.schematic_data[case]
    assert stage == {"layernorm_eps": "norm", "fp16_loss": "(模型之外)", "additive_mask": "attn"}[case]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert f"病例\n{found.op} → {found.kind}" in texts

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
    trace = amp_schematics.trace_step(precision)
    fig = amp_schematics.mixed_precision_step(trace)
    drawn = fig.mixprec_labels
    assert set(drawn) == set(amp_schematics.STEP_STAGES) - {"input"}
    assert drawn == {k: v for k, v in _plain_torch_amp_step(dtype).items()}
    texts = [t.get_text() for t in fig.axes[0].texts]
    for stage, dtype_text in drawn.items():  # every box shows its dtype
        assert any(text.endswith("\n" + dtype_text) for text in texts), stage
    low = SHORT[dtype]
    assert drawn["activation"] == drawn["logits"] == drawn["activation_grad"] == low  # the low-precision part of the step
    assert drawn["master"] == drawn["grad"] == drawn["optimizer_state"] == drawn["updated"] == drawn["loss"] == "FP32"
    assert (trace["scale"] is not None) == (dtype == torch.float16)


def test_step_trace_of_master_weights_and_pure_bf16():
    master = amp_schematics.trace_step("bf16-master")
    assert master["master"] == "float32" and master["grad"] == "bfloat16" and master["unscaled_grad"] == "float32"
    pure = amp_schematics.trace_step("bf16-pure")
    assert pure["master"] == pure["updated"] == "bfloat16" and pure["optimizer_state"] == "float32"


def test_memory_schematic_numbers_are_the_librarys():
    from mixprec.amp import memory_breakdown

    fig = amp_schematics.memory_by_tokens(n_layer=2, n_embd=128, shapes=((1, 64), (4, 64)))
    coefficients = {p: amp_schematics.activation_coefficients(p) for p in ("fp32", "bf16-amp")}
    n = int(amp_schematics.gpt2_parameters(2, 128))
    for (b, s, p), parts in fig.mixprec_values.items():
        assert {k: v for k, v in parts.items() if k != "activations"} == memory_breakdown(n, p)
        assert parts["activations"] == amp_schematics.activation_bytes(coefficients[p], 2, 128, b * s)
    bars = [patch.get_width() for patch in fig.axes[0].patches]
    assert sum(bars) * 2**30 == pytest.approx(sum(sum(v.values()) for v in fig.mixprec_values.values()))


def test_activation_model_predicts_a_measured_gpt2():
    """The per-token coefficients, fitted on four small GPT-2s, predict a fifth, wider and deeper one within 0.5%."""
    from mixprec.amp import saved_activation_bytes
    from transformers import GPT2Config, GPT2LMHeadModel

    for precision in ("fp32", "bf16-amp", "bf16-pure"):
        c = amp_schematics.activation_coefficients(precision)
        config = GPT2Config(vocab_size=96, n_positions=64, n_embd=192, n_layer=3, n_head=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(
            torch.bfloat16 if precision == "bf16-pure" else torch.float32)
        ids = torch.randint(0, 96, (4, 64))
        measured = (saved_activation_bytes(model, ids, precision) - saved_activation_bytes(model, ids[:2], precision)) / 128
        assert amp_schematics.activation_bytes(c, 3, 192, 1, vocab_size=96) == pytest.approx(measured, rel=5e-3), precision


# --- chapter FP4 ----------------------------------------------------------------------------------

def test_fp4_scaling_draws_the_quantizers_scales_and_values():
    from mixprec import fp4

    fig = schematics.fp4_scaling()
    data = fig.schematic_data
    x, nv, mx = data["x"], data["nvfp4"], data["mxfp4"]
    assert torch.equal(nv.dequantize(), fp4.quantize_nvfp4(x).dequantize())
    assert torch.equal(mx.dequantize(), fp4.quantize_mxfp4(x).dequantize())
    texts = [t.get_text() for t in fig.axes[0].texts]
    for b in nv.block_scale[0, ::16].tolist():
        assert any(f" {b:g}" in t for t in texts), f"NVFP4 block scale {b:g} is not drawn"
    assert nv.block_scale[0, :16].unique().numel() == 1 and nv.block_scale[0, 0] != nv.block_scale[0, 16]
    assert mx.block_scale[0].unique().numel() == 1
    # the caption: the quiet half keeps its values in NVFP4 but mostly becomes 0 in MXFP4
    assert (mx.values[0, :16] == 0).float().mean() > 0.5 > (nv.values[0, :16] == 0).float().mean()
