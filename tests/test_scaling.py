import copy
import math

import pytest
import torch
from mixprec.formats import zone_fractions
from mixprec.scale_experiments import scaler_trajectory
from mixprec.scaling import DynamicLossScaler, StaticLossScaler


def test_dynamic_scaler_matches_gradscaler_bit_for_bit():
    rng = torch.Generator().manual_seed(3)
    steps = 1200
    poisoned_steps = torch.randperm(steps, generator=rng)[:40].tolist()
    poison = {s: (math.inf if i % 3 else math.nan) for i, s in enumerate(poisoned_steps)}
    options = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=25)
    ours, ours_model = scaler_trajectory(DynamicLossScaler(**options), steps, poison)
    theirs, torch_model = scaler_trajectory(torch.amp.GradScaler("cpu", **options), steps, poison)
    assert ours == theirs
    assert all(p1.equal(p2) for p1, p2 in zip(ours_model.parameters(), torch_model.parameters()))
    scales = [s for s, _ in ours]
    assert max(scales) > options["init_scale"] and min(scales) < options["init_scale"]  # both growth and backoff happened
    skipped = [i for i, (_, stepped) in enumerate(ours) if not stepped]
    assert skipped == sorted(poisoned_steps)


def test_gradscaler_state_dict_round_trip():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3)
    scaler._update_scale(False)
    state = scaler.state_dict()
    assert set(torch.amp.GradScaler("cpu").state_dict()) <= set(state)
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_static_scaler_skips_but_keeps_its_scale():
    log, _ = scaler_trajectory(StaticLossScaler(2.0**8), 20, poison={5: math.inf})
    assert [s for s, _ in log] == [256.0] * 20
    assert [stepped for _, stepped in log] == [i != 5 for i in range(20)]


def test_min_scale_and_bad_arguments():
    scaler = DynamicLossScaler(init_scale=4.0, min_scale=1.0)
    for _ in range(5):
        scaler._update_scale(True)
    assert scaler.get_scale() == 1.0
    for s in (scaler, torch.amp.GradScaler("cpu")):  # the protocol as GradScaler's, on an optimizer with gradients
        model = torch.nn.Linear(2, 2)
        s.scale(model(torch.ones(1, 2)).sum()).backward()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        s.unscale_(optimizer)
        with pytest.raises(RuntimeError, match="already been called"):
            s.unscale_(optimizer)
    for bad in (dict(init_scale=0.0), dict(growth_factor=1.0), dict(backoff_factor=1.0), dict(growth_interval=0), dict(min_scale=1e9)):
        with pytest.raises(ValueError):
            DynamicLossScaler(**bad)
    assert copy.deepcopy(scaler).get_scale() == 1.0


def test_zone_fractions_exact_boundaries():
    v = torch.tensor([0.0, 1e-9, 1e-6, 1.0, 1e5, -(2.0**-24), 2.0**-25])  # 2**-25 is a tie and rounds to even: zero
    assert zone_fractions(v) == {"zero": 1 / 7, "flushed": 2 / 7, "subnormal": 2 / 7, "normal": 1 / 7, "overflow": 1 / 7}
    assert zone_fractions(v, 2.0**10) == {"zero": 1 / 7, "flushed": 0.0, "subnormal": 2 / 7, "normal": 3 / 7, "overflow": 1 / 7}
    assert zone_fractions(torch.tensor([448.0, 464.0, 480.0]), fmt="e4m3fn")["overflow"] == 1 / 3  # 464 ties to 448
