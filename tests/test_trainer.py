import torch
from torch import nn

from hmtrec.train.trainer import Trainer, TrainerSettings


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.dropout = nn.Dropout(0.2)

    def loss(self, batch):
        prediction = self.linear(self.dropout(batch["x"])).squeeze(1)
        loss = ((prediction - batch["y"]) ** 2).mean()
        return loss, {"mse": float(loss.detach())}


def batches(epoch):
    generator = torch.Generator().manual_seed(epoch)
    for _ in range(5):
        x = torch.randn(32, 3, generator=generator)
        yield {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3}


def validation(model):
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(99))
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    return {"neg_mse": -float(((model.linear(x).squeeze(1) - y) ** 2).mean())}


def settings(**extra):
    return TrainerSettings(epochs=4, lr=0.05, seed=3, monitor="neg_mse", **extra)


class Interrupted(Exception):
    pass


def reference_and_resumed(trainer_settings: TrainerSettings, root, *fit_args):
    """A run straight through, and the same run killed after epoch 2 and resumed into fresh weights:
    (reference model, resumed model, resumed run's final state)."""
    torch.manual_seed(0)
    reference = Regression()
    Trainer(reference, trainer_settings, root / "a", validate=validation).fit(batches, *fit_args)

    def crash_after_epoch_2(state):
        if state.epoch == 2:
            raise Interrupted

    torch.manual_seed(0)
    try:
        Trainer(Regression(), trainer_settings, root / "b", validate=validation,
                on_epoch_end=crash_after_epoch_2).fit(batches, *fit_args)
    except Interrupted:
        pass
    else:
        raise AssertionError("the run was not interrupted")
    resumed = Regression()  # fresh weights: everything must come from the checkpoint
    state = Trainer(resumed, trainer_settings, root / "b", validate=validation).fit(batches, *fit_args)
    return reference, resumed, state


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    reference, resumed, state = reference_and_resumed(settings(), tmp_path)
    assert state.epoch == 4
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor)


def test_training_reduces_loss_and_keeps_best_epoch(tmp_path):
    torch.manual_seed(0)
    model = Regression()
    state = Trainer(model, settings(), tmp_path, validate=validation).fit(batches)
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    assert state.best_value == max(record["valid_neg_mse"] for record in state.history)
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "best.safetensors").exists()


def test_early_stopping_is_remembered_on_resume(tmp_path):
    torch.manual_seed(0)
    never_improves = lambda model: {"neg_mse": -1.0}  # noqa: E731
    first = Trainer(Regression(), settings(patience=1), tmp_path, validate=never_improves).fit(batches)
    assert first.stopped_early and first.epoch == 2
    again = Trainer(Regression(), settings(patience=1), tmp_path, validate=never_improves).fit(batches)
    assert again.epoch == 2
