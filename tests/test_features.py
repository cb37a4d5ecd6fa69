import numpy as np
import pandas as pd
import pytest
import torch

from hmtrec.data.features import MULTI_OOV, MULTI_PAD, OOV, FeatureEncoder, FeatureSchema, TaskSpec, read_rows
from hmtrec.errors import DataError

SCHEMA = FeatureSchema(categorical=["user", "item"], numeric=["price"],
                       multi_valued=[{"column": "tags", "separator": "|", "max_values": 3}],
                       scenario="surface", facets=["group"])
TASKS = [TaskSpec(name="click"), TaskSpec(name="like", label="liked"), TaskSpec(name="watch", type="regression")]


def table():
    return pd.DataFrame({
        "user": ["u1", "u2", "u1", "u3"], "item": ["a", "b", "b", "b"], "price": ["1", "3", "", "4"],
        "tags": ["x|y", "y", None, "x|y|z|w"], "surface": ["home", "search", "home", "home"],
        "group": ["new", "old", "old", "new"], "click": ["1", "0", "1", "0"], "liked": ["1", "", "0", "0"],
        "watch": ["2.5", "1", "0", ""]})


def test_vocabularies_statistics_and_masks():
    encoder = FeatureEncoder(SCHEMA, TASKS).fit(table())
    rows = encoder.transform(pd.DataFrame({**table().iloc[:2].to_dict("list"), "user": ["u9", "u2"]}))
    # user vocabulary is sorted [u1, u2, u3] -> 1..3; unseen u9 -> OOV 0
    assert rows.categorical[:, 0].tolist() == [OOV, 2]
    assert rows.categorical[:, 1].tolist() == [1, 2]
    mean, std = np.mean([1, 3, 4]), np.std([1, 3, 4])
    assert rows.numeric[:, 0].tolist() == pytest.approx([(1 - mean) / std, (3 - mean) / std], rel=1e-6)
    assert rows.scenario.tolist() == [0, 1] and rows.facets[:, 0].tolist() == [0, 1]
    assert rows.label_mask.tolist() == [[True, True, True], [True, False, True]]
    assert rows.labels[0].tolist() == [1.0, 1.0, 2.5]
    assert rows.report["oov:user"] == 1


def test_missing_numeric_is_imputed_to_training_mean_and_reported():
    encoder = FeatureEncoder(SCHEMA, TASKS).fit(table())
    rows = encoder.transform(table())
    assert rows.numeric[2, 0].item() == 0.0
    assert rows.report["imputed:price"] == 1
    assert rows.report["missing_label:like"] == 1 and rows.report["missing_label:watch"] == 1


def test_multi_valued_padding_oov_and_truncation():
    encoder = FeatureEncoder(SCHEMA, TASKS).fit(table())
    assert encoder.vocabularies["tags"] == ["w", "x", "y", "z"]
    frame = table()
    frame.loc[1, "tags"] = "y|unseen"
    rows = encoder.transform(frame)
    assert rows.multi_valued["tags"].tolist() == [[3, 4, MULTI_PAD], [4, MULTI_OOV, MULTI_PAD],
                                                  [MULTI_PAD] * 3, [3, 4, 5]]   # fourth value dropped (max 3)


def test_min_count_maps_rare_values_to_oov():
    schema = SCHEMA.model_copy(update={"min_count": 2})
    encoder = FeatureEncoder(schema, TASKS).fit(table())
    assert encoder.vocabularies["user"] == ["u1"] and encoder.vocabularies["item"] == ["b"]
    assert encoder.transform(table()).categorical[:, 0].tolist() == [1, 0, 1, 0]


