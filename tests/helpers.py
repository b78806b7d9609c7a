"""Builders for test corpora: LAION-style Parquet, webdataset tars and images drawn in code."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw


def draw_image(seed: int, size=(64, 48), fmt="JPEG") -> bytes:
    """A small distinct image: a coloured background and a shape that depend on `seed`."""
    r, g, b = (seed * 67) % 256, (seed * 131) % 256, (seed * 199) % 256
    img = Image.new("RGB", size, (r, g, b))
    d = ImageDraw.Draw(img)
    x = 5 + seed % (size[0] - 20)
    d.rectangle([x, 8, x + 14, 30], fill=(255 - r, 255 - g, 255 - b))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_webdataset(path, samples, truncate_at: int | None = None):
    """samples: dicts with key and any of txt (str|bytes), json (dict), jpg (bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            for ext in ("jpg", "txt", "json"):
                if ext not in s:
                    continue
                data = s[ext]
                if ext == "json":
                    data = json.dumps(data).encode()
                elif isinstance(data, str):
                    data = data.encode("utf-8")
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if truncate_at is not None:
        data = data[:truncate_at]
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def write_parquet(path, rows=None, table=None, row_group_size=None):
    table = table if table is not None else pa.Table.from_pylist(rows)
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def write_title_vocab(catalog_path, path) -> str:
    """A word-piece vocab.txt covering a catalog's titles (lower-cased: every character,
    its `##` continuation, every whole word), for build_codes' `--tokenizer` offline.
    Returns the path."""
    titles = [json.loads(line)["wikipedia_title"].lower() for line in open(catalog_path) if line.strip()]
    chars = sorted({c for t in titles for c in t if not c.isspace()})
    words = sorted({w for t in titles for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *[w for w in words if w not in chars]]
    with open(path, "w") as f:
        f.write("\n".join(dict.fromkeys(vocab)) + "\n")
    return str(path)


def read_rejects(output_dir) -> list[dict]:
    out = []
    for p in sorted(glob.glob(os.path.join(output_dir, "rejected", "*", "*.jsonl"))):
        with open(p, encoding="utf-8") as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def read_candidates(output_dir, prefix="candidates") -> list[dict]:
    files = sorted(glob.glob(os.path.join(output_dir, f"{prefix}-*.parquet")))
    assert files, f"no {prefix}-*.parquet in {output_dir}"
    return pq.read_table(files).to_pylist()


def chrome_driver(downloads=None, window="1280,1000"):
    """Debian's headless Chromium driven through its WebDriver (Selenium), as a person's
    browser; `downloads` is where files the page saves land."""
    import shutil

    import pytest
    from selenium import webdriver

    from tests.test_demo import _chromium

    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        pytest.fail("no chromedriver on this machine: install Debian's `chromium-driver` package (.ci/run does)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={window}"):
        opts.add_argument(arg)
    if downloads is not None:
        opts.add_experimental_option("prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    if downloads is not None:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    return driver


def every_pipeline_inputs(root, catalog_path) -> dict:
    """Small inputs for every pipeline (tests that run them all on one backend: a flaky
    object store, a Dask cluster): 3 webdataset shards of 20 captioned images, an
    evaluation folder holding a copy of one, 20 OVEN rows with their images, a word-piece
    vocabulary of the catalog's titles."""
    from pathlib import Path

    root = Path(root)
    wds = root / "wds"
    wds.mkdir()
    captions = ["Eiffel Tower at night", "Statue of Liberty from the ferry", "Taj Mahal at dawn", "a cat on a sofa"]
    for t in range(3):
        write_webdataset(wds / f"{t:05d}.tar", [{"key": f"{i:04d}", "jpg": draw_image(t * 20 + i), "txt": captions[i % 4]}
                                                for i in range(20)])
    evals = root / "eval"
    evals.mkdir()
    (evals / "copy.jpg").write_bytes(draw_image(0))
    images = root / "oven_images"
    images.mkdir()
    for i in range(20):
        (images / f"oven_{i:03d}.jpg").write_bytes(draw_image(500 + i))
    oven = root / "oven.jsonl"
    with open(oven, "w") as f:
        for i in range(20):
            f.write(json.dumps({"data_id": f"d{i:03d}", "image_id": f"oven_{i:03d}", "question": "what is this?",
                                "entity_id": "Q243", "data_split": "entity_train"}) + "\n")
    write_title_vocab(catalog_path, root / "vocab.txt")
    return {"root": root, "catalog": catalog_path, "wds": str(wds / "*.tar"), "eval": str(evals), "oven": str(oven),
            "images": str(images), "vocab": str(root / "vocab.txt")}
