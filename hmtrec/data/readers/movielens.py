"""MovieLens 1M and 100K (GroupLens) as user histories ordered by rating time.

The taxonomy is first genre ⊃ movie: a movie's genre list is not a tree (a film is both Comedy and
Romance), so the first listed genre is its parent. Each movie's text is its title followed by all
its genres. Ties in time keep the file order.

- movielens-1m: `ratings.dat(.gz)` or, in the shared data folder, `ratings_users0001-2999.dat.gz`
  (`UserID::MovieID::Rating::Timestamp`); `movies.dat` (`MovieID::Title::Genres`, latin-1).
- movielens-100k: `u.data(.gz)` (user, item, rating, timestamp; tab-separated); `u.item`
  (latin-1, `|`-separated, 19 genre flags) and `u.genre` for the flag names.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hmtrec.data.readers import SourceData, find_file, source_folder
from hmtrec.data.schema import (InteractionColumns, ItemColumns, build_catalogue, canonical_interactions,
                                read_table)
from hmtrec.data.validation import check_conflicting_duplicates, first_line_of, offender_error, scalar

ML100K_ITEM_COLUMNS = ["movie_id", "title", "release_date", "video_release_date", "imdb_url"]


RATINGS = (1, 2, 3, 4, 5)   # the documented value set of MovieLens ratings


def _ratings(path, separator: str, settings=None, warnings=None):
    frame = read_table(path, delimiter=separator, header=False,
                       column_names=["user_id", "movie_id", "rating", "timestamp"], settings=settings,
                       warnings=warnings)
    return frame


def check_ratings(ratings: pd.DataFrame, file: str, settings=None, warnings=None) -> None:
    """The rating is not used for the sequences, but another reader of the same file turns it
    into labels: values outside 1..5 are an error naming every such row; a (user, movie) rated
    twice with different ratings is reported."""
    values = pd.to_numeric(ratings["rating"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(values, RATINGS)
    if bad.any():
        raise offender_error(f"rating {scalar(ratings['rating'].iloc[int(np.flatnonzero(bad)[0])])!r} is not one of "
                             f"{list(RATINGS)}", np.flatnonzero(bad), ratings["rating"].to_numpy(dtype=object),
                             file=file, column="rating", first_line=first_line_of(ratings))
    check_conflicting_duplicates(ratings[["user_id", "movie_id"]], ratings[["rating"]], file=file,
                                 settings=settings, warnings=warnings, what="(user_id, movie_id) pairs")


def _interactions(ratings: pd.DataFrame, catalogue, file: str, settings=None, warnings=None, notes=None):
    check_ratings(ratings, file, settings, warnings)
    events, _ = canonical_interactions(
        ratings, InteractionColumns(sequence="user_id", item="movie_id", time="timestamp", time_format="epoch"),
        catalogue.taxonomy, file=file, settings=settings, warnings=warnings, notes=notes)
    return events


def read_movies_1m(folder, settings=None, warnings=None) -> pd.DataFrame:
    path = find_file(folder, "movies.dat", "movies.dat.gz")
    movies = read_table(path, delimiter="::", header=False, column_names=["movie_id", "title", "genres"],
                        encoding="latin-1", string_columns=["movie_id", "title", "genres"], settings=settings,
                        warnings=warnings)
    genres = movies["genres"].fillna("")
    movies["first_genre"] = genres.str.split("|").str[0].replace("", np.nan)
    movies["genre_text"] = genres.str.replace("|", " ", regex=False)
    movies.attrs["file"] = str(path)
    return movies


def read_movies_100k(folder, settings=None, warnings=None) -> pd.DataFrame:
    genre_path = find_file(folder, "u.genre")
    genre_table = read_table(genre_path, delimiter="|", header=False, column_names=["genre", "index"])
    genre_table = genre_table.dropna(subset=["genre"]).sort_values("index")
    names = genre_table["genre"].astype(str).tolist()
    path = find_file(folder, "u.item", "u.item.gz")
    movies = read_table(path, delimiter="|", header=False, column_names=ML100K_ITEM_COLUMNS + names,
                        encoding="latin-1", string_columns=["movie_id", "title"], settings=settings,
                        warnings=warnings)
    flags = movies[names].fillna(0).to_numpy(dtype=np.int64)
    if not np.isin(flags, (0, 1)).all():
        row, column = np.argwhere(~np.isin(flags, (0, 1)))[0]
        rows = np.flatnonzero(~np.isin(flags, (0, 1)).all(axis=1))
        raise offender_error(f"genre flag must be 0 or 1, got {flags[row, column]}", rows, file=str(path),
                             column=names[column], first_line=1)
    has_genre = flags.any(axis=1)
    first = np.array(names, dtype=object)[flags.argmax(axis=1)]
    movies["first_genre"] = np.where(has_genre, first, None)
    movies["genre_text"] = [" ".join(n for n, f in zip(names, row) if f) for row in flags]
    movies.attrs["file"] = str(path)
    return movies


def read(cfg) -> SourceData:
    settings, warnings = cfg.validation, []
    if cfg.source == "movielens-1m":
        folder = source_folder(cfg, "movielens-1m")
        movies = read_movies_1m(folder, settings, warnings)
        ratings_path = find_file(folder, "ratings.dat", "ratings.dat.gz", "ratings_users0001-2999.dat.gz")
        separator = "::"
    elif cfg.source == "movielens-100k":
        folder = source_folder(cfg, "movielens-100k")
        movies = read_movies_100k(folder, settings, warnings)
        ratings_path = find_file(folder, "u.data", "u.data.gz")
        separator = "\t"
    else:
        raise ValueError(f"not a MovieLens source: {cfg.source}")
    catalogue = build_catalogue(movies, ItemColumns(item="movie_id", levels=["first_genre"], text=["title", "genre_text"],
                                                    level_names=["genre", "movie"]), file=movies.attrs["file"],
                                settings=settings, warnings=warnings)
    ratings = _ratings(ratings_path, separator, settings, warnings)
    reader_notes: list[str] = []
    events = _interactions(ratings, catalogue, str(ratings_path), settings, warnings, reader_notes)
    notes = [f"{cfg.source}: {len(events):,} ratings of {events['sequence'].nunique():,} users from "
             f"{ratings_path.name}; taxonomy first genre ⊃ movie; text = title + genres"]
    return SourceData(name=cfg.source, events=events, taxonomy=catalogue.taxonomy, leaf_text=catalogue.leaf_text,
                      notes=notes + catalogue.notes + reader_notes, warnings=warnings)
