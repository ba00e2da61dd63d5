"""hw.interleaved_median_times: interleaved rounds, medians, argument checks."""

import time

import pytest
from mixprec import hw


def test_medians_follow_the_work():
    times = hw.interleaved_median_times({"short": lambda: time.sleep(0.002), "long": lambda: time.sleep(0.02)},
                                        repeats=7, warmup=1)
    assert set(times) == {"short", "long"}
    assert 0.002 <= times["short"] < times["long"]
    assert times["long"] / times["short"] > 3


def test_rounds_interleave_and_rotate():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    hw.interleaved_median_times(fns, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")


def test_median_ignores_an_outlier():
    count = {"n": 0}

    def sometimes_slow():
        count["n"] += 1
        time.sleep(0.05 if count["n"] == 2 else 0.001)

    times = hw.interleaved_median_times({"f": sometimes_slow}, repeats=5, warmup=0)
    assert times["f"] < 0.02


@pytest.mark.parametrize("kwargs, error", [
    (dict(fns={}), ValueError),
    (dict(fns={"f": lambda: None}, repeats=0), ValueError),
    (dict(fns={"f": lambda: None}, warmup=-1), ValueError),
    (dict(fns={"f": 3}), TypeError),
])
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        hw.interleaved_median_times(**kwargs)
