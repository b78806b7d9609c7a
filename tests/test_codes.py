"""GER-ALD codes: properties on generated catalogs, hand-checked examples, and the Beam
pipeline with a WordPiece vocabulary trained here."""

import json
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.codes.ald import rarest_first, resolve

EOS = 2
VOCAB = list(range(10, 60))


def counts_of(entities):
    c = Counter()
    for _, _, toks in entities:
        c.update(toks)
    return dict(c)


@st.composite
def catalogs(draw):
    # At most 40 entities over a 50-token vocabulary: every catalog here has a unique coding
    # even at L = 2 (one token slot); denser ones are refused with a clear error.
    n = draw(st.integers(1, 40))
    names = draw(st.lists(st.lists(st.sampled_from(VOCAB[:25]), min_size=1, max_size=6), min_size=n, max_size=n))
    return [(f"Q{i}", i, toks) for i, toks in enumerate(names)]


@settings(max_examples=80, deadline=None)
@given(catalogs(), st.integers(2, 5), st.integers(0, 3), st.sampled_from(["ald", "caption"]), st.sampled_from(["published", "keep_eos"]))
def test_code_properties(entities, length, seed, strategy, rule):
    counts = counts_of(entities)
    out = resolve(entities, counts, strategy=strategy, length=length, eos=EOS, vocab_ids=VOCAB, seed=seed, collision_rule=rule)
    codes = [tuple(r.code) for r in out]
    assert len(set(codes)) == len(codes), "codes must be globally unique"
    assert all(len(c) == length for c in codes)
    for r in out:
        if r.method == "initial" or rule == "keep_eos":
            assert r.code[-1] == EOS
        else:
            # Published rule: EOS goes only when the code is full of real tokens.
            assert r.code[-1] == EOS or EOS not in r.code
        # No real token after an EOS: codes stay prefix-canonical for decoding.
        if EOS in r.code:
            assert all(t == EOS for t in r.code[r.code.index(EOS):])
    names = {qid: toks for qid, _, toks in entities}
    for r in out:
        real = [t for t in r.code if t != EOS]
        own = set(names[r.qid])
        if r.method != "random":
            # Every token comes from the entity's own name, except the random fallback.
            assert set(real) <= own
        else:
            assert set(real) - own and len(set(real) - own) == 1
        if r.method == "initial" and strategy == "ald":
            # Rarest first: the code is the prefix of the name's tokens sorted by rarity.
            assert real == rarest_first(names[r.qid], counts)[: length - 1]
    # Deterministic for a seed, whatever the input order.
    again = resolve(list(reversed(entities)), counts, strategy=strategy, length=length, eos=EOS, vocab_ids=VOCAB, seed=seed,
                    collision_rule=rule)
    assert [(r.qid, r.code) for r in again] == [(r.qid, r.code) for r in out]


def test_hand_checked_examples():
    # token ids: 10 "the" (common), 11 "tower", 12 "eiffel", 13 "ball", 14 "paris", 15 "statue", 16 "liberty"
    entities = [
        ("Q243", 0, [10, 12, 11]),  # the eiffel tower
        ("Q1", 1, [10, 11, 14]),  # the tower paris
        ("Qball1", 2, [13]),  # Ball
        ("Qball2", 3, [13]),  # BALL: the same tokens once lower-cased
        ("Q9202", 4, [15, 10, 16]),  # statue the liberty
    ]
    counts = counts_of(entities)  # the:3 tower:2 eiffel:1 ball:2 paris:1 statue:1 liberty:1
    out = {r.qid: r for r in resolve(entities, counts, strategy="ald", length=4, eos=EOS, vocab_ids=VOCAB, seed=0)}
    assert out["Q243"].code == [12, 11, 10, EOS]  # rarest first: eiffel(1), tower(2), the(3)
    assert out["Q1"].code == [14, 11, 10, EOS]
    assert out["Q9202"].code == [15, 16, 10, EOS]  # ties (count 1) by token id
    # One-token names are padded with EOS; case-only twins collide, and with no other name
    # token left the later one (in seeded order) gets a random token after its last real one.
    ball = sorted([out["Qball1"], out["Qball2"]], key=lambda r: r.method)
    assert ball[0].code == [13, EOS, EOS, EOS] and ball[0].method == "initial"
    assert ball[1].method == "random" and ball[1].code[0] == 13 and ball[1].code[1] in VOCAB and ball[1].code[2:] == [EOS, EOS]


