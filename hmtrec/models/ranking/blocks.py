"""Small reusable blocks for multi-task rankers: feature embedding, MLPs, expert banks, gates,
CGC (customised gate control) layers and per-task towers.

Expert banks run all their experts in one batched matrix product (weights [E, in, out]) rather
than a Python loop over experts, which is what makes MMoE/PLE/HiNet/MFH cheap on CPU.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from hmtrec.data.features import MULTI_PAD, FeatureLayout


class FeatureEmbedding(nn.Module):
    """Encoded row -> one flat vector: an embedding per categorical column (one shared table with
    offsets, so one gather), mean-pooled embeddings per multi-valued column, the standardised
    numeric values, and optionally the scenario as one more embedded column.

    Embeddings start near zero (`init_std`); the out-of-vocabulary row starts at exactly zero, so
    an unseen id (e.g. a user absent from training) begins as "no information"."""

    def __init__(self, layout: FeatureLayout, dim: int, init_std: float = 1e-4, scenario_as_feature: bool = True):
        super().__init__()
        sizes = [size for _, size in layout.categorical]
        self.scenario_as_feature = scenario_as_feature and layout.scenario is not None
        if self.scenario_as_feature:
            sizes.append(layout.n_scenarios)
        self.n_fields = len(sizes)
        self.register_buffer("offsets", torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0), persistent=False)
        self.table = nn.Embedding(max(sum(sizes), 1), dim)
        self.multi_columns = [column for column, _, _ in layout.multi_valued]
        self.multi = nn.ModuleDict({str(i): nn.Embedding(size, dim, padding_idx=MULTI_PAD)
                                    for i, (_, size, _) in enumerate(layout.multi_valued)})
        self.n_numeric = len(layout.numeric)
        self.dim = dim
        with torch.no_grad():
            self.table.weight.normal_(0, init_std)
            # the categorical OOV rows (index 0 of each categorical column) start at zero
            n_categorical = len(layout.categorical)
            self.table.weight[self.offsets[:n_categorical]] = 0
            for embedding in self.multi.values():
                embedding.weight.normal_(0, init_std)
                embedding.weight[MULTI_PAD] = 0

    @property
    def output_dim(self) -> int:
        return (self.n_fields + len(self.multi_columns)) * self.dim + self.n_numeric

    def field_embeddings(self, batch: dict) -> torch.Tensor:
        """[B, n_fields + n_multi, dim] (numeric values are not included)."""
        indices = batch["categorical"]
        if self.scenario_as_feature:
            indices = torch.cat([indices, batch["scenario"].unsqueeze(1)], dim=1)
        parts = [self.table(indices + self.offsets)] if self.n_fields else []
        for i, column in enumerate(self.multi_columns):
            values = batch[f"multi:{column}"]
            present = (values != MULTI_PAD).unsqueeze(-1).float()
            pooled = (self.multi[str(i)](values) * present).sum(1) / present.sum(1).clamp(min=1)
            parts.append(pooled.unsqueeze(1))
        return torch.cat(parts, dim=1)

    def squared_norm(self, batch: dict) -> torch.Tensor:
        """Mean over rows of the summed squared norms of the row's embeddings (for an L2 penalty)."""
        return self.field_embeddings(batch).pow(2).sum((1, 2)).mean()

    def forward(self, batch: dict) -> torch.Tensor:
        flat = self.field_embeddings(batch).flatten(1)
        if self.n_numeric:
            flat = torch.cat([flat, batch["numeric"]], dim=1)
        return flat


class LinearTerms(nn.Module):
    """First-order terms: a scalar per (id, task) for every categorical column of a FeatureEmbedding
    (same offsets, so one gather), summed over columns: [B, n_tasks]. Starts at 0; out-of-vocabulary
    rows are held at 0 unless training replaces ids by OOV (`oov_rate`), which then learns them."""

    def __init__(self, embedding: FeatureEmbedding, n_tasks: int):
        super().__init__()
        self.n_categorical = len(embedding.offsets) - int(embedding.scenario_as_feature)
        self.register_buffer("offsets", embedding.offsets[:self.n_categorical].clone(), persistent=False)
        self.weight = nn.Embedding(embedding.table.num_embeddings, n_tasks)
        nn.init.zeros_(self.weight.weight)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.weight(batch["categorical"] + self.offsets).sum(1)


