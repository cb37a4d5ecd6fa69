"""The smallest sequence config that still trains, validates and evaluates (a few seconds on one
thread): shared by the tests of the layers around training (tuning, tracking)."""

import copy

TINY_SEQUENCE = {
    "kind": "sequence",
    "data": {"source": "synthetic", "synthetic": {"n_items": 200, "level_sizes": [4, 20], "n_sessions": 800,
                                                  "days": 10}},
    "model": {"name": "sasrec", "dim": 16, "layers": 1, "heads": 1},
    "train": {"epochs": 2, "batch_size": 64, "max_len": 8, "threads": 1, "valid_max_sequences": 100},
    "eval": {"ks": [10]},
}


def tiny_sequence(**sections) -> dict:
    """A fresh copy of TINY_SEQUENCE with top-level `sections` added or replaced."""
    return {**copy.deepcopy(TINY_SEQUENCE), **copy.deepcopy(sections)}
