import dataclasses

import pytest
import torch
import torch.nn.functional as F
from mixprec.amp import MEMORY_POLICIES, AutocastInspector, get_policy, memory_breakdown, saved_activation_breakdown, saved_activation_bytes
from mixprec.story import build_model


def test_inspector_sees_what_autocast_does():
    a = torch.randn(4, 4)
    with torch.amp.autocast("cpu", dtype=torch.bfloat16), AutocastInspector() as seen:
        torch.mm(a, a)
        a.bfloat16() + a
        F.cross_entropy(a.bfloat16(), torch.zeros(4, dtype=torch.long))
    categories = {r.name: r.category for r in seen.records}
    assert categories["mm"] == "lowered" and categories["add"] == "promoted" and categories["cross_entropy"] == "fp32"
    assert seen.summary()["mm"] == {"lowered": 1}


def test_memory_model():
    n = 1000
    assert sum(memory_breakdown(n, "fp32").values()) == 16 * n
    assert sum(memory_breakdown(n, "bf16-amp").values()) == 18 * n  # mixed precision with Adam saves nothing on these
    assert sum(memory_breakdown(n, "bf16-master").values()) == 18 * n  # FP32 grads replace the BF16 ones one tensor at a time
    assert sum(memory_breakdown(n, "bf16-pure").values()) == 12 * n
    assert sum(memory_breakdown(n, "bf16-pure:kahan").values()) == 14 * n
    with pytest.raises(ValueError, match="fp32"):
        memory_breakdown(n, "int8")


def test_autocast_halves_saved_activations_roughly():
    model = build_model("tiny", 300)
    x = torch.randint(0, 300, (4, 64))
    fp32, bf16 = saved_activation_bytes(model, x, "fp32"), saved_activation_bytes(model, x, "bf16-amp")
    assert 0.3 * fp32 < bf16 < 0.9 * fp32


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("name", [p for p in MEMORY_POLICIES if p != "tf32" and not p.startswith(("round-all", "fp8"))])
def test_memory_model_matches_the_tensors_a_step_holds(name):
    """Weights, gradients and optimizer state, as real tensor bytes on a CPU, at the moment each peaks in a step."""
    from mixprec.step import train_step

    model = build_model("tiny", 300)
    n = sum(p.numel() for p in model.parameters())
    loss = lambda out, y: F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())  # noqa: E731
    setup = get_policy(name).setup(model, lr=1e-3, loss_fn=loss, scaler=False, device="cpu")
    master, optimizer = setup.master, setup.optimizer
    x = torch.randint(0, 300, (2, 16))
    measured = {}

    def after_backward(m):  # the gradients, at their peak: after grads_to_master for master weights
        if master is not None:
            master.grads_to_master()
            measured["grads"] = _bytes(p.grad for p in master.master) + _bytes(p.grad for p in m.parameters())
        else:
            measured["grads"] = _bytes(p.grad for p in m.parameters())

    # the masters are handled in the hook, so the step does not convert twice
    train_step(dataclasses.replace(setup, master=None), x, x, after_backward=after_backward)
    if master is not None:
        master.to_working()
    measured["weights"] = _bytes(model.parameters()) + (_bytes(master.master) if master else 0)
    measured["optimizer"] = _bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    model_bytes = memory_breakdown(n, name)
    for part in ("weights", "grads", "optimizer"):
        assert measured[part] == model_bytes[part], (part, measured[part], model_bytes[part])


def test_inspector_labels_in_place_ops_truthfully():
    """An in-place op writes into its input, whose dtype autocast never changes; it is not re-run, so it is labelled as
    such, not as "autocast made it FP32" (correctness review L8)."""
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    with torch.amp.autocast("cpu", dtype=torch.bfloat16), AutocastInspector() as seen:
        y.add_(1)
        x.masked_fill_(x > 0, 0.0)
        torch.mm(x, y)
    categories = {r.name: r.category for r in seen.records}
    assert categories == {"add_": "in-place", "masked_fill_": "in-place", "mm": "lowered"}


def test_saved_activations_count_the_fp32_copy_of_low_precision_logits():
    """Under real autocast ``logits.float()`` allocates an FP32 copy for the loss; under the emulation it would return
    the same float32 storage. Both count the loss's logits at 4 bytes per value (correctness review M3)."""
    model = build_model("tiny", 300)
    x = torch.randint(0, 300, (2, 32))
    logits_bytes = 2 * 32 * 300 * 4
    for policy in ("bf16-amp", "bf16-amp:native"):
        table = saved_activation_breakdown(model, x, policy)
        assert table[("loss", "float32")] >= logits_bytes, policy
    assert saved_activation_bytes(model, x, "bf16-amp") == sum(saved_activation_breakdown(model, x, "bf16-amp").values())

@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise", "mxfp8"])
def test_fp8_linears_keep_no_fp8_weight_copy_through_the_step(recipe):
    """The memory model counts no FP8 weight copy: the layer saves the high-precision weight itself for
    the backward (and casts it again there), so the forward's FP8 copy dies with the forward."""
    from mixprec import fp8

    layer = fp8.Float8Linear.from_float(torch.nn.Linear(128, 128), fp8.Float8LinearConfig.from_recipe_name(recipe))
    x = torch.randn(128, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    weight_sized = [t for t in saved if t.shape == layer.weight.shape and t.untyped_storage().data_ptr() not in
                    {layer.weight.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}]
    assert not weight_sized, f"{recipe}: {len(weight_sized)} weight-sized copies saved for the backward"
    assert get_policy(f"fp8:{recipe}").bytes_per_parameter()["autocast_cache"] <= get_policy("bf16-amp").bytes_per_parameter()["autocast_cache"]



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chapter_master_weights_is_master_weights(dtype):
    """Chapter 3's short teaching version (a code cell) trains bit-for-bit as the library's MasterWeights."""
    import sys
    from pathlib import Path

    from mixprec.amp import MasterWeights

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    try:
        from execute_chapters import code_cells
    finally:
        sys.path.pop(0)
    cells = [c for c in code_cells((root / "book" / "03_amp.md").read_text(encoding="utf-8")) if "class SimpleMasterWeights" in c]
    assert len(cells) == 1, "chapter 3 shows SimpleMasterWeights in one code cell"
    namespace = {"torch": torch}
    exec(cells[0], namespace)
    simple = namespace["SimpleMasterWeights"]
    assert len([line for line in cells[0].splitlines() if line.strip()]) <= 15

    def run(cls):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        mw = cls(net, dtype)
        opt = torch.optim.AdamW(mw.master, lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x, y = torch.randn(32, 8, generator=g).to(dtype), torch.randint(0, 4, (32,), generator=g)
            torch.nn.functional.cross_entropy(net(x).float(), y).backward()
            mw.grads_to_master()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mw.to_working()
        return [p.detach().clone() for p in net.parameters()] + [m.detach().clone() for m in mw.master]

    for a, b in zip(run(MasterWeights), run(simple), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
