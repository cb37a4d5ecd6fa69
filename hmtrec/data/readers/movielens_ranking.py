"""MovieLens-1M as multi-scenario multi-task ranking rows, under three named protocols (presets).

Every row is one rating joined with users.dat and movies.dat. Scenarios are user age groups
{1, 18} / {25} / {35, 45, 50, 56}; task "click" = rating > 3, task "like" = rating > 4; features
user_id, movie_id, gender, age, occupation, zip, first genre (plus all genres, multi-valued, for
configs that want them). Each preset fixes the rows, their order and the 8:1:1 split:

- `m3oe-code` (default): the row order and split of M3oE's released code
  (Applied-Machine-Learning-Lab/M3oE, examples/run_movielens.py, which reads torch-rechub's
  `ml-1m.csv` = `pd.merge(pd.merge(ratings, movies), users)` and cuts it 8:1:1 by row order,
  no shuffle). Under pandas < 2.2 an inner merge groups rows by the left key in order of first
  appearance, so the file is: users in order of their first-ranked movie (ties by user id), and each
  user's rows by movie, movies ranked by first appearance in ratings.dat. Every test user is absent
  from training (cold users). Rebuilt from the original ratings.dat order when that file is given;
  from the shared copy, movie ranks come from the timestamped file of users 1-2999 (original line
  order), and the few movies no user 1-2999 rated rank after them by (first user, movie id).
- `random`: the Scenario-Wise-Rec / HAMUR code's split (torch `random_split` 8:1:1 of the same
  rows): here a seeded permutation (`split_seed`), so users and movies are shared between splits.
- `chronological`: users 1-2999 (the ratings that carry timestamps), every row sorted by timestamp
  (stable), 8:1:1: the test rows are the latest ratings, some of them by users new to training.
- `user-sorted`: all ratings sorted by user then movie, 8:1:1 by row order (what this reader did
  before the presets; later user ids in test). Kept as a second cold-user protocol.

Input: the shared copy (`ratings_all_users_no_timestamp.csv.gz` + `ratings_users0001-2999.dat.gz`)
or the official GroupLens files (`ratings.dat`, `users.dat`, `movies.dat`), which win when present.
A rating outside 1-5 (or not an integer) is an error naming the file, line and column: it would
otherwise become a click/like label.

Facet columns for per-group evaluation (and MFH facets):
- `user_activity`: "new" when the user has at most `new_user_max_ratings` ratings in the whole
  log (a user attribute known at serving time), else "old";
- `user_history` (chronological preset only, where rows are in time order): "new" when the user
  had rated at most `new_user_max_prior_ratings` movies before this rating, else "old": the
  new/old-user facet known at serving time; test holds both (users absent from training too);
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

RATINGS_FILE = "ratings_all_users_no_timestamp.csv.gz"          # shared copy: all users, no timestamps
TIMESTAMPED_FILE = "ratings_users0001-2999.dat.gz"               # shared copy: users 1-2999, original lines
OFFICIAL_RATINGS_FILE = "ratings.dat"                            # GroupLens: UserID::MovieID::Rating::Timestamp
CHRONOLOGICAL_MAX_USER = 2999
AGE_SCENARIOS = {1: "young", 18: "young", 25: "25-34", 35: "35+", 45: "35+", 50: "35+", 56: "35+"}
Preset = Literal["m3oe-code", "random", "chronological", "user-sorted"]
PRESETS: dict[str, str] = {
    "m3oe-code": "M3oE released code (torch-rechub ml-1m.csv merge order, 8:1:1 by row order; test users unseen)",
    "random": "Scenario-Wise-Rec / HAMUR code (seeded random 8:1:1; users shared)",
    "chronological": "users 1-2999 sorted by timestamp, 8:1:1 (latest ratings in test)",
    "user-sorted": "all ratings sorted by user then movie, 8:1:1 by row order (later users in test)",
}
LEGACY_SPLITS = {"row_order": "user-sorted"}    # data.split values before the presets
MAX_LISTED = 5


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


def _offenders(values: pd.Series, bad: np.ndarray, line_offset: int) -> str:
    """'line 3: 7, line 9: 0 (and 4 more)': file lines (header counted by `line_offset`) and values."""
    rows = np.flatnonzero(bad)
    listed = ", ".join(f"line {i + line_offset}: {values.iloc[i]!r}" for i in rows[:MAX_LISTED])
    return listed + (f" (and {len(rows) - MAX_LISTED} more)" if len(rows) > MAX_LISTED else "")


def _read_ratings(path: Path, header: bool) -> pd.DataFrame:
    """user_id, movie_id, rating (+ timestamp) as int64, each value checked: a rating outside 1-5 is
    an error naming every offending line (capped), not a click/like label."""
    if not path.exists():
        raise DataError("file not found", file=str(path))

    def read(dtype):
        if header:
            return pd.read_csv(path, usecols=["user_id", "movie_id", "rating"], dtype=dtype), 2
        # "::" as two ":" separators (the C parser; no rating field holds a ":"): columns 0, 2, 4, 6
        frame = pd.read_csv(path, sep=":", header=None, usecols=[0, 2, 4, 6], dtype=dtype, keep_default_na=False)
        frame.columns = ["user_id", "movie_id", "rating", "timestamp"]
        return frame, 1
    frame, line_offset = read(None)
    if not all(pd.api.types.is_integer_dtype(frame[c]) for c in frame.columns):
        frame, line_offset = read(str)      # some value is not an integer: find and name them all
    out = pd.DataFrame(index=frame.index)
    for column in frame.columns:
        raw = frame[column]
        values = raw if pd.api.types.is_numeric_dtype(raw) else pd.to_numeric(raw, errors="coerce")
        bad = (values.isna() | (values != values.round())).to_numpy().copy()
        if column == "movie_id":
            bad &= values.to_numpy() != -1         # the shared copy's marker of an unmappable item
        if column == "rating":
            bad |= ~values.between(1, 5).to_numpy()
        if bad.any():
            what = "a rating must be an integer 1-5" if column == "rating" else "not an integer id"
            shown = raw.astype(str)
            raise DataError(f"{what}; {int(bad.sum())} bad values: {_offenders(shown, bad, line_offset)}",
                            file=str(path), row=int(np.flatnonzero(bad)[0]) + 1, column=column)
        out[column] = values.astype(np.int64)
    return out


def split_rows(frame: pd.DataFrame, fractions: tuple[float, float, float], kind: str = "row_order",
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


def merge_order(ratings: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
    """Rows of `ratings` in the order of `pd.merge(pd.merge(ratings.dat, movies), users)` under
    pandas < 2.2: movies ranked by first appearance in `original` (ratings.dat line order, or a prefix
    of it), movies absent from `original` after them by (first user id, movie id); users by (rank of
    their first-ranked movie, user id); each user's rows by movie rank."""
    first_seen = pd.unique(original["movie_id"])
    rank = pd.Series(np.arange(len(first_seen)), index=first_seen)
    unranked = ratings.loc[~ratings["movie_id"].isin(rank.index)]
    if len(unranked):
        late = unranked.groupby("movie_id")["user_id"].min().reset_index().sort_values(["user_id", "movie_id"])
        rank = pd.concat([rank, pd.Series(len(rank) + np.arange(len(late)), index=late["movie_id"].to_numpy())])
    movie_rank = ratings["movie_id"].map(rank).to_numpy()
    user_first = pd.Series(movie_rank).groupby(ratings["user_id"].to_numpy()).transform("min").to_numpy()
    order = np.lexsort((movie_rank, ratings["user_id"].to_numpy(), user_first))
    return ratings.iloc[order].reset_index(drop=True)