def test_save_load_round_trip(tmp_path):
    encoder = FeatureEncoder(SCHEMA, TASKS).fit(table())
    encoder.save(tmp_path / "features.json")
    loaded = FeatureEncoder.load(tmp_path / "features.json")
    a, b = encoder.transform(table()), loaded.transform(table())
    for name in ("categorical", "numeric", "scenario", "facets", "labels", "label_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert loaded.layout().categorical == [("user", 4), ("item", 3)]


def test_a_literal_nan_label_is_masked_like_an_empty_one(tmp_path):
    encoder = FeatureEncoder(SCHEMA, TASKS).fit(table())
    frame = table()
    frame.loc[0, "liked"], frame.loc[1, "click"], frame.loc[2, "watch"] = "NaN", "nan", "NaN"
    frame.to_csv(tmp_path / "rows.csv", index=False)
    rows = encoder.transform(read_rows(tmp_path / "rows.csv"), file="rows.csv")
    assert rows.label_mask[:, 0].tolist() == [True, False, True, True]
    assert rows.label_mask[:, 1].tolist() == [False, False, True, True]      # row 2 was already empty
    assert rows.report["missing_label:like"] == 2 and rows.report["missing_label:watch"] == 2
    # a float NaN (a frame, not a file) is the same missing label; inf is still an error
    frame = table().assign(watch=[1.0, np.nan, 0.0, 2.0])
    assert encoder.transform(frame).label_mask[:, 2].tolist() == [True, False, True, True]
    with pytest.raises(DataError, match=r"row 4, column 'watch': not a finite number: 'inf'"):
        encoder.transform(table().assign(watch=["1", "2", "3", "inf"]))
    # a NaN feature value is not a label: still an error
    with pytest.raises(DataError, match=r"row 1, column 'price': not a finite number"):
        encoder.transform(table().assign(price=["NaN", "1", "2", "3"]))


def test_numbers_and_text_of_the_same_id_match():
    encoder = FeatureEncoder(FeatureSchema(categorical=["id"]), [TaskSpec(name="y")]).fit(
        pd.DataFrame({"id": [3, 5], "y": [0, 1]}))
    rows = encoder.transform(pd.DataFrame({"id": ["3", "5"], "y": [1.0, 0.0]}))
    assert rows.categorical[:, 0].tolist() == [1, 2]


@pytest.mark.parametrize("column,value,message", [
    ("price", "cheap", r"file rows.csv, row 3, column 'price': not a finite number: 'cheap'"),
    ("click", "2", r"file rows.csv, row 3, column 'click': a binary label must be 0 or 1"),
    ("surface", "feed", r"file rows.csv, row 3, column 'surface': unknown value 'feed'"),
])
def test_bad_values_name_file_row_and_column(tmp_path, column, value, message):
    encoder = FeatureEncoder(SCHEMA, TASKS).fit(table())
    frame = table()
    frame.loc[2, column] = value
    frame.to_csv(tmp_path / "rows.csv", index=False)
    with pytest.raises(DataError, match=message):
        encoder.transform(read_rows(tmp_path / "rows.csv"), file="rows.csv")


def test_missing_columns_are_all_named_at_once():
    encoder = FeatureEncoder(SCHEMA, TASKS).fit(table())
    with pytest.raises(DataError, match=r"file f.csv: 1 missing column \['item'\]"):
        encoder.transform(table().drop(columns=["item"]), file="f.csv")
    with pytest.raises(DataError, match=r"file f.csv: 3 missing columns \['item', 'price', 'liked'\]"):
        encoder.transform(table().drop(columns=["item", "price", "liked"]), file="f.csv")
    # labels may be absent when predicting
    rows = encoder.transform(table().drop(columns=["click", "liked", "watch"]), require_labels=False)
    assert not rows.label_mask.any()


def test_multitask_fixtures_encode(data_dir):
    folder = data_dir / "multitask-fixtures"
    train = read_rows(folder / "aliexpress_train_sample.csv")
    test = read_rows(folder / "aliexpress_test_sample.csv")
    schema = FeatureSchema(categorical=[f"categorical_{i}" for i in range(1, 17)],
                           numeric=[f"numerical_{i}" for i in range(1, 64)])
    encoder = FeatureEncoder(schema, [TaskSpec(name="click"), TaskSpec(name="conversion")]).fit(train)
    rows = encoder.transform(test, file="aliexpress_test_sample.csv")
    assert rows.categorical.shape == (len(test), 16) and rows.numeric.shape == (len(test), 63)
    assert rows.label_mask.all() and set(rows.labels.unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(rows.numeric).all()
    ccp = read_rows(folder / "ali_ccp_train_sample.csv")
    columns = [c for c in ccp.columns if c not in ("click", "purchase") and not c.startswith("D")]
    numeric = [c for c in ccp.columns if c.startswith("D")]
    encoder = FeatureEncoder(FeatureSchema(categorical=columns, numeric=numeric),
                             [TaskSpec(name="click"), TaskSpec(name="purchase")]).fit(ccp)
    rows = encoder.transform(read_rows(folder / "ali_ccp_val_sample.csv"))
    assert rows.categorical.shape[1] == len(columns) and rows.numeric.shape[1] == len(numeric)


@pytest.fixture(scope="module")
def ml1m_presets(data_dir):
    from hmtrec.data.readers.movielens_ranking import load_movielens_ranking

    return {preset: load_movielens_ranking(data_dir / "movielens-1m", preset=preset)
            for preset in ("m3oe-code", "random", "chronological")}


def _unseen_test_rows(splits) -> int:
    return int((~splits.test["user_id"].isin(set(splits.train["user_id"]))).sum())


def test_movielens_ranking_rows_and_labels(ml1m_presets):
    splits = ml1m_presets["random"]
    assert any("dropped 40 ratings with movie_id=-1" in line for line in splits.reports)
    total = len(splits.train) + len(splits.valid) + len(splits.test)
    assert total == 1_000_209 - 40
    assert [len(splits.train), len(splits.valid), len(splits.test)] == [800_135, 100_017, 100_017]
    assert set(splits.train["scenario"]) == {"young", "25-34", "35+"}
    young = splits.train[splits.train["scenario"] == "young"]
    assert set(young["age"].astype(int)) == {1, 18}
    assert ((splits.train["click"] == 1) == (splits.train["rating"] > 3)).all()
    assert ((splits.train["like"] == 1) == (splits.train["rating"] > 4)).all()
    toy_story = splits.train.loc[splits.train["movie_id"] == 1, "genre"]
    assert set(toy_story) == {"Animation"}                      # Toy Story's first genre
    # random: every test user has training rows
    assert _unseen_test_rows(splits) == 0
    assert any("at random (seed 0)" in line for line in splits.reports)


def test_m3oe_code_preset_rebuilds_the_published_order(ml1m_presets):
    splits = ml1m_presets["m3oe-code"]
    assert [len(splits.train), len(splits.valid), len(splits.test)] == [800_135, 100_017, 100_017]
    head = splits.train.iloc[:500]       # the published 500-row sample of ml-1m.csv
    users = list(dict.fromkeys(head["user_id"]))
    assert users == [1, 2, 12, 15, 17]
    assert [int((head["user_id"] == u).sum()) for u in users] == [53, 129, 23, 201, 94]
    assert head.loc[head["user_id"] == 2, "movie_id"].iloc[:8].tolist() == [1193, 3105, 2321, 1962, 1207, 2028,
                                                                             1246, 1357]
    # grouped by user: each user's rows are contiguous, and no test user is in training
    order = pd.concat([splits.train, splits.valid, splits.test])["user_id"]
    assert order.ne(order.shift()).sum() == order.nunique() == 6040
    assert _unseen_test_rows(splits) == len(splits.test)


def test_chronological_preset_is_time_ordered_users_1_to_2999(ml1m_presets):
    splits = ml1m_presets["chronological"]
    assert [len(splits.train), len(splits.valid), len(splits.test)] == [390_120, 48_765, 48_765]
    rows = pd.concat([splits.train, splits.valid, splits.test])
    assert rows["user_id"].max() == 2999 and rows["timestamp"].is_monotonic_increasing
    assert splits.train["timestamp"].max() <= splits.test["timestamp"].min()
    # some test users are new to training, most are not; the new/old-user facet is in every split
    assert 0 < _unseen_test_rows(splits) < len(splits.test) / 2
    for part in (splits.train, splits.valid, splits.test):
        assert set(part["user_history"]) == {"new", "old"}


def _grouplens_folder(data_dir, folder, users=12):
    """The official GroupLens layout (ratings.dat::, users.dat, movies.dat) from real lines."""
    import gzip
    import shutil

    folder.mkdir()
    with gzip.open(data_dir / "movielens-1m" / "ratings_users0001-2999.dat.gz", "rt") as source:
        lines = [line for line in source if int(line.split("::")[0]) <= users]
    (folder / "ratings.dat").write_text("".join(lines))
    for name in ("users.dat", "movies.dat"):
        shutil.copy(data_dir / "movielens-1m" / name, folder / name)
    return lines


def test_grouplens_files_are_read_and_bad_ratings_rejected(data_dir, tmp_path):
    from hmtrec.data.readers.movielens_ranking import load_movielens_ranking

    lines = _grouplens_folder(data_dir, tmp_path / "ml-1m")
    splits = load_movielens_ranking(tmp_path / "ml-1m", preset="m3oe-code")
    rows = pd.concat([splits.train, splits.valid, splits.test])
    assert len(rows) == len(lines) and any("GroupLens files" in line for line in splits.reports)
    assert list(dict.fromkeys(rows["user_id"]))[:3] == [1, 2, 12]          # raters of movie 1193 first
    chronological = load_movielens_ranking(tmp_path / "ml-1m", preset="chronological")
    assert pd.concat([chronological.train, chronological.test])["timestamp"].is_monotonic_increasing
    # a rating outside 1-5 would become a click/like label: rejected with every offending line
    bad = list(lines)
    bad[2] = bad[2].replace("::3::", "::7::", 1)
    bad[9] = "::".join(bad[9].split("::")[:2] + ["0", bad[9].split("::")[3]])
    (tmp_path / "ml-1m" / "ratings.dat").write_text("".join(bad))
    with pytest.raises(DataError, match=r"ratings.dat, row 3, column 'rating': a rating must be an integer 1-5; "
                                        r"2 bad values: line 3: '7', line 10: '0'"):
        load_movielens_ranking(tmp_path / "ml-1m", preset="random")
    bad = list(lines)
    bad[4] = "::".join(bad[4].split("::")[:2] + ["4.5", bad[4].split("::")[3]])
    (tmp_path / "ml-1m" / "ratings.dat").write_text("".join(bad))
    with pytest.raises(DataError, match=r"row 5, column 'rating': a rating must be an integer 1-5; "
                                        r"1 bad values: line 5: '4.5'"):
        load_movielens_ranking(tmp_path / "ml-1m", preset="chronological")


def test_random_split_shares_users_and_is_seeded():
    from hmtrec.data.readers.movielens_ranking import split_rows

    frame = pd.DataFrame({"user_id": np.repeat(np.arange(20), 10), "row": np.arange(200)})
    ordered = split_rows(frame, (0.8, 0.1, 0.1))      # user-sorted rows: later users in test
    assert ordered[0]["row"].tolist() == list(range(160))
    assert set(ordered[2]["user_id"]).isdisjoint(ordered[0]["user_id"])        # later users only
    train, valid, test = split_rows(frame, (0.8, 0.1, 0.1), "random", seed=3)
    assert [len(train), len(valid), len(test)] == [160, 20, 20]
    assert sorted(pd.concat([train, valid, test])["row"]) == list(range(200))     # a partition
    assert set(test["user_id"]) <= set(train["user_id"])                          # seen users
    again = split_rows(frame, (0.8, 0.1, 0.1), "random", seed=3)
    assert again[2]["row"].tolist() == test["row"].tolist()
    assert split_rows(frame, (0.8, 0.1, 0.1), "random", seed=4)[2]["row"].tolist() != test["row"].tolist()
    with pytest.raises(ValueError, match="unknown split"):
        split_rows(frame, (0.8, 0.1, 0.1), "by_user")
