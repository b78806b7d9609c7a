"""The ONNX text encoder: exported from the shipped MiniLM, the same vectors as
sentence-transformers (fp32) or close to them (int8), carried by the entity index so every
job that uses the index embeds with that very file."""

import json
import os

import numpy as np
import pytest

from pipelines import build_entity_index, select_candidates
from tests.helpers import read_candidates, write_parquet
from tests.test_pipelines import EXACT_TITLE_CASES
from transforms.errors import UsageError
from transforms.models.embedding import DEFAULT_TEXT_MODEL, encode_by_length, load_sentence_transformer
from transforms.models.text_encoder import ENCODER_CONFIG, ONNX_FILE, OnnxEncoder
from transforms.models.text_export import export_encoder

TEXTS = [
    "Eiffel Tower",
    "",
    "Mount Fuji seen from Lake Kawaguchi in autumn, with red maple leaves in the foreground",
    "a red double-decker bus crossing Westminster Bridge in the rain " * 30,  # past 256 tokens: cut
    "Ünïcödé façade — 東京タワー",
]


@pytest.fixture(scope="module")
def st_model():
    return load_sentence_transformer(DEFAULT_TEXT_MODEL, threads=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for backend in ("onnx", "onnx-int8"):
        d = tmp_path_factory.mktemp(backend)
        out[backend] = (str(d), export_encoder(DEFAULT_TEXT_MODEL, str(d), backend))
    return out


def test_fp32_export_gives_the_library_vectors(st_model, exported):
    folder, config = exported["onnx"]
    assert config["pooling"] == "mean" and config["dimension"] == 384 and config["max_seq_length"] == 256
    enc = OnnxEncoder(folder, threads=1)
    want = st_model.encode(TEXTS, batch_size=1, normalize_embeddings=True, show_progress_bar=False)
    got = enc.encode(TEXTS, batch_size=3)  # padded passes give the same vectors as one at a time
    assert np.abs(got - want).max() < 1e-4
    # Token counts agree with the library's tokenizer (the length grouping uses them).
    ours = [len(i) for i in enc.tokenizer(TEXTS)["input_ids"]]
    theirs = [len(i) for i in st_model.tokenizer(TEXTS, truncation=True, max_length=256)["input_ids"]]
    assert ours == theirs
    grouped = encode_by_length(enc, TEXTS * 3, max_texts=4, max_tokens=64)
    assert np.abs(grouped - np.concatenate([want] * 3)).max() < 1e-4


def test_int8_is_close_and_smaller(st_model, exported):
    folder, _ = exported["onnx-int8"]
    enc = load_sentence_transformer(folder)  # the loader recognises an encoder folder
    assert isinstance(enc, OnnxEncoder)
    want = st_model.encode(TEXTS, normalize_embeddings=True, show_progress_bar=False)
    got = enc.encode(TEXTS)
    cos = (got * want).sum(1)
    assert cos.min() > 0.9 and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    fp32 = os.path.getsize(os.path.join(exported["onnx"][0], ONNX_FILE))
    assert os.path.getsize(os.path.join(folder, ONNX_FILE)) < fp32 / 3


def test_a_damaged_copy_is_refused(exported, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exported["onnx-int8"][0], folder)
    with open(folder / ONNX_FILE, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(OSError, match="sha256"):
        OnnxEncoder(str(folder))


@pytest.mark.slow
def test_index_carries_its_encoder_and_select_uses_it(tmp_path, catalog_path):
    index = tmp_path / "index"
    summary = build_entity_index.run(["--entities", catalog_path, "--output", str(index), "--text_backend", "onnx-int8"])
    assert summary["count_check"] == "ok"
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["text_backend"] == "onnx-int8" and manifest["text_encoder"] == "text_encoder"
    config = json.loads((index / "text_encoder" / ENCODER_CONFIG).read_text())
    assert manifest["text_encoder_sha256"] == config["sha256"]
    # The stored title vectors are the int8 encoder's, not the torch model's. (int8 quantises
    # activations per pass, so a vector depends a little on its pass-mates: compare with the
    # same passes the handler ran, all 16 short titles in one.)
    import pyarrow.parquet as pq

    from transforms.stages.build_entity_index import title_text

    enc = OnnxEncoder(str(index / "text_encoder"))
    vecs = np.load(index / "embeddings.npy")
    titles = [title_text(r["title"]) for r in pq.read_table(index / "entities.parquet", columns=["title"]).to_pylist()]
    assert np.abs(vecs - encode_by_length(enc, titles, 256, 2048)).max() < 1e-5
    torch_vecs = load_sentence_transformer(DEFAULT_TEXT_MODEL).encode(titles, normalize_embeddings=True)
    assert np.abs(vecs - torch_vecs).max() > 1e-3

    # select_candidates embeds captions with the index's own encoder: a caption naming an
    # entity still ranks it first under int8.
    captions = write_parquet(tmp_path / "captions.parquet",
                             [{"URL": f"http://x/{i}.jpg", "TEXT": t} for i, t in enumerate(EXACT_TITLE_CASES)])
    out = tmp_path / "cands"
    s = select_candidates.run(["--entity_index", str(index), "--captions", captions, "--output", str(out),
                               "--per_caption_entities", "1", "--k", "10", "--min_score", "0"])
    assert s["count_check"] == "ok"
    assert {r["caption"]: r["qid"] for r in read_candidates(out)} == EXACT_TITLE_CASES
    with pytest.raises(UsageError, match="--text_backend torch: the entity index was embedded with the onnx-int8 encoder"):
        select_candidates.run(["--entity_index", str(index), "--captions", captions, "--output", str(out),
                               "--text_backend", "torch"])


def test_static_distillation_is_the_mean_of_token_vectors(tmp_path):
    from transforms.models.text_encoder import STATIC_DIR, load_encoder_dir
    from transforms.models.text_export import distill_static

    folder = tmp_path / "static"
    # A slice of the vocabulary keeps the test fast (the product distils all 30,522 tokens).
    config = distill_static(DEFAULT_TEXT_MODEL, str(folder), vocabulary=3000)
    assert config["backend"] == "static" and config["vocabulary"] == 30522
    enc = load_encoder_dir(str(folder), threads=1)
    weights = enc[0].embedding.weight.detach().numpy()
    assert np.abs(weights[3000:]).max() == 0 and np.linalg.norm(weights[1996]) == pytest.approx(1.0, abs=1e-4)
    text = "the of and in"
    ids = enc[0].tokenizer.encode(text, add_special_tokens=False).ids
    assert all(i < 3000 for i in ids) and len(ids) == 4
    want = weights[ids].mean(0)
    want /= np.linalg.norm(want)
    got = encode_by_length(enc, [text, "and", text])  # no attention: a text's tokens alone decide
    assert np.abs(got[0] - want).max() < 1e-5 and np.abs(got[2] - want).max() < 1e-5
    # A damaged copy is refused.
    victim = next(p for p in (folder / STATIC_DIR).rglob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(OSError, match="sha256"):
        load_encoder_dir(str(folder))