class MLP(nn.Sequential):
    """Linear -> ReLU -> Dropout for each hidden size; `output_dim` is the last hidden size."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(in_dim, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = size
        super().__init__(*layers)
        self.output_dim = in_dim


class ExpertBank(nn.Module):
    """E independent MLP experts evaluated together (weights [E, in, out] per layer).

    forward(x): x is [B, in] (every expert sees the same input) or [B, I, in] with E a multiple of I,
    where experts are laid out input by input: experts [i * E/I, (i + 1) * E/I) read x[:, i].
    Returns [B, E, out]. The first layer is one batched GEMM per distinct input, the next ones
    one batched GEMM over experts. With `final_linear` the last layer has no ReLU (towers, gates)."""

    def __init__(self, n_experts: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0,
                 final_linear: bool = False):
        super().__init__()
        if not hidden:
            raise ValueError("an expert needs at least one layer")
        self.n_experts = n_experts
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        sizes = [in_dim] + list(hidden)
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(n_experts, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n_experts, fan_out).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.final_linear = final_linear
        self.output_dim = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        batch, n_inputs, _ = x.shape
        if self.n_experts % n_inputs:
            raise ValueError(f"{self.n_experts} experts cannot be split over {n_inputs} inputs")
        per_input = self.n_experts // n_inputs
        n_layers = len(self.weights)
        h = x.transpose(0, 1)                                         # [I, B, in]
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            n_experts, fan_in, fan_out = weight.shape
            if layer == 0:    # experts reading the same input: their weights side by side, one GEMM
                grouped = weight.view(n_inputs, per_input, fan_in, fan_out).permute(0, 2, 1, 3)
                h = torch.bmm(h, grouped.reshape(n_inputs, fan_in, per_input * fan_out))
                h = h.view(n_inputs, batch, per_input, fan_out).transpose(1, 2).reshape(n_experts, batch, fan_out)
            else:
                h = torch.bmm(h, weight)                              # [E, B, out]
            h = h + bias.unsqueeze(1)
            if not (self.final_linear and layer == n_layers - 1):
                h = self.dropout(torch.relu(h))
        return h.transpose(0, 1)                                      # [B, E, out]


def mix(experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of expert outputs: experts [..., E, D], weights [..., E] -> [..., D]."""
    return (experts * weights.unsqueeze(-1)).sum(-2)


class Gate(nn.Module):
    """Softmax weights over experts from a gate input: [B, in] -> [B, E]."""

    def __init__(self, in_dim: int, n_experts: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x), dim=-1)


