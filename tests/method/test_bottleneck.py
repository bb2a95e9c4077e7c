import pytest

from t3s.bottleneck import OnlineBottleneckDetector, argmin_bottleneck, detect_online, find_bottleneck, shock_check

# Imitation Shock: accuracy crashes, bottoms out, recovers (step -> training accuracy).
SHOCK = {0: 0.9, 2: 0.7, 4: 0.3, 6: 0.1, 8: 0.2, 10: 0.4, 12: 0.6, 14: 0.05, 16: 0.5}


def test_argmin_is_the_global_minimum():
    assert argmin_bottleneck(SHOCK).step == 14


def test_argmin_includes_theta0_as_eq1_says_and_min_step_departs_from_it():
    assert argmin_bottleneck({0: 0.0, 1: 0.2, 2: 0.1, 3: 0.1}).step == 0
    assert argmin_bottleneck({0: 0.0, 1: 0.2, 2: 0.1, 3: 0.1}, min_step=1).step == 2  # ties: the earliest


def test_a_rising_curve_has_its_bottleneck_at_theta0_and_no_shock():
    rising = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.8}
    assert find_bottleneck(rising).step == 0
    assert find_bottleneck(rising, method="online", patience=2).step == 0
    check = shock_check(rising, num_trials=64)
    assert not check["shock"] and not check["clear"]
    assert "no Imitation Shock" in check["message"] and "θb = θ0" in check["message"]
    assert "\n" not in check["message"]
    assert not shock_check({0: 0.5, 1: 0.5, 2: 0.6})["shock"]  # a tie with θ0 is no drop: Eq. 1 takes θ0


@pytest.mark.parametrize("curve", [SHOCK, {0: 0.9, 1: 0.6, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.4, 6: 0.4, 7: 0.6}])
def test_a_real_drop_gives_the_same_bottleneck_as_leaving_theta0_out(curve):
    assert find_bottleneck(curve).step == find_bottleneck(curve, min_step=1).step > 0
    check = shock_check(curve, num_trials=64)
    assert check["shock"] and check["clear"] and check["message"] is None


def test_a_drop_within_the_binomial_noise_warns_by_how_much():
    curve = {0: 0.50, 1: 0.45, 2: 0.55}
    check = shock_check(curve, num_trials=64)  # se = sqrt((.25 + .2475) / 64) = 0.0882; 0.05 < 2 se
    assert check["shock"] and not check["clear"]
    assert check["standard_error"] == pytest.approx(((0.25 + 0.45 * 0.55) / 64) ** 0.5)
    assert "0.050 below" in check["message"] and "64 completions" in check["message"]
    assert shock_check(curve, num_trials=10_000)["clear"]  # the same drop over many prompts is real
    assert shock_check({1: 0.2, 2: 0.1}) is None  # no θ0 value: nothing to compare with


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
    det = OnlineBottleneckDetector(patience=2, min_step=1)
    assert det.update(0, 0.9) is False  # step 0 is θ0 itself, left out with min_step=1
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
        argmin_bottleneck(curve, min_step=1)


def test_unknown_method():
    with pytest.raises(ValueError, match="argmin, online or fixed"):
        find_bottleneck(SHOCK, method="magic")


# A curve shaped like the paper's: a plateau at 0.50, the true minimum 0.40 three evaluations later, ties at 0.40.
PLATEAU = {0: 0.8, 1: 0.6, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.4, 6: 0.4, 7: 0.6, 8: 0.7}


def test_default_rule_is_argmin_over_the_whole_trajectory():
    b = find_bottleneck(PLATEAU)
    assert (b.method, b.step, b.accuracy) == ("argmin", 5, 0.4)  # the true minimum, earliest of the tie


def test_online_with_short_patience_stops_on_the_plateau():
    b = find_bottleneck(PLATEAU, method="online", patience=2)
    assert (b.step, b.confirmed_at) == (2, 4)  # the 0.5 plateau taken for the minimum; stopped before the 0.4
    b = find_bottleneck(PLATEAU, method="online", patience=3)
    assert (b.step, b.accuracy) == (5, 0.4)  # patient enough: the true minimum (earliest of the tie)


def test_fixed_ignores_the_curve_even_at_a_plateau():
    b = find_bottleneck(PLATEAU, method="fixed", step=3)
    assert (b.step, b.accuracy, b.method) == (3, 0.5, "fixed")


def test_describe_never_claims_a_confirmation_for_argmin_or_fixed():
    from t3s.bottleneck import describe

    assert "confirmed" not in describe(find_bottleneck(PLATEAU).to_dict())
    assert "Eq. 1" in describe(find_bottleneck(PLATEAU).to_dict())
    assert "T3S-simple" in describe(find_bottleneck(PLATEAU, method="fixed").to_dict())
    assert "confirmed at step 4" in describe(find_bottleneck(PLATEAU, method="online", patience=2).to_dict())


@pytest.mark.parametrize("value, why", [(0.0, "never produces a correct answer"), (1.0, "already solved"),
                                        (0.5, "too small to resolve")])
def test_a_flat_curve_is_an_error_that_says_why(value, why):
    from t3s.bottleneck import CurveError, check_curve

    rows = [{"step": s, "train_accuracy": value} for s in range(4)]
    with pytest.raises(CurveError, match=f"{value:.3f} at every one of the 4 evaluated steps.*{why}"):
        check_curve(rows)


def test_a_truncated_curve_is_an_error_that_names_the_budget():
    from t3s.bottleneck import CurveError, check_curve

    rows = [{"step": s, "train_accuracy": a, "train_truncated_fraction": 0.9, "train_no_answer_fraction": 0.9}
            for s, a in PLATEAU.items()]
    with pytest.raises(CurveError, match=r"90% .* generation limit .*max_new_tokens=512 .*1800 tokens"):
        check_curve(rows, max_new_tokens=512, longest_response=1800)
    rows = [{**r, "train_truncated_fraction": 0.0} for r in rows]
    with pytest.raises(CurveError, match="no extractable final answer"):
        check_curve(rows)
    check_curve([{**r, "train_no_answer_fraction": 0.1} for r in rows])  # a healthy curve passes
