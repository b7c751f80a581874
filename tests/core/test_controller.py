from lightning_compress.core.controller import AccuracyGuard


def test_baseline_is_the_last_value_before_the_first_event():
    guard = AccuracyGuard(max_drop=0.01)
    guard.observe(0.90)
    guard.observe(0.95)
    assert guard.baseline == 0.95
    guard.event_applied(0.0, 0.5)
    assert guard.observe(0.945).action == "accept"
    assert guard.baseline == 0.95


def test_drop_rolls_back_halves_the_step_and_stops_when_no_step_fits():
    guard = AccuracyGuard(max_drop=0.01, min_step=0.06)
    guard.observe(0.95)
    guard.event_applied(0.0, 0.4)
    decision = guard.observe(0.90)
    assert decision.action == "rollback" and decision.step_cap == 0.2
    assert guard.limit(0.0, 0.6) == 0.2
    guard.event_applied(0.0, 0.2)
    assert guard.observe(0.8).step_cap == 0.1
    guard.event_applied(0.0, 0.1)
    assert guard.observe(0.8).action == "stop"
    assert guard.stopped and guard.limit(0.0, 0.9) == 0.0


def test_mode_min_for_losses_and_state_roundtrip():
    guard = AccuracyGuard(max_drop=0.1, mode="min")
    guard.observe(1.0)
    guard.event_applied(0.0, 0.5)
    assert guard.observe(1.2).action == "rollback"
    copy = AccuracyGuard(max_drop=0.1, mode="min")
    copy.load_state_dict(guard.state_dict())
    assert copy == guard
    # settings stay the loading guard's (trial W: a resumed fit's new `max_drop` and `mode` were overwritten)
    other = AccuracyGuard(max_drop=0.3, mode="min")
    other.load_state_dict(guard.state_dict())
    assert (other.max_drop, other.baseline, other.rollbacks) == (0.3, guard.baseline, guard.rollbacks)
    flipped = AccuracyGuard(max_drop=0.1, mode="max")  # another reading: the baseline is not comparable
    flipped.load_state_dict(guard.state_dict())
    assert flipped.mode == "max" and flipped.baseline is None
    assert flipped.observe(0.7).action == "baseline" and flipped.baseline == 0.7


def test_nan_counts_as_a_drop():
    guard = AccuracyGuard(max_drop=0.5)
    guard.observe(0.9)
    guard.event_applied(0.0, 0.5)
    assert guard.observe(float("nan")).action == "rollback"


def test_a_drop_of_max_drop_in_float32_is_accepted():
    """Trial AJ: 194/200 then 193/200, logged as float32 (0.9700000286, 0.9649999738), is a drop of 0.0050000548: it
    was rolled back at `max_drop`=0.005, which the guard tolerates. A drop one sample larger still is not."""
    import torch

    def logged(correct):
        return float(torch.tensor(correct / 200, dtype=torch.float32))

    for larger in (False, True):
        guard = AccuracyGuard(max_drop=0.005)
        guard.observe(logged(194))
        guard.event_applied(0.0, 0.5)
        assert guard.observe(logged(192 if larger else 193)).action == ("rollback" if larger else "accept")
