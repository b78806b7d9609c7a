"""Hostile text in the reports of an output (issue 22, findings 6-8): the viewer shows
every card whatever the captions hold, the card's tables and plots take titles as
literal text, and `pipelines.inspect` sends no control or bidi character to a terminal."""

import io
import json
import re
import shutil
import subprocess
import sys
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import inspect as inspect_cmd
from transforms.formats.text import printable, strip_controls
from transforms.llm.cost import image_size
from transforms.report.card import md_code, md_table, md_text, write_card
from transforms.report.viewer import script_json, thumbnail

# The slow tier: .venv/bin/python -m pytest -m slow tests (docs/testing.md).
pytestmark = pytest.mark.slow

CAPTIONS = [
    "Eiffel Tower <!--<script> photo",
    "</script><script>alert(1)</script>",
    "__TITLE__ at night",
    "the __DATA__ slot",
    "evil \u202egpj.exe\u202c caption",
    "osc \x1b]52;c;ZXZpbA==\x07 and \x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\ and \x9b31m",
]
TITLES = [
    "<img src=x onerror=alert(1)>",
    "![x](http://evil/p.png)",
    "$\\foo{Sydney}$",
    "[click](javascript:alert(1)) *bold* _em_ `code` ~~s~~ | pipe # h",
    "Bidi \u2066isolate\u2069 \u202eoverride",
    "Eiffel Tower",
]


def _jpeg(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="JPEG")
    return buf.getvalue()