def _ordered_ratings(folder: Path, preset: str, split_seed: int) -> tuple[pd.DataFrame, str, list[str]]:
    """The preset's ratings in file order (before the 8:1:1 cut), a file name for messages, reports."""
    official = folder / OFFICIAL_RATINGS_FILE
    reports = []
    if official.exists():
        ratings = _read_ratings(official, header=False)
        source = str(official)
        reports.append(f"{official.name}: {len(ratings)} ratings read (GroupLens files)")
        timestamped = ratings
    elif preset == "chronological":
        timestamped = _read_ratings(folder / TIMESTAMPED_FILE, header=False)
        reports.append(f"{TIMESTAMPED_FILE}: {len(timestamped)} timestamped ratings read")
        source = str(folder / TIMESTAMPED_FILE)
    else:
        path = folder / RATINGS_FILE
        if not path.exists():
            raise DataError(f"file not found (MovieLens-1M ranking ratings; or give the GroupLens "
                            f"{OFFICIAL_RATINGS_FILE})", file=str(path))
        ratings = _read_ratings(path, header=True)
        source = str(path)
        reports.append(f"{path.name}: {len(ratings)} ratings read")
        unmapped = ratings["movie_id"] == -1
        ratings = ratings[~unmapped].reset_index(drop=True)
        reports.append(f"dropped {int(unmapped.sum())} ratings with movie_id=-1 (items missing from the source copy)")
        timestamped = None
        if preset == "m3oe-code":
            timestamped = _read_ratings(folder / TIMESTAMPED_FILE, header=False)
            reports.append(f"{TIMESTAMPED_FILE}: {len(timestamped)} timestamped ratings read")
    if preset == "chronological":
        kept = timestamped[timestamped["user_id"] <= CHRONOLOGICAL_MAX_USER]
        ordered = kept.sort_values("timestamp", kind="stable").reset_index(drop=True)
        reports.append(f"chronological: {len(ordered)} ratings of users 1-{CHRONOLOGICAL_MAX_USER} sorted by timestamp")
        return ordered, source, reports
    if preset == "m3oe-code":
        ordered = merge_order(ratings, timestamped)
        reports.append("m3oe-code: rows in the merge order of M3oE's ml-1m.csv (users by first-ranked movie)")
        return ordered, source, reports
    ordered = ratings.sort_values(["user_id", "movie_id"], kind="stable").reset_index(drop=True)
    return ordered, source, reports


