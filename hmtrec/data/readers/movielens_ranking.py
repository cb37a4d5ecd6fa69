"""MovieLens-1M as multi-scenario multi-task ranking rows (the M3oE / Scenario-Wise Rec protocol).

Rows: every rating of `ratings_all_users_no_timestamp.csv.gz` (sorted by user, then movie),
joined with users.dat and movies.dat. Scenarios are user age groups {1, 18} / {25} /
{35, 45, 50, 56}; task "click" = rating > 3, task "like" = rating > 4; features user_id,
movie_id, gender, age, occupation, zip, first genre (plus all genres, multi-valued, for
configs that want them). The split is 8:1:1 by row order (the M3oE code's split), so validation
and test rows are mostly users never seen in training; `split="random"` shuffles the rows with a
seed first (the Scenario-Wise Rec code's `random_split`), so every split holds the same users.

Facet columns for per-group evaluation (and MFH facets):
- `user_activity`: "new" when the user has at most `new_user_max_ratings` ratings in the log,
  else "old". Under the row-order split almost no validation/test user has training rows, so
  activity is measured on the whole log (a user attribute known at serving time), not on
  training rows only;
- `item_popularity`: "new" when the movie has at most `new_item_max_ratings` ratings in the
  training rows, else "old".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from hmtrec.errors import DataError
from hmtrec.paths import data_dir

RATINGS_FILE = "ratings_all_users_no_timestamp.csv.gz"
AGE_SCENARIOS = {1: "young", 18: "young", 25: "25-34", 35: "35+", 45: "35+", 50: "35+", 56: "35+"}


@dataclass
class RankingSplits:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    reports: list[str] = field(default_factory=list)   # what reading and filtering removed or changed


def _read_dat(path: Path, names: list[str]) -> pd.DataFrame:
    if not path.exists():
        raise DataError("file not found", file=str(path))
    frame = pd.read_csv(path, sep="::", engine="python", names=names, dtype=str, encoding="latin-1")
    return frame


SplitKind = Literal["row_order", "random"]


def split_rows(frame: pd.DataFrame, fractions: tuple[float, float, float], kind: SplitKind = "row_order",
               seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """`row_order`: the first fractions[0] of rows train, the next fractions[1] valid, the rest test.
    `random`: the same cut after a seeded shuffle of the rows."""
    if kind == "random":
        frame = frame.iloc[np.random.default_rng(seed).permutation(len(frame))]
    elif kind != "row_order":
        raise ValueError(f"unknown split {kind!r}; expected 'row_order' or 'random'")
    return split_by_row_order(frame, fractions)


def split_by_row_order(frame: pd.DataFrame, fractions: tuple[float, float, float]
                       ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """First fractions[0] of rows train, next fractions[1] valid, the rest test."""
    total = sum(fractions)
    n = len(frame)
    n_train = int(round(n * fractions[0] / total))
    n_valid = int(round(n * fractions[1] / total))
    return (frame.iloc[:n_train].reset_index(drop=True), frame.iloc[n_train:n_train + n_valid].reset_index(drop=True),
            frame.iloc[n_train + n_valid:].reset_index(drop=True))


def load_movielens_ranking(path: str | Path | None = None, fractions=(0.8, 0.1, 0.1), max_rows: int | None = None,
                           new_user_max_ratings: int = 50, new_item_max_ratings: int = 20,
                           split: SplitKind = "row_order", split_seed: int = 0) -> RankingSplits:
    folder = Path(path) if path is not None else data_dir() / "movielens-1m"
    ratings_path = folder / RATINGS_FILE
    if not ratings_path.exists():
        raise DataError("file not found (MovieLens-1M ranking ratings)", file=str(ratings_path))
    ratings = pd.read_csv(ratings_path, usecols=["user_id", "movie_id", "rating"], dtype=np.int64)
    reports = [f"{ratings_path.name}: {len(ratings)} ratings read"]
    unmapped = ratings["movie_id"] == -1
    ratings = ratings[~unmapped].reset_index(drop=True)
    reports.append(f"dropped {int(unmapped.sum())} ratings with movie_id=-1 (items missing from the source copy)")
    if max_rows is not None and max_rows < len(ratings):
        ratings = ratings.iloc[:max_rows].reset_index(drop=True)
        reports.append(f"kept the first {max_rows} rows (max_rows)")

    users = _read_dat(folder / "users.dat", ["user_id", "gender", "age", "occupation", "zip"])
    movies = _read_dat(folder / "movies.dat", ["movie_id", "title", "genres"])
    users["user_id"] = users["user_id"].astype(np.int64)
    movies["movie_id"] = movies["movie_id"].astype(np.int64)
    movies["genre"] = movies["genres"].str.split("|", regex=False).str[0]
    rows = ratings.merge(users, on="user_id", how="left", validate="many_to_one")
    rows = rows.merge(movies[["movie_id", "genre", "genres"]], on="movie_id", how="left", validate="many_to_one")
    for column, source in (("gender", "users.dat"), ("genre", "movies.dat")):
        missing = rows[column].isna().to_numpy()
        if missing.any():
            row = int(np.flatnonzero(missing)[0]) + 1
            raise DataError(f"rating refers to an id absent from {source}", file=str(ratings_path), row=row,
                            column="user_id" if source == "users.dat" else "movie_id")
    rows["scenario"] = rows["age"].astype(np.int64).map(AGE_SCENARIOS)
    if rows["scenario"].isna().any():
        row = int(np.flatnonzero(rows["scenario"].isna().to_numpy())[0]) + 1
        raise DataError("age outside the MovieLens age codes", file="users.dat", row=row, column="age")
    rows["click"] = (rows["rating"] > 3).astype(np.int64)
    rows["like"] = (rows["rating"] > 4).astype(np.int64)

    user_counts = rows.groupby("user_id")["movie_id"].transform("size")
    rows["user_activity"] = np.where(user_counts <= new_user_max_ratings, "new", "old")
    train, valid, test = split_rows(rows, tuple(fractions), split, split_seed)
    item_counts = train["movie_id"].value_counts()
    for part in (train, valid, test):
        counts = part["movie_id"].map(item_counts).fillna(0)
        part["item_popularity"] = np.where(counts <= new_item_max_ratings, "new", "old")
    seen_users = set(train["user_id"].unique())
    how = "by row order" if split == "row_order" else f"at random (seed {split_seed})"
    reports.append(f"split {len(train)}/{len(valid)}/{len(test)} rows {how}; "
                   f"{int((~test['user_id'].isin(seen_users)).sum())} test rows are of users absent from training")
    return RankingSplits(train, valid, test, reports)
