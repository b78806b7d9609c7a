"""Property-based fuzzing (hypothesis) of the code that meets hostile bytes first: the
catalog reader, the caption cleaner, the tar reader, the image guard and the LLM-answer
parser. Each must turn any input into a result or its documented error, and account for
every row.

CI runs a bounded number of examples; a longer run:
  HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/faults/test_fuzz.py
"""

import io
import json
import os
import tarfile

import apache_beam as beam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prompts import load_prompt
from transforms.formats.webdataset import DAMAGE, iter_samples
from transforms.io.images import ImageError, decode_image
from transforms.io.readers import ReadCatalogFile, _clean_caption
from transforms.llm.client import validate_answer
from transforms.schema import Entity, Reject

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=12,
)
catalog_objects = st.fixed_dictionaries(
    {},
    optional={
        "wikidata_id": json_values | st.from_regex(r"Q[0-9]{1,9}", fullmatch=True),
        "wikipedia_title": json_values,
        "wikipedia_summary": json_values,
    },
)
lines = st.one_of(
    catalog_objects.map(lambda o: json.dumps(o).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
).map(lambda b: b.replace(b"\n", b" "))


@given(st.lists(lines, max_size=12))
def test_catalog_reader_accounts_for_every_line(tmp_path_factory, raw_lines):
    path = tmp_path_factory.mktemp("fuzz") / "catalog.jsonl"
    path.write_bytes(b"\n".join(raw_lines) + b"\n")
    outputs = list(ReadCatalogFile().process((0, str(path))))
    entities = [o for o in outputs if isinstance(o, Entity)]
    rejects = [o.value for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]
    assert all(isinstance(r, Reject) for r in rejects)
    nonblank = [x for x in raw_lines if x.strip()]
    file_rejects = [r for r in rejects if r.count == 0]
    if file_rejects:
        # Only a file that looks gzipped but is not can fail as a whole: one reject for it.
        assert path.read_bytes()[:2] == b"\x1f\x8b" and len(file_rejects) == 1
        assert file_rejects[0].reason == "unreadable_file"
        return
    # One result per non-blank line: an entity or a row reject.
    assert len(entities) + len(rejects) == len(nonblank)
    assert all(r.count == 1 for r in rejects)
    for e in entities:
        assert isinstance(e.qid, str) and e.qid and isinstance(e.title, str) and e.title


@given(st.one_of(st.text(), st.binary(), st.integers(), st.floats(), st.none(), st.lists(st.text(), max_size=3)), st.integers(1, 50))
def test_caption_cleaner_never_raises(value, max_chars):
    text, err = _clean_caption(value, max_chars)
    assert (text is None) != (err is None)
    if text is not None:
        assert 0 < len(text) <= max_chars and text == " ".join(text.split())
        text.encode("utf-8")
    else:
        assert err[0] in {"empty_caption", "bad_utf8", "non_text_caption", "caption_too_long"}


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


members = st.lists(
    st.tuples(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=20),
        st.binary(max_size=64),
    ),
    max_size=6,
)


@given(members, st.integers(0, 4000), st.binary(max_size=8))
def test_tar_reader_yields_samples_then_at_most_one_damage(items, cut, noise):
    data = _tar_bytes(items)
    data = data[:cut] + noise if cut < len(data) else data
    out = list(iter_samples(io.BytesIO(data), path="x.tar"))
    damage = [o for o in out if not hasattr(o, "parts")]
    assert len(damage) <= 1 and (not damage or out[-1] is damage[0])
    if damage:
        assert isinstance(damage[0].error, DAMAGE)


@given(st.binary(max_size=2048))
def test_image_guard_raises_only_image_errors(data):
    try:
        decoded = decode_image(data, max_pixels=1_000_000)
    except ImageError as e:
        assert e.reason in {"empty_image", "not_an_image", "corrupt_image", "truncated_image", "unsupported_format", "too_many_pixels"}
    else:
        assert decoded.image.mode == "RGB" and decoded.width * decoded.height <= 1_000_000


@settings(max_examples=60)
@given(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 "]), st.binary(max_size=512))
def test_image_guard_on_image_headers_with_garbage(header, tail):
    test_image_guard_raises_only_image_errors.hypothesis.inner_test(header + tail)


VERIFY = load_prompt("verify", "v1")


@given(st.one_of(st.text(max_size=300), json_values.map(json.dumps), catalog_objects.map(lambda o: "```json\n" + json.dumps(o) + "\n```")))
def test_answer_parser_returns_a_valid_object_or_a_reason(text):
    obj, why = validate_answer(text, VERIFY.schema)
    if obj is None:
        assert isinstance(why, str) and why
    else:
        import jsonschema

        jsonschema.validate(obj, VERIFY.schema)
