import copy
import math

import pytest
import torch
from mixprec.scaling import DynamicLossScaler, StaticLossScaler


def run(scaler, model, steps, seed=0, poison=None):
    """Train ``model`` with ``scaler``; plant inf/NaN gradients at the steps ``poison`` names. Returns per-step (scale, stepped)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    log = []
    for step in range(steps):
        x = torch.randn(8, 6, generator=g)
        loss = model(x).pow(2).mean() * 1e3  # large enough that big scales overflow on their own
        scaler.scale(loss).backward()
        if poison and step in poison:
            model[0].weight.grad[0, 0] = poison[step]
        before = [p.detach().clone() for p in model.parameters()]
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scale = scaler.get_scale()
        scaler.update()
        stepped = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        log.append((scale, stepped))
        optimizer.zero_grad(set_to_none=True)
    return log


def make_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_dynamic_scaler_matches_gradscaler_bit_for_bit():
    rng = torch.Generator().manual_seed(3)
    steps = 1200
    poisoned_steps = torch.randperm(steps, generator=rng)[:40].tolist()
    poison = {s: (math.inf if i % 3 else math.nan) for i, s in enumerate(poisoned_steps)}
    options = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=25)
    ours_model, torch_model = make_model(), make_model()
    ours = run(DynamicLossScaler(**options), ours_model, steps, poison=poison)
    theirs = run(torch.amp.GradScaler("cpu", **options), torch_model, steps, poison=poison)
    assert ours == theirs
    assert all(p1.equal(p2) for p1, p2 in zip(ours_model.parameters(), torch_model.parameters()))
    scales = [s for s, _ in ours]
    assert max(scales) > options["init_scale"] and min(scales) < options["init_scale"]  # both growth and backoff happened
    skipped = [i for i, (_, stepped) in enumerate(ours) if not stepped]
    assert set(poisoned_steps) <= set(skipped)


def test_gradscaler_state_dict_round_trip():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    scaler._update_scale(False)
    state = scaler.state_dict()
    assert set(torch.amp.GradScaler("cpu").state_dict()) <= set(state)
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_static_scaler_skips_but_keeps_its_scale():
    log = run(StaticLossScaler(2.0**8), make_model(), 20, poison={5: math.inf})
    assert [s for s, _ in log] == [256.0] * 20
    assert [stepped for _, stepped in log] == [i != 5 for i in range(20)]


def test_min_scale_and_bad_arguments():
    scaler = DynamicLossScaler(init_scale=4.0, min_scale=1.0)
    for _ in range(5):
        scaler._update_scale(True)
    assert scaler.get_scale() == 1.0
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    scaler.unscale_(optimizer)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(optimizer)
    for bad in (dict(init_scale=0.0), dict(growth_factor=1.0), dict(backoff_factor=1.0), dict(growth_interval=0), dict(min_scale=1e9)):
        with pytest.raises(ValueError):
            DynamicLossScaler(**bad)
    assert copy.deepcopy(scaler).get_scale() == 1.0
