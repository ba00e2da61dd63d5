"""FP4 inference: weight-only and W4A4 NVFP4/MXFP4 layers, held equal to torchao's inference configs on CPU.

torchao 0.18 runs two of its FP4 inference configs on this CPU: ``NVFP4WeightOnlyConfig`` (an
``NVFP4Tensor`` weight, FP32 activations) and ``MXDynamicActivationMXWeightConfig`` with
``KernelPreference.EMULATED`` (MXFP4 weights and activations, BF16 only). Its W4A4 NVFP4 config needs
sm100, so ours is held to the quantizers tested in test_fp4.py instead. Tolerance: zero.
"""

import copy
import warnings

import pytest
import torch
from mixprec import fp4, story
from mixprec.amp import get_policy
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("torchao")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.inference_workflow import MXDynamicActivationMXWeightConfig, NVFP4WeightOnlyConfig
    from torchao.quantization import quantize_
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference


def two_layers(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(dtype)


def test_nvfp4_weight_only_equals_torchao():
    model, x = two_layers(), torch.randn(5, 64) * 3
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    assert fp4.quantize_for_inference(ours, "nvfp4", include=lambda fqn: True) == ["0", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(theirs, NVFP4WeightOnlyConfig())
        expected = theirs(x)
    assert torch.equal(ours(x), expected)


@pytest.mark.parametrize("scaling", ["floor", "rceil"])
def test_mxfp4_weights_and_activations_equal_torchao_emulated(scaling):
    model, x = two_layers(torch.bfloat16), (torch.randn(2, 5, 64) * 3).bfloat16()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    fp4.quantize_for_inference(ours, "mxfp4", activations=True, include=lambda fqn: True, mx_scaling=scaling)
    config = MXDynamicActivationMXWeightConfig(activation_dtype=torch.float4_e2m1fn_x2, weight_dtype=torch.float4_e2m1fn_x2,
                                               kernel_preference=KernelPreference.EMULATED, scaling_mode=ScaleCalculationMode(scaling))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(theirs, config)
        expected = theirs(x)
    assert torch.equal(ours(x), expected)


@pytest.mark.parametrize("name", ["nvfp4-weight", "mxfp4-weight", "nvfp4-w4a4", "mxfp4-w4a4"])
def test_inference_policies_quantize_a_copy_and_keep_the_output_layer(name):
    model = story.build_model("tiny", vocab_size=256)
    before = [p.clone() for p in model.parameters()]
    prepared = story.for_inference(model, name)
    swapped = [n for n, m in prepared.model.named_modules() if isinstance(m, fp4.FP4InferenceLinear)]
    assert len(swapped) == 4 * model.config.n_layer and not any("lm_head" in n for n in swapped)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the caller's model is never changed"
    layer = prepared.model.get_submodule(swapped[0])
    assert layer.activations == name.endswith("w4a4")
    assert layer.cast.cast(layer.weight.detach(), -1).equal(layer.weight.detach()), "weights already on the FP4 grid"
    ids = torch.randint(0, 256, (1, 20))
    logits = story.next_token_logits(prepared, ids)
    assert logits.isfinite().all() and not logits.equal(story.next_token_logits(story.for_inference(model), ids))
    assert get_policy(name).inference_only and get_policy(name).bytes_per_parameter()["weights"] < 0.6


def test_fp4_inference_arguments_are_checked():
    with pytest.raises(ValueError, match="kind must be one of"):
        fp4.quantize_for_inference(two_layers(), "fp4")
    with pytest.raises(ValueError, match="multiples of 32"):
        fp4.quantize_for_inference(nn.Sequential(nn.Linear(48, 32)), "mxfp4")
    with pytest.raises(ValueError, match="activations_fp4 needs weights_fp4"):
        type(get_policy("fp32"))("x", activations_fp4=True)
