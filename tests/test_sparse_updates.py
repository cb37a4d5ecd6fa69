"""`train.sparse_updates`: sparse gradients and lazy Adam for HierSRec's item tables under the
sampled item loss, and the blocked linear + cross-entropy that loss runs on."""

import pytest
import torch
import torch.nn.functional as F

from hmtrec.errors import ConfigError
from hmtrec.models.sequence import losses
from hmtrec.models.sequence.losses import linear_cross_entropy_rows
from hmtrec.rundir import load_tensors, save_tensors
from hmtrec.train.trainer import CHECKPOINT, SparseDenseAdam, Trainer, TrainerSettings, resolve_sparse_updates
from tests.test_hiersrec import batch_of, build

torch.set_num_threads(1)

SEQUENCES = [[[0, 1, 2], [3, 4]], [[1, 0], [5, 3, 4]], [[2, 3], [4, 5, 0]]]   # three batches


@pytest.mark.parametrize("block", [losses._LINEAR_CE_BLOCK, 7])   # one block; several (and a ragged last)
def test_linear_cross_entropy_rows_equals_the_softmax_of_the_matmul(monkeypatch, block):
    monkeypatch.setattr(losses, "_LINEAR_CE_BLOCK", block)
    torch.manual_seed(0)
    query, weight, bias = (torch.randn(5, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True),
                           torch.randn(3, requires_grad=True))
    targets, upstream = torch.tensor([0, 2, 1, 2, 0]), torch.rand(5)
    rows = linear_cross_entropy_rows(query, weight, bias, targets)
    (rows * upstream).sum().backward()
    grads = [query.grad, weight.grad, bias.grad]
    query.grad = weight.grad = bias.grad = None
    expected = F.cross_entropy(query @ weight.T + bias, targets, reduction="none")
    (expected * upstream).sum().backward()
    torch.testing.assert_close(rows, expected)
    for got, want in zip(grads, [query.grad, weight.grad, bias.grad]):
        torch.testing.assert_close(got, want)


def batches_of(sequences):
    def batches(epoch):
        for batch in sequences:
            yield batch_of(batch)
    return batches


def trained(sparse, sequences, root=None, epochs=1, **settings):
    torch.manual_seed(0)
    model = build(item_loss="sampled", uniform_negatives=2, dropout=0.0)
    trainer = Trainer(model, TrainerSettings(epochs=epochs, lr=0.01, seed=1, sparse_updates=sparse, **settings),
                      root)
    trainer.fit(batches_of(sequences))
    return model, trainer


@pytest.mark.parametrize("grad_clip", [None, 1e-3])   # 1e-3: the clip acts, over sparse and dense gradients
def test_a_sparse_step_equals_the_dense_adamw_step(grad_clip):
    dense, _ = trained(False, SEQUENCES[:1], grad_clip=grad_clip)
    sparse, trainer = trained(True, SEQUENCES[:1], grad_clip=grad_clip)
    assert isinstance(trainer.optimizer, SparseDenseAdam) and trainer.state.sparse_updates
    assert sparse.leaf_vectors.item_ids.sparse
    for name, tensor in dense.state_dict().items():
        torch.testing.assert_close(sparse.state_dict()[name], tensor, msg=name)


def test_lazy_adam_leaves_rows_a_step_did_not_use():
    # item 5 is a target in the first batch only (no uniform negatives: candidates = the batch's targets)
    first, second = [[0, 5], [1, 2]], [[0, 1], [2, 3]]
    rows = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        model = build(item_loss="sampled", dropout=0.0)
        trainer = Trainer(model, TrainerSettings(epochs=1, lr=0.01, sparse_updates=sparse))
        trainer.fit(batches_of([first]))
        after_first = model.leaf_vectors.item_ids.weight[5].detach().clone()
        trainer.state.epoch = 0
        trainer.fit(batches_of([second]))
        rows[sparse] = (after_first, model.leaf_vectors.item_ids.weight[5].detach())
    assert torch.equal(*rows[True])            # lazy: untouched rows keep their weights
    assert not torch.equal(*rows[False])       # AdamW moves them on their momentum


def test_resuming_with_sparse_updates_matches_the_uninterrupted_run(tmp_path):
    reference, _ = trained("auto", SEQUENCES, tmp_path / "a", epochs=3)

    class Interrupted(Exception):
        pass

    def crash_after_epoch_1(state):
        if state.epoch == 1:
            raise Interrupted

    torch.manual_seed(0)
    model = build(item_loss="sampled", uniform_negatives=2, dropout=0.0)
    with pytest.raises(Interrupted):
        Trainer(model, TrainerSettings(epochs=3, lr=0.01, seed=1, sparse_updates="auto"), tmp_path / "b",
                on_epoch_end=crash_after_epoch_1).fit(batches_of(SEQUENCES))
    torch.manual_seed(5)   # other initial weights: everything must come from the checkpoint
    resumed = build(item_loss="sampled", uniform_negatives=2, dropout=0.0)
    trainer = Trainer(resumed, TrainerSettings(epochs=3, lr=0.01, seed=1, sparse_updates="auto"), tmp_path / "b")
    trainer.fit(batches_of(SEQUENCES))
    assert trainer.state.sparse_updates and trainer.state.epoch == 3
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_a_checkpoint_from_before_the_switch_resumes_dense(tmp_path):
    trained(False, SEQUENCES, tmp_path, epochs=1)
    saved = load_tensors(tmp_path / CHECKPOINT)
    del saved["state"]["sparse_updates"]
    save_tensors(tmp_path / CHECKPOINT, saved)
    _, trainer = trained("auto", SEQUENCES, tmp_path, epochs=2)
    assert trainer.state.epoch == 2 and trainer.state.sparse_updates is False
    assert isinstance(trainer.optimizer, torch.optim.AdamW)


def test_auto_turns_sparse_updates_on_only_where_they_apply():
    sampled, full = build(item_loss="sampled"), build(item_loss="full")
    assert resolve_sparse_updates(TrainerSettings(sparse_updates="auto"), sampled)
    assert not resolve_sparse_updates(TrainerSettings(sparse_updates="auto"), full)
    assert not resolve_sparse_updates(TrainerSettings(sparse_updates="auto", weight_decay=0.1), sampled)
    assert not resolve_sparse_updates(TrainerSettings(sparse_updates=False), sampled)
    with pytest.raises(ConfigError, match="train.sparse_updates.*weight_decay"):
        resolve_sparse_updates(TrainerSettings(sparse_updates=True, weight_decay=0.1), sampled)
    with pytest.raises(ConfigError, match="train.sparse_updates.*item_loss: sampled"):
        resolve_sparse_updates(TrainerSettings(sparse_updates=True), full)


def test_the_train_key_reaches_the_trainer():
    from hmtrec.pipelines.sequence import TrainSection

    assert TrainSection().trainer_settings().sparse_updates == "auto"
    assert TrainSection(sparse_updates=False).trainer_settings().sparse_updates is False
    with pytest.raises(ValueError):
        TrainSection(sparse_updates="sometimes")
