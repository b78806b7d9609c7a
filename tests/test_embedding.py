"""The caption encoder's length grouping: every text in exactly one forward pass, passes
within their token budget, and vectors equal to the library's own, in the caller's order."""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.testing.util import assert_that
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import direct_pipeline
from transforms.models.embedding import (
    DEFAULT_TEXT_MODEL,
    SentenceTransformerHandler,
    encode_by_length,
    length_groups,
    load_sentence_transformer,
    token_lengths,
)

# Lengths as real alt-texts spread them: mostly short, now and then a very long one.
TEXTS = [
    "Eiffel Tower at night",
    "",
    "a red double-decker bus crossing Westminster Bridge in the rain, with Big Ben behind it " * 20,
    "Golden Gate Bridge",
    "IMG_2041.JPG",
    "Mount Fuji seen from Lake Kawaguchi in autumn, with red maple leaves in the foreground",
    "Colosseum",
    "The Taj Mahal " * 150,
] * 5


@pytest.fixture(scope="module")
def model():
    return load_sentence_transformer(DEFAULT_TEXT_MODEL, threads=1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=256), max_size=300),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=1, max_value=4096),
)
def test_length_groups_cover_every_text_once_within_the_budget(lengths, max_texts, max_tokens):
    lengths = np.array(lengths, dtype=np.int64)
    groups = length_groups(lengths, max_texts, max_tokens)
    seen = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for g in groups:
        assert 1 <= len(g) <= max_texts
        # Over the budget only as a pass of one (a text longer than the budget on its own).
        assert len(g) == 1 or len(g) * lengths[g].max() <= max_tokens


def test_short_texts_share_a_pass_and_a_long_one_does_not_pad_them(model):
    lengths = token_lengths(model, TEXTS[:8])
    assert lengths[2] == lengths[7] == model.max_seq_length  # cut at the model's maximum
    assert lengths[0] < 10
    groups = length_groups(lengths, 256, 512)
    long_pass = next(g for g in groups if 2 in g)
    assert 0 not in long_pass and 3 not in long_pass


def test_vectors_equal_the_library_one_at_a_time_and_keep_the_order(model):
    got = encode_by_length(model, TEXTS, max_texts=8, max_tokens=300)
    want = model.encode(TEXTS, batch_size=1, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-5
    assert encode_by_length(model, []).shape == (0, want.shape[1])


def test_handler_in_runinference_gives_each_key_its_own_vector(model):
    want = dict(zip(range(len(TEXTS)), model.encode(TEXTS, batch_size=1, normalize_embeddings=True, show_progress_bar=False)))
    handler = SentenceTransformerHandler(DEFAULT_TEXT_MODEL, batch_size=16, max_tokens_per_batch=512, threads=1)

    def check(results):
        got = dict(results)
        assert sorted(got) == sorted(want)
        for k, v in got.items():
            assert np.abs(v - want[k]).max() < 1e-5, k

    with direct_pipeline() as p:
        out = (
            p
            | beam.Create(list(enumerate(TEXTS)))
            | RunInference(KeyedModelHandler(handler))
            | beam.Map(lambda kv: (kv[0], kv[1].inference))
        )
        assert_that(out, check)