class CGC(nn.Module):
    """Customised gate control (Tang et al., RecSys 2020), for G independent groups at once.

    Each group has K branches (tasks, scenarios, facet values): S shared experts, P specific
    experts per branch, and per branch a softmax gate mixing its own P and the S shared experts.
    With `shared_output` each group also has a gate mixing all its experts, whose output a stacked
    (PLE) layer takes as its next shared input. G > 1 runs many small switchers (e.g. one per tree
    path in MFH) as a few batched products.

    forward(branch_inputs, shared_input=None):
      branch_inputs [B, in] (G = 1) or [B, G, in]: every branch of a group reads the same input,
      which is also the shared input; or [B, G, K, in]: one input per branch (then `shared_input`
      [B, G, in] is required).
    Returns [B, G, K, D] (squeezed to [B, K, D] when the input had no group axis) and, with
    `shared_output`, the shared representation [B, G, D] (or [B, D])."""

    def __init__(self, in_dim: int, n_branches: int, n_shared: int, n_specific: int, hidden: Sequence[int],
                 dropout: float = 0.0, shared_output: bool = False, n_groups: int = 1):
        super().__init__()
        if n_shared + n_specific < 1:
            raise ValueError("a CGC layer needs at least one expert per branch")
        self.n_groups, self.n_branches, self.n_shared, self.n_specific = n_groups, n_branches, n_shared, n_specific
        groups_branches = n_groups * n_branches
        self.specific = ExpertBank(groups_branches * n_specific, in_dim, hidden, dropout) if n_specific else None
        self.shared = ExpertBank(n_groups * n_shared, in_dim, hidden, dropout) if n_shared else None
        self.gates = ExpertBank(groups_branches, in_dim, [n_specific + n_shared], final_linear=True)
        self.shared_gate = (ExpertBank(n_groups, in_dim, [n_branches * n_specific + n_shared], final_linear=True)
                            if shared_output else None)
        self.output_dim = hidden[-1]

    def forward(self, branch_inputs: torch.Tensor, shared_input: torch.Tensor | None = None):
        grouped = branch_inputs.dim() > 2
        if not grouped:
            branch_inputs = branch_inputs.unsqueeze(1)
            shared_input = None if shared_input is None else shared_input.unsqueeze(1)
        batch, G, K = branch_inputs.shape[0], self.n_groups, self.n_branches
        if branch_inputs.dim() == 4:
            if shared_input is None:
                raise ValueError("per-branch inputs need a shared input")
            branch_inputs = branch_inputs.flatten(1, 2)               # [B, G*K, in]
        elif shared_input is None:
            shared_input = branch_inputs                              # [B, G, in]
        pools, everything = [], []
        if self.specific is not None:
            specific = self.specific(branch_inputs).reshape(batch, G, K, self.n_specific, -1)
            pools.append(specific)
            everything.append(specific.flatten(2, 3))
        if self.shared is not None:
            shared = self.shared(shared_input).reshape(batch, G, self.n_shared, -1)
            pools.append(shared.unsqueeze(2).expand(-1, -1, K, -1, -1))
            everything.append(shared)
        experts = torch.cat(pools, dim=3)                             # [B, G, K, P+S, D]
        gates = torch.softmax(self.gates(branch_inputs).reshape(batch, G, K, -1), dim=-1)
        out = mix(experts, gates)                                     # [B, G, K, D]
        if not grouped:
            out = out.squeeze(1)
        if self.shared_gate is None:
            return out
        shared_weights = torch.softmax(self.shared_gate(shared_input).reshape(batch, G, -1), dim=-1)
        shared_out = mix(torch.cat(everything, dim=2), shared_weights)  # [B, G, D]
        return out, (shared_out if grouped else shared_out.squeeze(1))


