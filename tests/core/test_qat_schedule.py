"""The QAT schedule: when quantizers calibrate, switch on and freeze, from counters alone."""

from __future__ import annotations

import pytest

import lightning_compress.core.qat_schedule as qat_schedule
from lightning_compress.core.fake_quant import QuantConfig
from lightning_compress.core.qat_schedule import QATSchedule, calibration_steps, needs_calibration


def test_calibration_steps_are_a_share_of_the_steps_left_and_at_least_one(monkeypatch):
    assert calibration_steps(200) == 20
    assert calibration_steps(5) == 1
    assert calibration_steps(1) == 1
    assert calibration_steps(11) == 2  # rounded up
    monkeypatch.setattr(qat_schedule, "CALIBRATION_SHARE", 0.25)
    assert calibration_steps(200) == 50
    with pytest.raises(ValueError, match="`left`=0 must be a positive number of steps"):
        calibration_steps(0)


def test_what_calibrates_per_tensor_ranges_scales_from_observations_and_shift_searches():
    assert needs_calibration(QuantConfig())  # per-tensor activation ranges
    assert not needs_calibration(QuantConfig(activation_bits=None))  # weights' ranges come from the weights
    assert not needs_calibration(QuantConfig(weight_bits=4, group_size=32, activation_granularity="per_token"))
    assert needs_calibration(QuantConfig(activation_bits=None, scale="learned"))
    assert needs_calibration(QuantConfig(activation_bits=None, scale="power_of_two"))
    assert needs_calibration(QuantConfig(activation_bits=None), shift_search=True)


def test_an_epoch_the_fit_outlasts_switches_on_at_its_end():
    schedule = QATSchedule(start_epoch=1, freeze_observers_epoch=None, calibrates=True)
    assert schedule.plan(step=100, per_epoch=100, max_steps=300) == "epoch_end"
    assert schedule.plan(step=100, per_epoch=100, max_steps=200) == "epoch_end"  # ends with the epoch
    assert schedule.switch_step is None
    assert not schedule.switch_due(1, 10_000)


def test_a_fit_ending_inside_the_epoch_switches_after_calibrating_on_a_share_of_its_steps_left():
    schedule = QATSchedule(start_epoch=0, freeze_observers_epoch=None, calibrates=True)
    assert schedule.plan(step=0, per_epoch=1000, max_steps=200) == "after_calibration"
    assert schedule.switch_step == 20
    assert [schedule.switch_due(0, s) for s in (19, 20, 21)] == [False, True, True]
    assert not schedule.switch_due(1, 25)  # only inside `start_epoch`
    # a later `start_epoch`, two optimizers stepping each batch: the plan counts the Trainer's steps of both
    later = QATSchedule(start_epoch=2, freeze_observers_epoch=None, calibrates=True)
    assert later.plan(step=2 * 2 * 50, per_epoch=50, max_steps=130, optimizers=2) == "after_calibration"
    assert later.switch_step == 200 + 2 * 3  # 30 steps left: 3 calibrate
    assert later.steps_left(200, 130, 2) == 30


def test_a_fit_ending_inside_the_epoch_with_nothing_to_calibrate_switches_at_its_first_step():
    schedule = QATSchedule(start_epoch=0, freeze_observers_epoch=None, calibrates=False)
    schedule.switch_step = 7  # a plan made before is dropped
    assert schedule.plan(step=0, per_epoch=1000, max_steps=200) == "first_step"
    assert schedule.switch_step is None


def test_observers_run_from_the_calibration_epoch_until_the_freeze_or_the_switch_inside_it():
    schedule = QATSchedule(start_epoch=1, freeze_observers_epoch=2, calibrates=True)
    assert schedule.observing(0, 0) is None  # before `start_epoch`: left as they are
    assert schedule.observing(1, 0) and schedule.observing(2, 0)
    assert schedule.observing(3, 0) is False
    inside = QATSchedule(start_epoch=0, freeze_observers_epoch=0, calibrates=True)
    inside.plan(step=0, per_epoch=100, max_steps=50)
    assert inside.switch_step == 5
    assert inside.observing(0, 4) and inside.observing(0, 5) is False  # a resume after the switch: frozen
    unfrozen = QATSchedule(start_epoch=0, freeze_observers_epoch=None, calibrates=True)
    unfrozen.plan(step=0, per_epoch=100, max_steps=50)
    assert unfrozen.observing(0, 50) and unfrozen.observing(9, 0)


def test_ranges_freeze_at_the_freeze_epochs_end_unless_they_froze_at_the_switch_inside_it():
    schedule = QATSchedule(start_epoch=0, freeze_observers_epoch=0, calibrates=True)
    assert schedule.plan(step=0, per_epoch=100, max_steps=50) == "after_calibration"
    assert schedule.frozen_at_switch(0, inside=True)
    assert not schedule.freezes_at_epoch_end(0, 50)  # frozen at step 5, as the model trained with them
    epochs = QATSchedule(start_epoch=0, freeze_observers_epoch=0, calibrates=True)
    assert epochs.plan(step=0, per_epoch=100, max_steps=500) == "epoch_end"
    assert epochs.freezes_at_epoch_end(0, 100) and not epochs.freezes_at_epoch_end(1, 200)
    assert epochs.frozen_at_switch(1, inside=False)  # switching on as epoch 1 starts: frozen after 0
    assert not epochs.frozen_at_switch(0, inside=False)
    later = QATSchedule(start_epoch=0, freeze_observers_epoch=2, calibrates=True)
    later.plan(step=0, per_epoch=100, max_steps=50)
    assert not later.frozen_at_switch(0, inside=True)  # switched inside epoch 0: they move on until epoch 2 ends
    assert later.freezes_at_epoch_end(2, 300)
    never = QATSchedule(start_epoch=0, freeze_observers_epoch=None, calibrates=True)
    assert not never.frozen_at_switch(5, inside=True) and not never.freezes_at_epoch_end(0, 1)


def test_a_freeze_before_the_calibration_epoch_is_refused():
    with pytest.raises(ValueError, match=r"`freeze_observers_epoch`=1 is before `start_epoch`=2"):
        QATSchedule(start_epoch=2, freeze_observers_epoch=1, calibrates=True)


def test_the_planned_switch_is_its_state_and_a_damaged_one_is_refused():
    schedule = QATSchedule(start_epoch=0, freeze_observers_epoch=None, calibrates=True)
    schedule.plan(step=0, per_epoch=1000, max_steps=200)
    state = schedule.state_dict()
    assert state == {"switch_step": 20}
    resumed = QATSchedule(start_epoch=0, freeze_observers_epoch=None, calibrates=True)
    resumed.load_state_dict(state)
    assert resumed.switch_step == 20
    resumed.load_state_dict({})  # saved before the plan was state
    assert resumed.switch_step is None
    for bad in (-1, 2.5, "20", True):
        with pytest.raises(ValueError, match=r"switch_step=.*the checkpoint is damaged"):
            resumed.load_state_dict({"switch_step": bad})
