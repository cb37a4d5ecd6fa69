"""Real engagement tables for calibration experiments.

Diginetica view -> purchase (CIKM Cup 2016): one row per (session, item) viewed in the sample views
file, label = the item was bought in that session (train-purchases). Features use only what is known
when the session's views are seen, plus purchase statistics from other sessions dated before the
evaluation period (so held-out rows never see their own period's purchases).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from hmtrec.errors import DataError
from hmtrec.paths import data_dir as default_data_dir

VIEWS = "sample_train-item-views.csv"
PURCHASES = "train-purchases.csv.gz"
CATEGORIES = "product-categories.csv.gz"
FEATURES = ["log_item_views_session", "log_session_length", "log_session_items", "is_last_viewed",
            "log_item_popularity", "log_item_purchases_before", "log_category_purchases_before"]


@dataclass
class PurchaseTable:
    frame: pd.DataFrame
    """session_id, item_id, split (train/valid/test by session start), features, purchase_label."""
    features: list[str]
    report: dict


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataError("Diginetica file is missing", file=str(path))
    frame = pd.read_csv(path, sep=";")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"expected columns {columns}, found {list(frame.columns)}", file=str(path),
                        column=missing[0])
    return frame


def diginetica_purchase_table(path: str | Path | None = None, fractions=(0.6, 0.2, 0.2)) -> PurchaseTable:
    """Build the view -> purchase table; sessions are split in time order (by first view date)."""
    folder = Path(path) if path is not None else default_data_dir() / "diginetica"
    views = _read(folder / VIEWS, ["session_id", "item_id", "timeframe", "eventdate"])
    purchases = _read(folder / PURCHASES, ["sessionId", "itemId", "eventdate"])
    categories = _read(folder / CATEGORIES, ["itemId", "categoryId"])

    views = views.sort_values(["session_id", "timeframe"], kind="stable")
    start = views.groupby("session_id")["eventdate"].min().sort_values(kind="stable")
    sessions = start.index.to_numpy()
    cut = np.cumsum(np.round(np.array(fractions[:2]) * len(sessions)).astype(int))
    split_of = pd.Series(np.where(np.arange(len(sessions)) < cut[0], "train",
                                  np.where(np.arange(len(sessions)) < cut[1], "valid", "test")), index=sessions)
    evaluation_start = start.iloc[cut[0]]  # the first day of the validation sessions

    pairs = views.groupby(["session_id", "item_id"], sort=False).size().rename("item_views_session").reset_index()
    session_length = views.groupby("session_id").size()
    session_items = views.groupby("session_id")["item_id"].nunique()
    last_item = views.groupby("session_id")["item_id"].last()
    pairs["session_length"] = pairs["session_id"].map(session_length).to_numpy()
    pairs["session_items"] = pairs["session_id"].map(session_items).to_numpy()
    pairs["is_last_viewed"] = (pairs["item_id"].to_numpy() == pairs["session_id"].map(last_item).to_numpy())
    pairs["split"] = pairs["session_id"].map(split_of).to_numpy()

    # Popularity among the training sessions' views only.
    train_views = views[views["session_id"].map(split_of) == "train"]
    pairs["item_popularity"] = pairs["item_id"].map(train_views.groupby("item_id").size()).fillna(0).to_numpy()
    # Purchases in sessions outside the views sample, dated before the evaluation period.
    sampled = set(sessions.tolist())
    earlier = purchases[(~purchases["sessionId"].isin(sampled)) & (purchases["eventdate"] < evaluation_start)]
    item_purchases = earlier.groupby("itemId").size()
    category_of = categories.drop_duplicates("itemId").set_index("itemId")["categoryId"]
    category_purchases = earlier["itemId"].map(category_of).value_counts()
    pairs["item_purchases_before"] = pairs["item_id"].map(item_purchases).fillna(0).to_numpy()
    pairs["category_purchases_before"] = (pairs["item_id"].map(category_of).map(category_purchases)
                                          .fillna(0).to_numpy())

    bought = set(zip(purchases["sessionId"], purchases["itemId"]))
    pairs["purchase_label"] = np.fromiter(((s, i) in bought for s, i in zip(pairs["session_id"], pairs["item_id"])),
                                          dtype=bool, count=len(pairs)).astype(np.int8)
    for name in ("item_views_session", "session_length", "session_items", "item_popularity", "item_purchases_before",
                 "category_purchases_before"):
        pairs[f"log_{name}"] = np.log1p(pairs[name].astype(np.float64))
    pairs["is_last_viewed"] = pairs["is_last_viewed"].astype(np.float64)
    report = {"views": int(len(views)), "sessions": int(len(sessions)), "rows": int(len(pairs)),
              "positives": int(pairs["purchase_label"].sum()),
              "evaluation_start": str(evaluation_start),
              "purchases_used_as_features": int(len(earlier)),
              "rows_by_split": pairs["split"].value_counts().to_dict(),
              "positives_by_split": pairs.groupby("split")["purchase_label"].sum().astype(int).to_dict()}
    return PurchaseTable(pairs, FEATURES, report)