class Towers(nn.Module):
    """One MLP tower per head, evaluated together: [B, K, in] or [B, in] -> logits [B, K]."""

    def __init__(self, n_towers: int, in_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.bank = ExpertBank(n_towers, in_dim, list(hidden) + [1], dropout, final_linear=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bank(x).squeeze(-1)


class RatePrior(nn.Module):
    """A fixed per-task logit offset from smoothed training rates (`model.rate_prior`): the logit of
    a rate baseline of hmtrec/models/ranking/rates.py (movie, movie + user or movie x demographic),
    fitted once on the encoded training rows and held in buffers (saved with the weights, never
    trained), so the network learns only the residual. Columns are categorical features, or the
    scenario column (or the word `scenario`). Regression tasks get no offset."""

    def __init__(self, layout: FeatureLayout, kind: str, item: str, user: str, demographics: Sequence[str],
                 smoothing: float, key: str = "model.rate_prior"):
        super().__init__()
        positions = {name: i for i, (name, _) in enumerate(layout.categorical)}
        self.sizes = {name: size for name, size in layout.categorical}
        if layout.scenario is not None:
            for name in dict.fromkeys(["scenario", layout.scenario]):
                positions.setdefault(name, "scenario")
                self.sizes.setdefault(name, layout.n_scenarios)
        self.kind, self.item, self.user, self.smoothing = kind, item, user, smoothing
        self.demographics = list(demographics) if kind == "movie-demographic" else []
        needed = [item] + ([user] if kind == "movie+user" else []) + self.demographics
        unknown = [c for c in needed if c not in positions]
        if unknown:
            raise ValueError(f"{key} names columns that are not categorical features or the scenario: "
                             f"{unknown}; known: {list(positions)}")
        self.positions = {c: positions[c] for c in needed}
        self.binary = [i for i, task in enumerate(layout.tasks) if task.type == "binary"]
        self.task_names = layout.task_names
        n_tasks = len(layout.tasks)
        self.register_buffer("movie", torch.zeros(self.sizes[item], n_tasks))
        if kind == "movie+user":
            self.register_buffer("user_delta", torch.zeros(self.sizes[user], n_tasks))
        for i, column in enumerate(self.demographics):
            self.register_buffer(f"demographic_{i}", torch.zeros(self.sizes[item], self.sizes[column], n_tasks))

    def _codes(self, batch: dict, column: str) -> torch.Tensor:
        position = self.positions[column]
        return batch["scenario"] if position == "scenario" else batch["categorical"][:, position]

    def fit(self, rows) -> "RatePrior":
        """Fill the tables from encoded training rows (`hmtrec.data.features.EncodedRows`)."""
        import pandas as pd

        from hmtrec.models.ranking.rates import RateBaseline

        batch = rows.batch(slice(None))
        frame = pd.DataFrame({column: self._codes(batch, column).numpy() for column in self.positions})
        tasks = [self.task_names[i] for i in self.binary]
        for i in self.binary:
            labels = rows.labels[:, i].numpy().astype("float64")
            frame[self.task_names[i]] = pd.Series(labels).where(rows.label_mask[:, i].numpy())
        rates = RateBaseline(self.kind, item=self.item, user=self.user, demographics=tuple(self.demographics),
                             smoothing=self.smoothing).fit(frame, tasks)
        tables = rates.logit_tables({column: self.sizes[column] for column in self.positions})
        with torch.no_grad():
            for i in self.binary:
                table = tables[self.task_names[i]]
                self.movie[:, i] = torch.as_tensor(table["movie"], dtype=torch.float32)
                if "user" in table:
                    self.user_delta[:, i] = torch.as_tensor(table["user"], dtype=torch.float32)
                for j, column in enumerate(self.demographics):
                    getattr(self, f"demographic_{j}")[:, :, i] = torch.as_tensor(table["demographic"][column],
                                                                                  dtype=torch.float32)
        return self

    def forward(self, batch: dict) -> torch.Tensor:
        """[B, n_tasks]: the rate's logit for each row and task (0 for regression tasks)."""
        items = self._codes(batch, self.item)
        offset = self.movie[items]
        if self.kind == "movie+user":
            offset = offset + self.user_delta[self._codes(batch, self.user)]
        for j, column in enumerate(self.demographics):
            offset = offset + getattr(self, f"demographic_{j}")[items, self._codes(batch, column)]
        return offset


class RateBlend(nn.Module):
    """`model.rate_blend`: after training, each binary task's logit mixed with a rate baseline's,
    (1 - w) * network + w * rate, the rate (kind and smoothing) and w per task chosen on the
    validation rows (hmtrec/models/ranking/rate_blend.py). One `RatePrior` per candidate kind holds
    its tables; `choice` (the chosen kind's index, -1 before fitting) and `weights` [n_tasks] are
    buffers saved with the weights. Until fitted the weights are 0 and the forward pass is the
    network's alone, so training is exactly that of a model without it."""

    def __init__(self, layout: FeatureLayout, kinds: Sequence[str], item: str, user: str,
                 demographics: Sequence[str]):
        super().__init__()
        self.kinds = list(kinds)
        self.priors = nn.ModuleDict({kind: RatePrior(layout, kind, item, user, demographics, 0.0,
                                                     key="model.rate_blend") for kind in self.kinds})
        self.binary = [i for i, task in enumerate(layout.tasks) if task.type == "binary"]
        self.register_buffer("choice", torch.tensor(-1))
        self.register_buffer("weights", torch.zeros(len(layout.tasks)))

    @property
    def active(self) -> bool:
        return int(self.choice) >= 0 and bool((self.weights > 0).any())

    @property
    def chosen(self) -> RatePrior:
        return self.priors[self.kinds[int(self.choice)]]

    @contextmanager
    def suspended(self):
        """The network alone for the time of the block (the ablation figures)."""
        weights = self.weights.clone()
        self.weights.zero_()
        try:
            yield
        finally:
            self.weights.copy_(weights)

    def mix(self, outputs: dict[str, torch.Tensor], batch: dict, task_names: Sequence[str]) -> dict[str, torch.Tensor]:
        rate = self.chosen(batch)
        mixed = dict(outputs)
        for i in self.binary:
            w = self.weights[i]
            mixed[task_names[i]] = (1 - w) * outputs[task_names[i]] + w * rate[:, i]
        return mixed
