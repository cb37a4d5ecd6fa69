"""The built-in synthetic source (see `hmtrec.data.synthetic` for the generator)."""

from __future__ import annotations

import pandas as pd

from hmtrec.data.readers import SourceData
from hmtrec.data.synthetic import generate


def read(cfg) -> SourceData:
    data = generate(cfg.synthetic, seed=cfg.seed)
    events = pd.DataFrame({"sequence": data.events["sequence"].to_numpy(),
                           "leaf": data.events["item"].to_numpy().astype("int64"),
                           "time": data.events["time"].to_numpy()})
    notes = [f"synthetic: {cfg.synthetic.n_items:,} items, levels {data.taxonomy.level_names}, "
             f"{cfg.synthetic.n_sessions:,} sessions over {cfg.synthetic.days:g} days, seed {cfg.seed}"]
    return SourceData(name="synthetic", events=events, taxonomy=data.taxonomy, leaf_text=data.leaf_text,
                      notes=notes)