def test_next_rarest_token_resolves_collisions():
    # Two entities share their two rarest tokens; the second takes its next-rarest one.
    entities = [("QA", 0, [20, 21, 22, 30]), ("QB", 1, [20, 21, 22, 31]), ("QC", 2, [30, 31, 40]), ("QD", 3, [30, 31, 41])]
    counts = counts_of(entities)  # 20,21,22:2  30,31:3  40,41:1
    out = resolve(entities, counts, strategy="ald", length=3, eos=EOS, vocab_ids=VOCAB, seed=0)
    by = {r.qid: r for r in out}
    first, second = sorted([by["QA"], by["QB"]], key=lambda r: r.method)
    assert first.code == [20, 21, EOS] and first.method == "initial"
    # GER's rule: the slot after the last real token is the EOS slot here (L-1 = 2 are full),
    # so the second takes its next-rarest token (22) there and has no EOS.
    assert second.method == "next_rarest" and second.code == [20, 21, 22]
    assert by["QC"].code == [40, 30, EOS] and by["QD"].code == [41, 30, EOS]
    # The earlier rule overwrites the last real token and keeps EOS.
    old = {r.qid: r for r in resolve(entities, counts, strategy="ald", length=3, eos=EOS, vocab_ids=VOCAB, seed=0,
                                     collision_rule="keep_eos")}
    second = old[second.qid]
    assert second.method == "next_rarest" and second.code[0] == 20 and second.code[1] in (22, 30, 31) and second.code[2] == EOS


