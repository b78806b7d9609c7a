"""Grounding on tricky titles: case, shared titles, disambiguation suffixes, punctuation and
unicode variants, the embedding fallback, and the command-line tool."""

import json

import pytest

from pipelines import ground
from transforms.stages.ground import Grounder, normalize_title, strip_disambiguation

CATALOG = [
    (0, "Q308", "Mercury (planet)"),
    (1, "Q925", "Mercury (element)"),
    (2, "Q999000001", "Ball"),
    (3, "Q999000002", "BALL"),
    (4, "Q48435", "Sagrada Família"),
    (5, "Q1", "Saint-Pierre & Miquelon"),
    (6, "Q2", "Star Wars: Episode IV – A New Hope"),
    (7, "Q3", "Leaf_Huang"),
    (8, "Q4", "Python"),
    (9, "Q5", "Python"),
]


@pytest.fixture
def grounder():
    return Grounder(CATALOG)


def test_normalization():
    assert normalize_title("  Sagrada_FAMÍLIA! ") == "sagrada familia"
    assert normalize_title("Saint-Pierre & Miquelon") == normalize_title("saint pierre and miquelon")
    assert strip_disambiguation("Mercury (planet)") == "Mercury"
    assert strip_disambiguation("Mercury") == "Mercury"


@pytest.mark.parametrize(
    "text,candidate,qid,method,ambiguous",
    [
        ("Mercury (planet)", None, "Q308", "exact", []),
        ("mercury (PLANET)", None, "Q308", "normalized", []),
        ("Mercury", "Q925", "Q925", "disambiguation", ["Q308"]),  # the candidate wins a tie
        ("Mercury", None, "Q308", "disambiguation", ["Q925"]),  # else catalog order
        ("Mercury (the planet)", None, "Q308", "disambiguation", ["Q925"]),
        ("Ball", None, "Q999000001", "exact", []),
        ("BALL", None, "Q999000002", "exact", []),  # exact case wins over case-only twins
        ("ball", "Q999000002", "Q999000002", "normalized", ["Q999000001"]),
        ("ball", None, "Q999000001", "normalized", ["Q999000002"]),
        ("Sagrada Familia", None, "Q48435", "normalized", []),  # accents
        ("SAGRADA   família", None, "Q48435", "normalized", []),
        ("Saint Pierre and Miquelon", None, "Q1", "normalized", []),  # punctuation, &
        ("Star Wars Episode IV - A New Hope", None, "Q2", "normalized", []),  # en dash vs hyphen
        ("Leaf Huang", None, "Q3", "normalized", []),  # underscores
        ("Python", "Q5", "Q5", "exact", ["Q4"]),  # two QIDs, one title
        ("Python", "Q777", "Q4", "exact", ["Q5"]),
    ],
)
def test_title_matching(grounder, text, candidate, qid, method, ambiguous):
    g = grounder.ground_text(text, candidate)
    assert (g.qid, g.method, g.ambiguous) == (qid, method, ambiguous)


def test_no_title_match_without_model_is_ungrounded(grounder):
    assert grounder.ground_text("Atlantis", None) is None
    g = grounder.ground_many([("Atlantis", None), ("", None)], 0.8)
    assert [x.method for x in g] == ["ungrounded", "ungrounded"] and g[0].qid is None


def test_ground_command_with_embedding_fallback(tmp_path, entity_index):
    names = [
        {"text": "eiffel tower", "id": 1},
        {"text": "The Eiffel Tower in Paris", "id": 2},  # no title matches: embedding
        {"text": "Jaguar Cars", "candidate_qid": "Q35694", "id": 3},
        {"text": "Zorblax Quantum Teapot 9000", "id": 4},
        {"text": "Mercury", "candidate_qid": "Q925", "id": 5},
    ]
    src = tmp_path / "names.jsonl"
    src.write_text("\n".join(json.dumps(n) for n in names) + "\nnot json\n{\"id\": 9}\n")
    out = tmp_path / "grounded.jsonl"
    counters = ground.run(["--entity_index", entity_index, "--input", str(src), "--output", str(out), "--min_ground_score", "0.6"])
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert (rows[1]["qid"], rows[1]["method"]) == ("Q243", "normalized")
    assert (rows[2]["qid"], rows[2]["method"]) == ("Q243", "embedding") and 0.6 <= rows[2]["score"] < 1
    assert (rows[3]["qid"], rows[3]["method"]) == ("Q30055", "exact")
    assert (rows[4]["qid"], rows[4]["method"]) == (None, "ungrounded")
    assert (rows[5]["qid"], rows[5]["ambiguous"]) == ("Q925", ["Q308"])
    rejects = [json.loads(line)["reason"] for line in open(str(out) + ".rejected.jsonl")]
    assert sorted(rejects) == ["bad_json", "missing_text"]
    assert counters["names_read"] == 7
