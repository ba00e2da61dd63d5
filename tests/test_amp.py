import pytest
import torch
import torch.nn.functional as F
from mixprec.amp import AutocastInspector, memory_breakdown, saved_activation_bytes
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
    assert sum(memory_breakdown(n, "bf16-master").values()) == 20 * n
    assert sum(memory_breakdown(n, "bf16-pure").values()) == 12 * n
    with pytest.raises(ValueError, match="fp32"):
        memory_breakdown(n, "int8")


def test_autocast_halves_saved_activations_roughly():
    model = build_model("tiny", 300)
    x = torch.randint(0, 300, (4, 64))
    fp32, bf16 = saved_activation_bytes(model, x, "fp32"), saved_activation_bytes(model, x, "bf16-amp")
    assert 0.3 * fp32 < bf16 < 0.9 * fp32