def test_published_rule_on_hand_checked_titles(tmp_path):
    """build_codes end to end on hand-made titles with a hand-made vocabulary: the EOS slot
    takes the next-rarest token, and the random-fallback share is what the rule implies."""
    from pipelines import build_codes
    from tests.conftest import write_jsonl
    from transforms.codes.ald import visit_order_key

    words = ["river", "bank", "north", "old", "city", "hall", "new", "the"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = {w: 5 + i for i, w in enumerate(words)}
    sep = 3
    # "the" and "new" are common; each entity's three rarest tokens are its first three.
    titles = {
        "Q1": "North River Bank",  # visited first: north river bank + EOS
        "Q2": "North River Bank the",  # same three rarest, then "the": GER puts "the" in the EOS slot
        "Q3": "North River Bank",  # the same name again: nothing left, a random token in the EOS slot
        "Q4": "Old City Hall",
        "Q5": "New City Hall the",
        "Q6": "the new",
        "Q7": "the new old",
    }
    # A seed that visits Q1 before Q2 and Q3 (the visit order is a hash of seed and QID).
    seed = next(s for s in range(100) if visit_order_key(s, "Q1") < min(visit_order_key(s, "Q2"), visit_order_key(s, "Q3")))
    catalog = write_jsonl(tmp_path / "cat.jsonl", [{"wikidata_id": q, "wikipedia_title": t} for q, t in titles.items()])
    runs = {}
    for rule in ("published", "keep_eos"):
        m = build_codes.run(["--entities", catalog, "--tokenizer", str(vocab), "--output", str(tmp_path / rule),
                             "--seed", str(seed), "--collision_rule", rule])
        rows = {r["qid"]: r for r in pq.read_table(tmp_path / rule / "codes.parquet").to_pylist()}
        runs[rule] = (m, rows)
    m, rows = runs["published"]
    # river, bank, north: 3 uses each (ties by token id), rarer than "the" (5 uses).
    nrb = [tok["river"], tok["bank"], tok["north"]]
    assert rows["Q1"]["code"] == [*nrb, sep] and rows["Q1"]["method"] == "initial"
    # Q2: "the" (its next-rarest token) in the EOS slot: four real tokens, no EOS.
    assert rows["Q2"]["code"] == [*nrb, tok["the"]] and rows["Q2"]["method"] == "next_rarest"
    assert rows["Q3"]["method"] == "random" and rows["Q3"]["code"][:3] == nrb
    assert rows["Q3"]["code"][3] != sep
    assert m["random_fallback_share"] == round(1 / 7, 6) and m["codes_without_eos"] == 2 and m["collision_rule"] == "published"
    # The earlier rule keeps EOS: Q2 overwrites "north" with "the".
    m_old, old = runs["keep_eos"]
    assert old["Q2"]["code"] == [tok["river"], tok["bank"], tok["the"], sep]
    assert old["Q3"]["code"][2] != tok["north"] and old["Q3"]["code"][3] == sep and m_old["codes_without_eos"] == 0


def test_atomic_codes_are_unique_random():
    entities = [(f"Q{i}", i, [10]) for i in range(30)]
    out = resolve(entities, {10: 30}, strategy="atomic", length=3, eos=EOS, vocab_ids=VOCAB, seed=1)
    assert len({tuple(r.code) for r in out}) == 30 and all(r.method == "random" for r in out)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """A small WordPiece vocabulary trained here on the demo catalog's titles."""
    from tokenizers import BertWordPieceTokenizer

    from pipelines.demo_data.make_corpus import load_catalog

    titles = [e["wikipedia_title"].lower() for e in load_catalog()]
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(titles, vocab_size=800, min_frequency=1)
    folder = tmp_path_factory.mktemp("wordpiece")
    tok.save_model(str(folder))
    return str(folder / "vocab.txt")


def test_build_codes_pipeline(tmp_path, vocab):
    from pipelines import build_codes
    from pipelines.demo_data.make_corpus import bundled

    out = tmp_path / "codes"
    manifest = build_codes.run(["--entities", bundled("entities.jsonl"), "--tokenizer", vocab, "--output", str(out)])
    rows = pq.read_table(out / "codes.parquet").to_pylist()
    assert len(rows) == 322 == manifest["entities"] and manifest["unique"]
    assert [r["int_id"] for r in rows] == list(range(322))
    assert len({tuple(r["code"]) for r in rows}) == 322 and all(len(r["code"]) == 4 for r in rows)
    assert 0 <= manifest["random_fallback_share"] < 0.05
    assert sum(manifest["name_tokens_per_code_histogram"].values()) == 322
    by_qid = {r["qid"]: r for r in rows}
    assert by_qid["Q999000001"]["code"] != by_qid["Q999000002"]["code"]  # Ball / BALL
    again = build_codes.run(["--entities", bundled("entities.jsonl"), "--tokenizer", vocab, "--output", str(tmp_path / "again")])
    assert pq.read_table(tmp_path / "again" / "codes.parquet").to_pylist() == rows
    assert again["methods"] == manifest["methods"]
    other = build_codes.run(["--entities", bundled("entities.jsonl"), "--tokenizer", vocab, "--output", str(tmp_path / "s1"), "--seed", "1"])
    assert json.dumps(other["methods"], sort_keys=True)  # a different seed still yields a full, valid set
    assert other["unique"]


def test_infeasible_catalog_names_the_fix():
    entities = [(f"Q{i}", i, [10]) for i in range(60)]  # 60 entities, 50 possible codes at L = 2
    with pytest.raises(RuntimeError, match="raise --code_length"):
        resolve(entities, {10: 60}, strategy="ald", length=2, eos=EOS, vocab_ids=VOCAB, seed=0)


def test_hkc_codes(tmp_path, vocab, entity_index, catalog_path):
    """Hierarchical k-means over the entity index: unique, fixed length, deterministic."""
    from pipelines import build_codes

    args = ["--entities", catalog_path, "--tokenizer", vocab, "--strategy", "hkc", "--entity_index", entity_index, "--code_length", "3"]
    m = build_codes.run(args + ["--output", str(tmp_path / "a")])
    rows = pq.read_table(tmp_path / "a" / "codes.parquet").to_pylist()
    assert len(rows) == 16 and m["unique"] and all(len(r["code"]) == 3 for r in rows)
    assert {r["method"] for r in rows} == {"hkc"}
    build_codes.run(args + ["--output", str(tmp_path / "b")])
    assert pq.read_table(tmp_path / "b" / "codes.parquet").to_pylist() == rows
    from transforms.errors import UsageError

    with pytest.raises(UsageError, match="--entity_index"):
        build_codes.run(["--entities", catalog_path, "--tokenizer", vocab, "--strategy", "hkc", "--output", str(tmp_path / "c")])


def test_codes_of_the_entity_index_entities(tmp_path, vocab, entity_index, catalog_path):
    """Without --entities the index's entities are coded: its int ids, no duplicate QIDs
    (the index rejected them already, so build_codes writes no rejects of its own), and the
    same codes as from the raw catalog."""
    from pipelines import build_codes

    m = build_codes.run(["--entity_index", entity_index, "--tokenizer", vocab, "--output", str(tmp_path / "idx")])
    from_catalog = build_codes.run(["--entities", catalog_path, "--tokenizer", vocab, "--output", str(tmp_path / "cat")])
    rows = pq.read_table(tmp_path / "idx" / "codes.parquet").to_pylist()
    index_rows = pq.read_table(os.path.join(entity_index, "entities.parquet"), columns=["int_id", "qid"]).to_pylist()
    assert [(r["int_id"], r["qid"]) for r in rows] == [(r["int_id"], r["qid"]) for r in index_rows]
    assert rows == pq.read_table(tmp_path / "cat" / "codes.parquet").to_pylist()
    assert m["count_check"] == "ok" and "rejected_dedup_duplicate_qid" not in m["counters"]
    assert from_catalog["counters"]["rejected_dedup_duplicate_qid"] == 1
    assert not (tmp_path / "idx" / "rejected").exists()
    from transforms.errors import UsageError

    with pytest.raises(UsageError, match="--entity_index DIR"):
        build_codes.run(["--tokenizer", vocab, "--output", str(tmp_path / "none")])


def test_build_codes_fails_when_the_table_loses_a_row(tmp_path, vocab, monkeypatch):
    """The codes identity is checked against the rows in codes.parquet: a writer that
    loses one row makes the run fail, naming the step."""
    import pyarrow.parquet as pq_mod

    from pipelines import build_codes
    from pipelines.demo_data.make_corpus import bundled
    from transforms.errors import AccountingError

    original = pq_mod.write_table
    monkeypatch.setattr(pq_mod, "write_table", lambda table, where, **kw: original(table.slice(0, table.num_rows - 1), where, **kw))
    with pytest.raises(AccountingError, match=r"write_codes: unique entities 322 != 321 rows in codes.parquet"):
        build_codes.run(["--entities", bundled("entities.jsonl"), "--tokenizer", vocab, "--output", str(tmp_path / "codes")])


def _synthetic_index(folder, n=3000, dim=32, seed=0):
    """An entity-index folder (entities.parquet, embeddings.npy, manifest.json) with n
    clustered unit vectors: enough for RQ to train 256 centroids per level."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "embeddings.npy"), x)
    pq.write_table(pa.table({"int_id": pa.array(range(n), pa.int64()), "qid": [f"Q{i + 1}" for i in range(n)],
                             "title": [f"entity {i}" for i in range(n)]}), os.path.join(folder, "entities.parquet"))
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"kind": "entity_index", "num_entities": n, "dimension": dim,
                   "files": {"entities": "entities.parquet", "embeddings": "embeddings.npy"}}, f)
    return str(folder), x


def test_rq_codes_unique_deterministic_and_prefix_coarse(tmp_path, vocab):
    """IRGen codes: M = code_length - 1 levels of 256 centroids, each level its own tokens,
    unique after collision resolution, the same for a seed, and each prefix a coarser
    description of the vector (reconstruction error falls with every level)."""
    import numpy as np

    from pipelines import build_codes
    from trainer.codebook import CodeBook, PrefixIndex
    from transforms.codes.ald import WordPiece

    index, x = _synthetic_index(tmp_path / "index")
    args = ["--entity_index", index, "--tokenizer", vocab, "--strategy", "rq", "--code_length", "3", "--rq_bits", "6"]
    m = build_codes.run(args + ["--output", str(tmp_path / "a")])
    rows = pq.read_table(tmp_path / "a" / "codes.parquet").to_pylist()
    tok = WordPiece(vocab)
    eos, regular = tok.eos_id, tok.regular_ids()
    assert len(rows) == 3000 and m["unique"] and len({tuple(r["code"]) for r in rows}) == 3000
    assert all(len(r["code"]) == 3 and r["code"][-1] == eos for r in rows)
    k = 64
    for level in range(2):
        allowed = set(regular[level * k:(level + 1) * k])
        assert all(r["code"][level] in allowed for r in rows), f"level {level} uses another level's tokens"
    rq = m["rq"]
    assert rq["levels"] == 2 and rq["bits_used"] == 6 and rq["mse_by_prefix"][1] < rq["mse_by_prefix"][0]
    # 3,000 vectors in 4,096 cells collide: most keep their code, the rest take the nearest
    # free last-level centroid, a few a random one; the shares are reported.
    methods = m["methods"]
    assert methods["rq"] > 1500 and methods.get("next_nearest", 0) > 0
    assert m["random_fallback_share"] == round(methods.get("random", 0) / 3000, 6) < 0.15
    # An entity's first-level code is the nearest first-level centroid's token for most
    # entities (beam search may pick another when the pair fits better).
    again = build_codes.run(args + ["--output", str(tmp_path / "b")])
    assert pq.read_table(tmp_path / "b" / "codes.parquet").to_pylist() == rows and again["methods"] == methods
    other = build_codes.run(args + ["--output", str(tmp_path / "c"), "--seed", "1"])
    assert other["unique"]
    # Similar vectors share prefixes: an entity's first-level neighbours are nearer to it
    # than random entities are.
    first = np.array([r["code"][0] for r in rows])
    same = [(x[i] @ x[j]) for i in range(0, 3000, 7) for j in np.flatnonzero(first == first[i])[:5] if j != i]
    rand = [(x[i] @ x[(i * 7919) % 3000]) for i in range(0, 3000, 7)]
    assert np.mean(same) > np.mean(rand) + 0.2
    # Constrained decoding can only produce valid codes: random walks over the prefix index.
    book = CodeBook.load(str(tmp_path / "a"))
    index_ = PrefixIndex(book.codes, book.eos)
    valid = {tuple(r["code"]) for r in rows}
    rng = np.random.default_rng(0)
    for _ in range(300):
        seq = ()
        while len(seq) < 3:
            seq += (int(rng.choice(index_.allowed(seq))),)
        assert seq in valid
    assert index_.allowed((regular[k],)) == ()  # a level-2 token cannot start a code


def test_rq_on_a_tiny_catalog_lowers_the_bits(tmp_path, vocab, entity_index):
    from pipelines import build_codes

    m = build_codes.run(["--entity_index", entity_index, "--tokenizer", vocab, "--strategy", "rq", "--output", str(tmp_path / "t")])
    assert m["unique"] and m["entities"] == 16 and m["rq"]["bits_used"] < m["rq"]["bits"] == 8