def _hostile_output(root):
    """A candidates output: one Parquet shard of hostile captions and titles, a reject with
    a hostile record, a manifest (the shape every pipeline writes)."""
    n = len(CAPTIONS)
    rows = {
        "key": [f"k{i}" for i in range(n)],
        "image": [_jpeg((40 * i % 256, 90, 160)) for i in range(n)],
        "url": [f"http://example.com/{i}.jpg" for i in range(n)],
        "caption": CAPTIONS,
        "qid": [f"Q{i + 1}" for i in range(n)],
        "title": [TITLES[i % len(TITLES)] for i in range(n)],
        "score": [0.4 + 0.05 * i for i in range(n)],
    }
    name = "candidates-00000-of-00001.parquet"
    pq.write_table(pa.table(rows), root / name)
    (root / "rejected" / "select").mkdir(parents=True)
    record = {"caption": "</script><!--<script> \u202e reject", "title": "__DATA__", "qid": "Q9"}
    (root / "rejected" / "select" / "rejects-00000-of-00001.jsonl").write_text(json.dumps(
        {"stage": "select", "reason": "assigned_to_other_entity", "detail": "<b>x</b> \x1b[2J", "key": "r0",
         "record_json": json.dumps(record, ensure_ascii=False)}, ensure_ascii=False) + "\n", encoding="utf-8")
    manifest = {"kind": "candidates", "count_check": "ok", "created": "2026-01-01T00:00:00+00:00", "seconds": 1.0,
                "code_version": "test", "options": {"min_score": 0.3, "captions": "<img src=x>|`x`"},
                "counters": {"candidates_read": n + 1, "rejected_select_assigned_to_other_entity": 1, "rejects_emitted": 1,
                             "written_candidates": n},
                "files": [{"name": "candidates", "format": "parquet",
                           "files": [{"path": name, "rows": n, "bytes": (root / name).stat().st_size}]}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.fixture
def hostile(tmp_path):
    root = tmp_path / "hostile_out"
    root.mkdir()
    manifest = _hostile_output(root)
    made = write_card(str(root), manifest)
    return root, made


def _data_block(html: str) -> str:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert m, "no data block"
    return m.group(1)


# ---------------------------------------------------------------------------- text helpers


def test_strip_controls_and_printable():
    assert strip_controls("plain caption") == "plain caption"
    assert strip_controls("a\x1b]52;c;QUJD\x07b") == "a ]52;c;QUJD b"
    assert strip_controls("line\r\nnext\rthird\ttab\n") == "line\nnext\nthird\ttab\n"
    assert strip_controls("x\x85y\x9bz\x7f\u2028") == "x y z  "
    assert strip_controls("\u202egpj\u202c \u2066a\u2069 \u200e\u200f\u061c") == "gpj a "
    assert strip_controls("Zoë, 東京, עברית 🗼") == "Zoë, 東京, עברית 🗼"
    assert printable("ok é 中 🗼") == "ok é 中 🗼"
    assert printable("a\x1bb\tc\nd\u202ee\x9b\u200d\U000e0041") == "a\\x1bb\\x09c\\x0ad\\u202ee\\x9b\\u200d\\U000e0041"
    assert printable(42) == "42"
    for cp in list(range(0x20)) + list(range(0x7F, 0xA0)) + [0x61C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]:
        shown = printable(f"x{chr(cp)}y")
        assert all(unicodedata.category(c) not in ("Cc", "Cf") for c in shown), hex(cp)
        kept = strip_controls(f"x{chr(cp)}y")
        assert all(unicodedata.category(c) not in ("Cc", "Cf") or c in "\t\n" for c in kept), hex(cp)


def test_text_module_imports_without_beam():
    code = ("import sys\nimport transforms.formats.text\n"
            "bad = sorted(m for m in sys.modules if m.startswith('apache_beam'))\nassert not bad, bad[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_markdown_cells_are_literal_text():
    assert md_text("Eiffel Tower") == "Eiffel Tower" and md_text(1234) == "1234" and md_text("1,234") == "1,234"
    assert md_text("assigned_to_other_entity") == "assigned_to_other_entity"  # intraword: no emphasis, kept readable
    assert md_text("_em_ __b__") == "\\_em\\_ \\_\\_b\\_\\_"
    assert md_text("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert\\(1\\)&gt;"
    assert md_text("![x](http://evil/p.png)") == "\\!\\[x\\]\\(http\\://evil/p.png\\)"
    assert md_text("a\n|b\\") == "a \\|b\\\\" and md_text("$x$ & ~y~") == "\\$x\\$ &amp; \\~y\\~"
    assert md_text("www.evil.com") == "www\\.evil.com"
    assert md_code("rejected_x") == "`rejected_x`" and md_code("a`b|c") == "``a`b\\|c``" and md_code("`x") == "`` `x ``"
    assert md_code("<img src=x>") == "&lt;img src=x&gt;"
    table = md_table(["entity", "n"], [["<b>|x", "1,234"], [md_code("c|d"), 5]])
    assert table.splitlines()[2:] == ["| &lt;b&gt;\\|x | 1,234 |", "| `c\\|d` | 5 |"]


def test_script_json_has_no_angle_bracket_and_parses_back():
    value = {"c": "</script><!--<script>&\u2028\u2029 \\< done", "n": [1, 2.5, None]}
    text = script_json(value)
    assert not set(text) & set("<>&\u2028\u2029")
    assert json.loads(text) == value


def test_thumbnail_decodes_only_through_the_guarded_decoder(monkeypatch):
    import transforms.io.images as images

    calls = []
    real = images.decode_image

    def spy(data, **kw):
        calls.append(kw)
        return real(data, **kw)

    monkeypatch.setattr(images, "decode_image", spy)
    assert thumbnail(_jpeg()).startswith("data:image/jpeg;base64,")
    assert calls and calls[0]["draft"] == (160, 160) and calls[0]["max_pixels"] <= 40_000_000
    # PostScript never reaches a plugin that runs an interpreter: refused, no thumbnail.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert thumbnail(eps) == "" and thumbnail(b"not an image") == ""
    # The token estimate reads the header through the same module.
    assert image_size(_jpeg()) == (64, 48) and image_size(eps) is None and image_size(b"") is None


# ---------------------------------------------------------------------------- viewer


def test_viewer_data_block_holds_hostile_captions_as_data(hostile):
    root, made = hostile
    page = (root / "viewer.html").read_text(encoding="utf-8")
    block = _data_block(page)
    assert "<" not in block and ">" not in block and "&" not in block
    data = json.loads(block)
    kept = [r for r in data["records"] if r["kind"] == "kept"]
    assert [r["caption"] for r in kept] == [strip_controls(c) for c in CAPTIONS]
    assert "__TITLE__ at night" in [r["caption"] for r in kept] and "the __DATA__ slot" in [r["caption"] for r in kept]
    assert all(r["img"].startswith("data:image/jpeg;base64,") for r in kept)
    # No bidi override or control character reaches the page's data.
    assert not re.search("[\u202a-\u202e\u2066-\u2069\x00-\x08\x0b-\x1f\x7f-\x9f]", json.dumps(data, ensure_ascii=False))
    # The page's own title is the folder's, substituted once; one data block, one script.
    assert page.count("<title>entityforge viewer: hostile_out (candidates)</title>") == 1
    assert page.count('<script type="application/json" id="data">') == 1


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium on this machine: install Debian's `chromium` package (.ci/run does)")


def test_viewer_shows_every_card_in_a_real_browser(hostile):
    root, _ = hostile
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--virtual-time-budget=3000", "--dump-dom", (root / "viewer.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    state = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert int(state["shown"]) == len(CAPTIONS) + 1
    assert int(state["images-loaded"]) == len(CAPTIONS)
    assert dom.count('class="card kept"') == len(CAPTIONS) and dom.count('class="card rejected"') == 1
    # Captions are text nodes: the DOM serialiser shows their "<" escaped, nothing ran or parsed.
    assert "Eiffel Tower &lt;!--&lt;script&gt; photo" in dom
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "__TITLE__ at night" in dom and "the __DATA__ slot" in dom
    assert "<script>alert(1)" not in dom and "\u202e" not in dom


# ---------------------------------------------------------------------------- card


def test_card_tables_and_plots_take_titles_as_text(hostile):
    root, made = hostile
    card = (root / "README.md").read_text(encoding="utf-8")
    tables = "\n".join(line for line in card.splitlines() if line.startswith("|"))
    assert "Most frequent entities" in card
    assert "<img" not in tables and "](" not in tables and "<b>" not in tables
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in tables and "| `--captions` | &lt;img src=x&gt;\\|\\`x\\` |" in tables
    assert "\\$\\\\foo\\{Sydney\\}\\$" in tables
    assert "\u202e" not in card and "\u2066" not in card
    # Our own figures stay readable.
    assert "| select | assigned_to_other_entity | 1 |" in card and "| `candidates_read` | 7 |" in card
    # Every plot was drawn (the math-text title did not crash matplotlib) and is a real PNG.
    names = {p.rsplit("/", 1)[-1] for p in made["plots"]}
    assert {"retrieval_score.png", "images_per_entity.png", "top_entities.png", "rejects.png"} <= names
    for path in made["plots"]:
        with Image.open(path) as im:
            assert im.format == "PNG"
            im.verify()


def test_plot_with_a_math_text_title_is_written(tmp_path):
    import matplotlib

    from transforms.report.card import Plots, plain_text

    # Whatever the user's matplotlibrc says, titles and tick labels are not parsed.
    with matplotlib.rc_context({"text.parse_math": True}), plain_text():
        plots = Plots(str(tmp_path))
        plots.bars("t", ["$\\foo{Sydney}$", "$x^$", "ok"], [3, 2, 1], "$\\foo{Sydney}$", "caption", horizontal=True)
        plots.bars("v", ["$\\foo{Sydney}$", "b"], [3, 2], "$\\bar{", "caption")
    # Plots used on its own (outside write_card) draws its labels as plain text too.
    with matplotlib.rc_context({"text.parse_math": True}):
        Plots(str(tmp_path)).bars("w", ["$\\foo{Sydney}$"], [1], "$\\foo{Sydney}$", "caption", horizontal=True)
    for name in ("t", "v", "w"):
        with Image.open(tmp_path / "plots" / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] >= 300


# ---------------------------------------------------------------------------- inspect


def test_inspect_prints_no_control_characters(hostile, capsys):
    root, _ = hostile
    assert inspect_cmd.main([str(root), "--rows", str(len(CAPTIONS))]) == 0
    text = capsys.readouterr().out
    bad = [(i, hex(ord(c))) for i, c in enumerate(text) if unicodedata.category(c) in ("Cc", "Cf") and c not in "\n\t"]
    assert not bad, bad[:10]
    # Shown, as escapes, not dropped.
    assert "\\x1b]52;c;ZXZpbA==\\x07" in text and "\\u202egpj.exe\\u202c" in text
    assert "caption: Eiffel Tower <!--<script> photo" in text
    # A data string cannot start a line of its own.
    assert all(not line.startswith("evil") for line in text.splitlines())
