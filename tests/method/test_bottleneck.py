import pytest

from t3s.bottleneck import OnlineBottleneckDetector, argmin_bottleneck, detect_online, find_bottleneck

# Imitation Shock: accuracy crashes, bottoms out, recovers (step -> training accuracy).
SHOCK = {0: 0.9, 2: 0.7, 4: 0.3, 6: 0.1, 8: 0.2, 10: 0.4, 12: 0.6, 14: 0.05, 16: 0.5}


def test_argmin_is_the_global_minimum():
    assert argmin_bottleneck(SHOCK).step == 14


def test_argmin_ties_pick_the_earliest_and_skip_step0():
    assert argmin_bottleneck({0: 0.0, 1: 0.2, 2: 0.1, 3: 0.1}).step == 2
    assert argmin_bottleneck({0: 0.0, 1: 0.2, 2: 0.1, 3: 0.1}, min_step=0).step == 0


def test_online_confirms_after_patience_and_stops_early():
    b = detect_online(SHOCK, patience=3)
    assert (b.step, b.accuracy, b.confirmed_at) == (6, 0.1, 12)


def test_online_patience_large_never_confirms_and_returns_best_so_far():
    b = detect_online(SHOCK, patience=10)
    assert b.step == 14 and b.confirmed_at is None


def test_online_min_delta_ignores_tiny_new_minima():
    curve = {0: 0.9, 1: 0.5, 2: 0.49, 3: 0.6, 4: 0.7}
    assert detect_online(curve, patience=2).step == 2
    assert detect_online(curve, patience=2, min_delta=0.05).step == 1


def test_online_detector_is_incremental():
    det = OnlineBottleneckDetector(patience=2)
    assert det.update(0, 0.9) is False  # step 0 is θ0 itself (min_step=1)
    assert det.update(1, 0.5) is True  # first candidate
    assert det.update(2, 0.4) is True
    assert det.update(3, 0.5) is False and not det.confirmed
    assert det.update(4, 0.6) is False and det.confirmed
    assert det.result().step == 2 and det.result().confirmed_at == 4
    with pytest.raises(ValueError, match="increase"):
        det.update(4, 0.1)


def test_fixed_step_is_t3s_simple():
    b = find_bottleneck(SHOCK, method="fixed", step=10)
    assert (b.step, b.accuracy, b.method) == (10, 0.4, "fixed")
    assert find_bottleneck(None, method="fixed").step == 10


@pytest.mark.parametrize("curve, match", [({}, "empty"), ({1: 1.5}, r"\[0, 1\]"), ({0: 0.5}, "step >= 1")])
def test_bad_curves(curve, match):
    with pytest.raises(ValueError, match=match):
        argmin_bottleneck(curve)


def test_unknown_method():
    with pytest.raises(ValueError, match="argmin, online or fixed"):
        find_bottleneck(SHOCK, method="magic")
