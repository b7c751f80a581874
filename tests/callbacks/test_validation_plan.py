"""The callbacks' reading of when the Trainer validates agrees with what the Trainer does."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_compress.callbacks._validation_plan import last_validation_batch, steps_done_after, validation_batches
from tests.conftest import TinyModule, trainer


class Recorder(Callback):
    """Predicts at train start; records after which batch (counted over the fit) each validation ran."""

    def __init__(self) -> None:
        self.batches = 0
        self.validated_after: list[int] = []
        self.steps_at_validation: list[int] = []
        self.predicted: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.predicted = last_validation_batch(trainer)
        self.last_two = validation_batches(trainer, 2)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches += 1

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated_after.append(self.batches - 1)
            self.steps_at_validation.append(trainer.global_step)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"val_check_interval": 0.5},
        {"val_check_interval": 0.375},
        {"val_check_interval": 3, "check_val_every_n_epoch": None},
        {"check_val_every_n_epoch": 2},
        {"check_val_every_n_epoch": 2, "max_epochs": 5},
        {"max_steps": 20},
        {"max_steps": 21, "val_check_interval": 0.25},
        {"accumulate_grad_batches": 3},
        {"limit_train_batches": 5, "val_check_interval": 2},
        {"max_epochs": -1, "max_steps": 29},  # unlimited epochs: max_steps ends the fit
        {"max_epochs": -1, "max_steps": 30, "check_val_every_n_epoch": 3},
        {"max_epochs": -1, "max_steps": 13, "accumulate_grad_batches": 3, "val_check_interval": 0.5},
    ],
)
def test_the_last_validation_is_predicted_exactly(kwargs):
    recorder = Recorder()
    options = {"max_epochs": 4, **kwargs}
    fit = trainer(callbacks=[recorder], **options)
    fit.fit(TinyModule())  # 8 batches per epoch
    assert recorder.validated_after, "the Trainer validated at least once in every case here"
    assert recorder.predicted == recorder.validated_after[-1]
    assert recorder.last_two == recorder.validated_after[::-1][:2]  # the guard's last event follows the second
    assert steps_done_after(recorder.validated_after[-1], fit) == recorder.steps_at_validation[-1]


def test_time_based_validation_cannot_be_planned():
    recorder = Recorder()
    trainer(callbacks=[recorder], max_epochs=1, val_check_interval="00:00:00:01").fit(TinyModule())
    assert recorder.predicted is None


def test_a_guard_no_validation_can_act_on_is_refused_before_training():
    import torch

    from lightning_compress import IterativePruning
    from tests.conftest import weights_of

    model = TinyModule()
    before = weights_of(model)
    pruning = IterativePruning(0.5, monitor="val_acc", start_epoch=0, end_epoch=1, every_n_epochs=1)
    with pytest.raises(ValueError, match=r"could judge events up to epoch 0; the first event is at epoch 1"):
        trainer(max_epochs=1, callbacks=[pruning]).fit(model)
    after = weights_of(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("accumulate", [1, 3, 4])
def test_a_guarded_fit_with_gradient_accumulation_runs_the_event_its_last_validation_judges(accumulate):
    """Trial AJ: with `accumulate_grad_batches` > 1 the event after the second-to-last validation was planned at the
    step of that validation, where it could not run: a 2-epoch guarded fit ran no event and ended dense."""
    import torch

    from lightning_compress import IterativePruning, sparsity

    torch.manual_seed(0)
    model = TinyModule()
    pruning = IterativePruning(0.9, monitor="val_acc", max_drop=1.0, every_n_steps=1)
    trainer(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[pruning]).fit(model)
    assert pruning.pruner.events >= 1
    assert sparsity(model) == pytest.approx(0.9, abs=2e-3)


@pytest.mark.parametrize(
    "kwargs", [{"max_epochs": 3, "check_val_every_n_epoch": 2}, {"max_epochs": 4, "check_val_every_n_epoch": 3}]
)
def test_a_guarded_fit_that_validates_once_is_refused_unless_the_sanity_check_gives_the_baseline(kwargs):
    """Trial AG: one validation gives the baseline and judges nothing: the fit trained to the end and returned the
    model dense, said only after training. A sanity check asked for every validation batch gives the baseline to
    events in steps from the first epoch."""
    from lightning_compress import IterativePruning, sparsity
    from tests.conftest import weights_of

    model = TinyModule()
    before = weights_of(model)
    pruning = IterativePruning(0.5, monitor="val_acc")
    with pytest.raises(ValueError, match=r"`monitor`='val_acc': no validation runs after a pruning event .* the first "
                       r"validation gives the baseline"):  # fmt: skip
        trainer(callbacks=[pruning], **kwargs).fit(model)
    assert all(torch.equal(before[k], v) for k, v in weights_of(model).items())
    # trial EH: events between epochs come after an epoch the sanity check did not score: it is no baseline for them
    with pytest.raises(ValueError, match=r"the first validation gives the baseline, unless .* prune in steps"):
        pruning = IterativePruning(0.5, monitor="val_acc", max_drop=1.0)
        trainer(callbacks=[pruning], num_sanity_val_steps=-1, **kwargs).fit(TinyModule())
    model = TinyModule()
    pruning = IterativePruning(0.5, monitor="val_acc", max_drop=1.0, every_n_steps=8)
    trainer(callbacks=[pruning], num_sanity_val_steps=-1, **kwargs).fit(model)
    assert sparsity(model) == pytest.approx(0.5, abs=2e-3)  # the one validation judges one event: to the target
    # trial AM: in steps, events waited for judgement after the first one and the fit ended at 0.096 of 0.8
    model = TinyModule()
    pruning = IterativePruning(0.8, monitor="val_acc", max_drop=1.0, every_n_steps=1)
    trainer(callbacks=[pruning], num_sanity_val_steps=-1, **kwargs).fit(model)
    assert sparsity(model) == pytest.approx(0.8, abs=2e-3)


@pytest.mark.parametrize("every", [2, 3, 5])
@pytest.mark.parametrize("end_epoch", [3, None])
def test_a_guarded_fit_with_a_step_cadence_runs_the_event_its_last_validation_judges(every, end_epoch):
    """Trial BR: with `every_n_steps` > 1 the event after the second-to-last validation fell between two cadence
    steps, one step past the last time a validation could judge it: the fit ended at 0.78-0.80 of 0.8, the note
    blaming the schedule. That time is an event too, to the target."""
    import torch

    from lightning_compress import IterativePruning, sparsity

    torch.manual_seed(0)
    model = TinyModule()
    pruning = IterativePruning(0.8, monitor="val_acc", max_drop=1.0, every_n_steps=every, end_epoch=end_epoch)
    trainer(max_epochs=4, callbacks=[pruning]).fit(model)
    assert sparsity(model) == pytest.approx(0.8, abs=2e-3)


@pytest.mark.parametrize("val_dataloaders", [[], None])
def test_a_guarded_fit_given_an_empty_list_of_validation_loaders_is_refused_before_training(val_dataloaders):
    """Trial FU: darts passes `val_dataloaders=[]` when given no validation series; the guard found validations to
    come, the fit trained to its end dense, and the end of fit said "the fit ended before enough of them ran"."""
    from lightning_compress import IterativePruning
    from tests.conftest import weights_of

    model = TinyModule()
    model.val_dataloader = None  # type: ignore[assignment]  # the loaders `fit` is given, none of its own
    before = weights_of(model)
    train = model.train_dataloader()
    with pytest.raises(ValueError, match=r"`monitor`='val_acc': this fit has no validation data \(no validation batch"):
        trainer(callbacks=[IterativePruning(0.8, monitor="val_acc")], max_epochs=4).fit(
            model, train, val_dataloaders=val_dataloaders
        )
    assert all(torch.equal(before[k], v) for k, v in weights_of(model).items())
