"""FP4 training policies (emulated NVFP4 / MXFP4 linear layers): they train, and each switch does what it says."""

import pytest
import torch
from mixprec import fp4
from mixprec.amp import get_policy
from mixprec.fp8 import Float8Linear
from mixprec.step import train_step
from mixprec.story import build_model


def _train(precision: str, steps: int = 12):
    torch.manual_seed(0)
    model = build_model("tiny", 64)
    setup = get_policy(precision).setup(model, lr=1e-2, loss_fn=lambda out, y: torch.nn.functional.cross_entropy(
        out.logits.flatten(0, 1).float(), y.flatten()))
    g = torch.Generator().manual_seed(1)
    pattern = torch.randint(0, 64, (4, 33), generator=g)  # a few sequences, repeated: learnable in a few steps
    losses = [train_step(setup, pattern[:, :-1], pattern[:, 1:]).loss for _ in range(steps)]
    return setup, losses


@pytest.mark.parametrize("precision", ["fp4:nvfp4", "fp4:mxfp4"])
def test_fp4_policies_train(precision):
    setup, losses = _train(precision)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    fp4_layers = [n for n, m in setup.model.named_modules() if isinstance(m, Float8Linear)]
    assert fp4_layers and all(".h.0." in n for n in fp4_layers)  # two blocks: the last stays BF16
    assert any("fp4 linears" in note for note in setup.notes)
    assert all(p.dtype == torch.float32 for p in setup.model.parameters())  # FP32 master weights


def test_switches_choose_the_casts():
    full = fp4.FP4Recipe.from_name("nvfp4").linear_config()
    assert full.cast_config_weight.block_2d and full.cast_config_weight_for_grad_input is full.cast_config_weight
    assert full.cast_config_input_for_grad_weight.hadamard and full.cast_config_grad_output_for_grad_weight.hadamard
    assert not full.cast_config_input.hadamard and not full.cast_config_grad_output.hadamard  # weight gradient only
    assert full.cast_config_grad_output.stochastic and not full.cast_config_input.stochastic  # gradients only
    assert not fp4.FP4Recipe.from_name("nvfp4:no-2d").linear_config().cast_config_weight.block_2d
    off = fp4.FP4Recipe.from_name("nvfp4:no-hadamard").linear_config()
    assert not off.cast_config_input_for_grad_weight.hadamard and not off.cast_config_grad_output_for_grad_weight.hadamard
    assert not fp4.FP4Recipe.from_name("nvfp4:no-sr").linear_config().cast_config_grad_output.stochastic
    assert fp4.FP4Recipe.from_name("nvfp4:no-sr:all-layers").name == "nvfp4:no-sr:all-layers"
    with pytest.raises(ValueError, match="unknown FP4 switch"):
        get_policy("fp4:nvfp4:no-such")


def test_all_layers_switch_and_the_layers_it_keeps():
    model = build_model("tiny", 64)
    swapped = fp4.convert_to_fp4(model, "nvfp4:all-layers")
    assert any(".h.1." in n for n in swapped) and not any("lm_head" in n for n in swapped)
    recipe = fp4.FP4Recipe()
    assert [recipe.in_fp4(f"transformer.h.{i}.mlp.c_fc", 6) for i in range(6)] == [False, True, True, True, True, False]


def test_hadamard_leaves_the_weight_gradient_product_unchanged_in_high_precision():
    """Both inputs of the weight-gradient product are rotated by the same orthogonal matrix: Q Qᵀ = I."""
    g, x = torch.randn(32, 48), torch.randn(32, 64)
    q = fp4._HADAMARD
    rotated = fp4.hadamard_transform(g.t(), q) @ fp4.hadamard_transform(x.t(), q).t()
    assert torch.allclose(rotated, g.t() @ x, atol=1e-4)


def test_stochastic_rounding_of_gradients_is_unbiased():
    cast = fp4.Float4Cast("nvfp4", stochastic=True)
    x = torch.randn(16, 64)
    torch.manual_seed(0)
    mean = torch.stack([cast.cast(x, 1) for _ in range(200)]).mean(0)
    nearest = fp4.Float4Cast("nvfp4").cast(x, 1)
    assert (mean - x).abs().mean() < 0.5 * (nearest - x).abs().mean()


def test_2d_weight_is_the_same_forward_and_backward():
    w = torch.randn(64, 32)
    cast = fp4.Float4Cast("nvfp4", block_2d=True)
    assert torch.equal(cast.cast(w, 1), cast.cast(w, 0))
    one_d = fp4.Float4Cast("nvfp4")
    assert not torch.equal(one_d.cast(w, 1), one_d.cast(w, 0))


def test_policy_checks_its_fp4_recipe():
    from mixprec.amp import Policy

    with pytest.raises(TypeError, match="FP4Recipe"):
        Policy("x", fp4="nvfp4")
    with pytest.raises(ValueError, match="not both"):
        Policy("x", fp8="tensorwise", fp4=fp4.FP4Recipe())
    assert get_policy("fp4:mxfp4:no-sr").fp4 == fp4.FP4Recipe("mxfp4", stochastic_rounding=False)


@pytest.mark.parametrize("hadamard", [False, True])
def test_weight_gradient_product_in_fp4_approximates_the_exact_one(hadamard):
    """Both operands cast along the tokens (k_dim 0), rotated or not: the product is g.T @ x up to FP4 error."""
    torch.manual_seed(0)
    g, x = torch.randn(512, 128), torch.randn(512, 384)
    exact = g.t() @ x
    cast = fp4.Float4Cast(hadamard=hadamard)
    approx = cast.cast(g, 0).t() @ cast.cast(x, 0)
    assert (approx - exact).norm() / exact.norm() < 0.25
    wrong = fp4.Float4Cast(hadamard=not hadamard).cast(g, 0).t() @ cast.cast(x, 0)  # only one operand rotated: garbage
    assert (wrong - exact).norm() / exact.norm() > 0.5