def load_movielens_ranking(path: str | Path | None = None, fractions=(0.8, 0.1, 0.1), max_rows: int | None = None,
                           new_user_max_ratings: int = 50, new_item_max_ratings: int = 20,
                           split: str | None = None, split_seed: int = 0, preset: Preset | None = None,
                           new_user_max_prior_ratings: int = 50) -> RankingSplits:
    """Rows of one preset, split 8:1:1 (see the module doc). `split` is the old name of `preset`
    ("row_order" = "user-sorted")."""
    if preset is None:
        preset = LEGACY_SPLITS.get(split, split) if split is not None else "m3oe-code"
    if preset not in PRESETS:
        raise ValueError(f"unknown MovieLens-1M preset {preset!r}; expected one of {list(PRESETS)}")
    folder = Path(path) if path is not None else data_dir() / "movielens-1m"
    ratings, source, reports = _ordered_ratings(folder, preset, split_seed)
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
    for column, other, key in (("gender", "users.dat", "user_id"), ("genre", "movies.dat", "movie_id")):
        missing = rows[column].isna().to_numpy()
        if missing.any():
            ids = pd.unique(rows.loc[missing, key])
            listed = ", ".join(str(i) for i in ids[:MAX_LISTED]) + (
                f" (and {len(ids) - MAX_LISTED} more)" if len(ids) > MAX_LISTED else "")
            raise DataError(f"{len(ids)} {key}s absent from {other}: {listed}", file=source, column=key)
    rows["scenario"] = rows["age"].astype(np.int64).map(AGE_SCENARIOS)
    if rows["scenario"].isna().any():
        bad = sorted(set(rows.loc[rows["scenario"].isna(), "age"]))
        raise DataError(f"age outside the MovieLens age codes {sorted(AGE_SCENARIOS)}: {bad}", file="users.dat",
                        column="age")
    rows["click"] = (rows["rating"] > 3).astype(np.int64)
    rows["like"] = (rows["rating"] > 4).astype(np.int64)

    user_counts = rows.groupby("user_id")["movie_id"].transform("size")
    rows["user_activity"] = np.where(user_counts <= new_user_max_ratings, "new", "old")
    if preset == "chronological":
        prior = rows.groupby("user_id").cumcount()
        rows["user_history"] = np.where(prior <= new_user_max_prior_ratings, "new", "old")
    kind = "random" if preset == "random" else "row_order"
    train, valid, test = split_rows(rows, tuple(fractions), kind, split_seed)
    item_counts = train["movie_id"].value_counts()
    for part in (train, valid, test):
        counts = part["movie_id"].map(item_counts).fillna(0)
        part["item_popularity"] = np.where(counts <= new_item_max_ratings, "new", "old")
    seen_users = set(train["user_id"].unique())
    how = f"at random (seed {split_seed})" if preset == "random" else "by row order"
    reports.append(f"preset {preset}: {PRESETS[preset]}")
    reports.append(f"split {len(train)}/{len(valid)}/{len(test)} rows {how}; "
                   f"{int((~test['user_id'].isin(seen_users)).sum())} test rows are of users absent from training")
    return RankingSplits(train, valid, test, reports)
