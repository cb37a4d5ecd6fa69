"""GRU4Rec (Hidasi et al., ICLR 2016; Hidasi & Karatzoglou, CIKM 2018), trained with cross-entropy
over the full catalogue.

Choices follow the official GRU4Rec PyTorch implementation (hidasib/GRU4Rec_PyTorch_Official):
- input: the *shared* ("constrained") embedding by default, i.e. the output weight matrix Wy also
  embeds the input item, which is what every published best configuration uses; a separate input
  embedding is an option;
- output: `scores = h Wy^T + b_y`, final activation softmax, cross-entropy on the next item. The
  reference samples negatives (in-batch plus popularity-sampled); here the softmax runs over every
  item by default, and `item_loss: sampled` gives in-batch (plus uniform) negatives with log-Q
  correction instead (`hmtrec.models.sequence.losses`);
- session-parallel mini-batches: `batch_size` sequences advance side by side one event per step;
  when one ends, the next sequence (ordered by start time) takes its slot with a zero hidden state,
  and when none are left the batch shrinks (the reference does the same). The hidden state is
  carried across steps without back-propagating through earlier steps;
- dropout on the input embedding and on the GRU output; weights initialised uniformly in
  ±sqrt(6 / (fan_in + fan_out)) (gate matrices counted per gate), output bias zero.
The one deviation: the spine's Trainer steps with AdamW, where the reference uses Adagrad with
momentum; the defaults below are tuned for AdamW.

`predict` (and `loss` on window batches) runs the GRU from a zero state over a window, which gives
the same hidden states as the session-parallel pass over the same events.
"""

from __future__ import annotations

import heapq
import math
from typing import Iterator, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from hmtrec.data.sequences import PAD, SequenceData
from hmtrec.data.taxonomy import Taxonomy
from hmtrec.models.registry import register_model
from hmtrec.models.sequence.base import SequenceRecommender, target_positions
from hmtrec.models.sequence.losses import ItemLossParams, item_loss


class GRU4RecParams(ItemLossParams):
    hidden_size: int = Field(100, ge=1, description="GRU units per layer (and the shared embedding size).")
    n_layers: int = Field(1, ge=1)
    input_embedding: Literal["shared", "separate"] = Field(
        "shared", description="shared: the output matrix embeds inputs too (the reference's constrained embedding).")
    embedding_dim: int | None = Field(None, ge=1, description="Size of a separate input embedding (default hidden_size).")
    dropout_embedding: float = Field(0.25, ge=0.0, lt=1.0)
    dropout_hidden: float = Field(0.25, ge=0.0, lt=1.0)
    session_order: Literal["time", "shuffled"] = Field(
        "time", description="Order in which sequences enter the session-parallel slots (time: by first event).")


def _uniform_(tensor: torch.Tensor, fan_in: float, fan_out: float) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        tensor.uniform_(-bound, bound)


