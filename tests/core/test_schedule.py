import itertools
import math

import pytest

from lightning_compress.core.schedule import PruningSchedule, schedule_curve


@pytest.mark.parametrize("kind", ["cubic", "linear", "geometric", "one_shot"])
def test_curves_start_at_zero_end_at_target_and_increase(kind):
    values = [schedule_curve(kind, 0.9, p / 20) for p in range(21)]
    assert values[0] == 0.0
    assert values[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in itertools.pairwise(values))


def test_cubic_matches_zhu_gupta():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, s_i = 0
    sched = PruningSchedule("cubic", 0.9, start=5, end=20)
    for t in range(6, 21):
        assert sched.sparsity_at(t) == pytest.approx(0.9 + (0 - 0.9) * (1 - (t - 5) / 15) ** 3)


def test_geometric_removes_the_same_fraction_of_the_remaining_weights():
    sched = PruningSchedule("geometric", 0.99, start=0, end=4)
    density = [1 - sched.sparsity_at(t) for t in range(0, 5)]
    ratios = [b / a for a, b in itertools.pairwise(density)]
    assert ratios == pytest.approx([ratios[0]] * 4)
    assert density[-1] == pytest.approx(0.01)


def test_events_every_n_and_always_at_the_end():
    sched = PruningSchedule("linear", 0.5, start=2, end=9, every=3)
    assert sched.events() == [5, 8, 9]
    assert not sched.is_event(2) and not sched.is_event(10)


def test_callable_schedule_is_capped_at_target_and_validated():
    sched = PruningSchedule(lambda epoch: 0.1 * epoch, 0.5, start=0, end=10)
    assert sched.sparsity_at(3, user_time=2) == pytest.approx(0.2)
    assert sched.sparsity_at(9, user_time=8) == 0.5
    with pytest.raises(ValueError, match="sparsity must be in"):
        PruningSchedule(lambda e: 1.5, 0.5, 0, 10).sparsity_at(1)
    with pytest.raises(TypeError, match="must return a float"):
        PruningSchedule(lambda e: math.nan, 0.5, 0, 10).sparsity_at(1)


def test_a_callable_draws_the_path_and_the_target_is_reached_at_the_end():
    """A callable that ended below the target left the fit there, and the warning blamed events that 'could not
    run' (a docs trial); one above it was capped without a word in the docs."""
    low = PruningSchedule(lambda t: 0.3, 0.5, start=0, end=4)
    assert [low.sparsity_at(t) for t in range(1, 6)] == [0.3, 0.3, 0.3, 0.5, 0.5]
    high = PruningSchedule(lambda t: 0.95, 0.5, start=0, end=4)
    assert [high.sparsity_at(t) for t in range(1, 5)] == [0.5, 0.5, 0.5, 0.5]


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="`schedule`='exp' is not one of"):
        schedule_curve("exp", 0.5, 0.5)


def test_step_interval_spreads_about_that_many_events():
    from lightning_compress.core.schedule import step_interval

    assert step_interval(320, 100) == 3
    assert step_interval(40, 100) == 1  # a short window: an event after every step
    schedule = PruningSchedule("cubic", 0.9, 0, 320, step_interval(320, 100))
    assert len(schedule.events()) == 107
    with pytest.raises(ValueError, match="`events`=0 must be at least 1"):
        step_interval(320, 0)


@pytest.mark.parametrize("kind", ["cubic", "linear", "geometric", "one_shot"])
def test_curves_from_an_initial_sparsity_start_there_and_end_at_target(kind):
    """Zhu & Gupta's `s_i`: a model pruned before starts the schedule at its sparsity (trial CT)."""
    values = [schedule_curve(kind, 0.9, p / 20, initial=0.6) for p in range(21)]
    assert values[0] == pytest.approx(0.6) and values[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in itertools.pairwise(values))
    sched = PruningSchedule(kind, 0.9, start=2, end=10, initial=0.6)
    assert sched.sparsity_at(2) == 0.6 and sched.sparsity_at(10) == pytest.approx(0.9)
    assert PruningSchedule(lambda t: 0.1, 0.9, start=2, end=10, initial=0.6).sparsity_at(5) == 0.6  # raised to it


def test_cubic_from_an_initial_sparsity_is_zhu_gupta():
    sched = PruningSchedule("cubic", 0.9, start=0, end=10, initial=0.5)
    for t in range(11):
        assert sched.sparsity_at(t) == pytest.approx(0.9 + (0.5 - 0.9) * (1 - t / 10) ** 3)


@pytest.mark.parametrize("initial", [-0.1, 0.95, float("nan"), "0.5"])
def test_an_initial_sparsity_outside_zero_to_target_is_refused(initial):
    with pytest.raises(ValueError, match=r"`initial`=.* must be a float in \[0, `target`=0.9\]"):
        PruningSchedule("cubic", 0.9, start=0, end=10, initial=initial)
