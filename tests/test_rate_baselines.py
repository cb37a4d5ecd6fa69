"""Simple-rate baselines: smoothed training rates, by hand."""

import numpy as np
import pandas as pd
import pytest

from hmtrec.models.ranking.rates import RateBaseline


def _logit(p):
    return np.log(p / (1 - p))


def train_rows():
    # movie a: 3 of 4 clicked; movie b: 0 of 2; user u1 clicks 2 of 3, u2 1 of 3; prior 3 / 6
    return pd.DataFrame({"movie_id": ["a", "a", "a", "a", "b", "b"], "user_id": ["u1", "u1", "u2", "u2", "u1", "u2"],
                         "gender": ["F", "F", "M", "M", "F", "M"], "click": [1, 1, 1, 0, 0, 0]})


def test_movie_rate_is_shrunk_towards_the_prior():
    model = RateBaseline("movie", smoothing=2.0, demographics=()).fit(train_rows(), ["click"])
    test = pd.DataFrame({"movie_id": ["a", "b", "unseen"], "user_id": ["u1", "u1", "u1"]})
    expected = [(3 + 2 * 0.5) / (4 + 2), (0 + 2 * 0.5) / (2 + 2), 0.5]
    assert model.predict(test)["click"] == pytest.approx(expected)


def test_movie_plus_user_adds_the_user_logit_and_ignores_unseen_users():
    model = RateBaseline("movie+user", smoothing=2.0).fit(train_rows(), ["click"])
    test = pd.DataFrame({"movie_id": ["a", "a"], "user_id": ["u1", "nobody"]})
    movie, user = 4 / 6, (2 + 1) / (3 + 2)
    expected = 1 / (1 + np.exp(-(_logit(movie) + _logit(user) - _logit(0.5))))
    assert model.predict(test)["click"] == pytest.approx([expected, movie])


def test_movie_demographic_rate_is_shrunk_towards_the_movies_own_rate():
    model = RateBaseline("movie-demographic", smoothing=2.0, demographics=("gender",)).fit(train_rows(), ["click"])
    test = pd.DataFrame({"movie_id": ["a", "a", "b"], "user_id": ["x", "y", "z"], "gender": ["F", "M", "X"]})
    movie_a, movie_b = 4 / 6, 1 / 4
    a_female = (2 + 2 * movie_a) / (2 + 2)       # 2 of 2 women clicked movie a
    a_male = (1 + 2 * movie_a) / (2 + 2)
    got = model.predict(test)["click"]
    assert got == pytest.approx([a_female, a_male, movie_b])     # an unseen (movie, value) adds nothing


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown rate baseline"):
        RateBaseline("popularity")