class GRU4Rec(SequenceRecommender):
    def __init__(self, taxonomy: Taxonomy, params: GRU4RecParams | None = None):
        super().__init__(taxonomy)
        self.params = params = params or GRU4RecParams()
        n_items, hidden = taxonomy.n_leaves, params.hidden_size
        self.output_embedding = nn.Embedding(n_items, hidden)       # Wy
        self.output_bias = nn.Parameter(torch.zeros(n_items))       # b_y
        if params.input_embedding == "separate":
            self.input_embedding = nn.Embedding(n_items, params.embedding_dim or hidden)
            input_size = params.embedding_dim or hidden
        else:
            self.input_embedding = None
            input_size = hidden
        self.embedding_dropout = nn.Dropout(params.dropout_embedding)
        self.gru = nn.GRU(input_size, hidden, num_layers=params.n_layers, batch_first=True,
                          dropout=params.dropout_hidden if params.n_layers > 1 else 0.0)
        self.hidden_dropout = nn.Dropout(params.dropout_hidden)
        self._reset_parameters()
        self._carried: torch.Tensor | None = None  # session-parallel hidden state between steps

    def _reset_parameters(self) -> None:
        n_items, hidden = self.output_embedding.weight.shape
        _uniform_(self.output_embedding.weight, n_items, hidden)
        if self.input_embedding is not None:
            _uniform_(self.input_embedding.weight, *self.input_embedding.weight.shape)
        for name, weight in self.gru.named_parameters():
            if name.startswith("weight"):
                # [3H, fan_in]: scale as three gate matrices of [H, fan_in]
                _uniform_(weight, weight.shape[1], weight.shape[0] / 3)
            else:
                nn.init.zeros_(weight)

    # ---- the network ------------------------------------------------------------------------
    def _embed(self, items: torch.Tensor) -> torch.Tensor:
        table = self.input_embedding if self.input_embedding is not None else self.output_embedding
        return self.embedding_dropout(table(items.clamp(min=0)))

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hidden_dropout(hidden) @ self.output_embedding.weight.T + self.output_bias

    def _window_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """GRU outputs at the target positions of a window batch, row-major: [M, H]."""
        outputs, _ = self.gru(self._embed(batch["inputs"]))
        return outputs[target_positions(batch)]

    def predict(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.taxonomy.leaf_level: self._scores(self._window_hidden(batch))}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if "state_index" in batch:
            hidden, targets = self._parallel_step(batch), batch["targets"]
            keep = targets != PAD
            hidden, targets = hidden[keep], targets[keep]
        else:
            hidden = self._window_hidden(batch)
            targets = batch["targets"][target_positions(batch)]
        if len(targets) == 0:  # a step with no target still advanced the hidden state
            zero = self.output_bias.sum() * 0.0
            return zero, {"cross_entropy": 0.0}
        loss = item_loss(self.hidden_dropout(hidden), self.output_embedding.weight, self.output_bias, targets,
                         self.params)
        return loss, {"cross_entropy": float(loss.detach())}

    def _parallel_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One session-parallel step: inputs [S] (one event per slot), state_index [S] = the row of
        the previous step's state that each slot continues, or -1 for a sequence starting now."""
        inputs, state_index = batch["inputs"], batch["state_index"]
        layers, hidden = self.params.n_layers, self.params.hidden_size
        start = torch.zeros(layers, len(inputs), hidden, device=inputs.device)
        if self._carried is not None and bool((state_index >= 0).any()):
            continued = state_index >= 0
            start[:, continued] = self._carried[:, state_index[continued]]
        outputs, final = self.gru(self._embed(inputs)[:, None, :], start)
        self._carried = final.detach()
        return outputs[:, 0]

    # ---- session-parallel batches -----------------------------------------------------------
    def training_batches(self, train: SequenceData, epoch: int, batch_size: int, max_len: int | None = None
                         ) -> Iterator[dict[str, torch.Tensor]]:
        """Session-parallel steps over the whole training data (max_len does not apply: the hidden
        state carries each sequence's full history). Deterministic given the epoch."""
        self._carried = None
        targets = train.targets()
        order = self._sequence_order(train, epoch)
        begin, end = train.offsets[:-1][order], train.offsets[1:][order]
        next_sequence = min(batch_size, len(order))
        cursor, stop = begin[:next_sequence].copy(), end[:next_sequence].copy()
        state_index = np.full(len(cursor), -1, dtype=np.int64)
        while len(cursor):
            step_targets = np.where(targets[cursor + 1], train.leaves[cursor + 1], PAD)
            yield {"inputs": torch.from_numpy(train.leaves[cursor].copy()),
                   "targets": torch.from_numpy(step_targets),
                   "state_index": torch.from_numpy(state_index.copy()),
                   "input_events": torch.from_numpy(cursor.copy())}  # event index of each input
            cursor += 1
            row = np.arange(len(cursor))
            finished = cursor + 1 >= stop
            n_new = min(int(finished.sum()), len(order) - next_sequence)
            refill = np.flatnonzero(finished)[:n_new]
            cursor[refill] = begin[next_sequence:next_sequence + n_new]
            stop[refill] = end[next_sequence:next_sequence + n_new]
            next_sequence += n_new
            state_index = np.where(finished, -1, row)
            alive = ~finished
            alive[refill] = True
            cursor, stop, state_index = cursor[alive], stop[alive], state_index[alive]

    def training_steps(self, train: SequenceData, batch_size: int, max_len: int | None = None) -> int:
        """Number of batches `training_batches` yields per epoch (for progress bars): a freed slot
        always takes the next sequence, so the steps are the longest slot's total."""
        slots = [0] * min(batch_size, train.n_sequences)
        for steps in (train.lengths[self._sequence_order(train, 1)] - 1).tolist():
            heapq.heapreplace(slots, slots[0] + steps)
        return max(slots, default=0)

    def _sequence_order(self, train: SequenceData, epoch: int) -> np.ndarray:
        """Sequences with at least one target after their first event, in slot-filling order."""
        usable = np.flatnonzero(train.lengths >= 2)
        if self.params.session_order == "shuffled":
            return np.random.default_rng(epoch).permutation(usable)
        if train.timestamps is not None and train.n_events:
            first_time = train.timestamps[train.offsets[:-1][usable]]
            return usable[np.argsort(first_time, kind="stable")]
        return usable


@register_model("sequence", "gru4rec", params=GRU4RecParams)
def build_gru4rec(params: GRU4RecParams, *, taxonomy: Taxonomy, **_):
    return GRU4Rec(taxonomy, params)
