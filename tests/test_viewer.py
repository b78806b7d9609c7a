"""viewer.html with thousands of rejects, in a real headless Chromium: a filter builds only
the cards it shows (a page at a time) and decodes only their images; "Show more" builds the
next page; the counts a person reads are the data's."""

import base64
import dataclasses
import io
import json

import pytest
from PIL import Image

from transforms.report.viewer import PAGE_SIZE, write_viewer
from transforms.schema import Reject

REASONS = {"near_duplicate_of_eval": 1500, "undecodable_image": 1000, "missing_entity": 500}


def _thumb(i: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(buf, format="JPEG", quality=60)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer") / "shards"
    (out / "rejected" / "decontaminate").mkdir(parents=True)
    lines, n = [], 0
    for reason, count in REASONS.items():
        for _ in range(count):
            r = Reject.of("decontaminate", reason, "planted", key=f"k{n:05d}",
                          record={"qid": f"Q{n}", "title": f"Entity {n}", "caption": f"caption {n}"})
            lines.append(dataclasses.replace(r, thumbnail=_thumb(n)).to_json())
            n += 1
    (out / "rejected" / "decontaminate" / "rejects-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n")
    counters = {f"rejected_decontaminate_{r}": c for r, c in REASONS.items()}
    manifest = {"kind": "decontaminate", "created": "2026-12-05T00:00:00Z", "counters": counters}
    (out / "manifest.json").write_text(json.dumps(manifest))
    page = write_viewer(str(out), manifest, [], max_records=10, max_rejects=sum(REASONS.values()))
    return out, page


def test_the_page_holds_every_reject_asked_for(big):
    out, page = big
    html = open(page, encoding="utf-8").read()
    data = json.loads(html.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0])
    assert len(data["records"]) == sum(REASONS.values())
    assert data["meta"]["page_size"] == PAGE_SIZE
    # Shared between reasons: the rarest reason is all there.
    by_reason = {r: sum(x["reason"] == r for x in data["records"]) for r in REASONS}
    assert by_reason == REASONS


@pytest.mark.slow
def test_thousands_of_rejects_stay_responsive_in_chromium(big, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.helpers import chrome_driver

    out, page = big
    total = sum(REASONS.values())
    driver = chrome_driver()

    def state():
        return driver.execute_script(
            "const d = document.body.dataset; return {shown: +d.shown, matching: +d.matching, built: +d.built,"
            " images: +d.imagesLoaded, cards: document.querySelectorAll('#grid .card').length};")

    def images_settle(n):
        WebDriverWait(driver, 30).until(lambda d: state()["images"] == n)

    try:
        driver.get((out / "viewer.html").as_uri())
        # All 3,000 match; one page is built and only its images are decoded.
        images_settle(PAGE_SIZE)
        assert state() == {"shown": PAGE_SIZE, "matching": total, "built": PAGE_SIZE, "images": PAGE_SIZE, "cards": PAGE_SIZE}
        # "Show more" twice: two more pages, built on demand.
        for _ in range(2):
            driver.find_element(By.ID, "more").click()
        images_settle(3 * PAGE_SIZE)
        assert state()["cards"] == state()["shown"] == 3 * PAGE_SIZE
        # A filter by reason: its matches counted over the data, its first page shown.
        driver.get((out / "viewer.html").as_uri() + "#reason=decontaminate%20%2F%20missing_entity")
        driver.refresh()
        images_settle(PAGE_SIZE)
        s = state()
        assert (s["matching"], s["shown"], s["cards"]) == (REASONS["missing_entity"], PAGE_SIZE, PAGE_SIZE)
        reasons = driver.execute_script("return [...document.querySelectorAll('#grid .badge.rejected')].map(b => b.textContent)")
        assert set(reasons) == {"decontaminate / missing_entity"}
        # An entity search on the title narrows to one card.
        box = driver.find_element(By.ID, "f-entity")
        box.send_keys("Entity 2999")
        WebDriverWait(driver, 10).until(lambda d: state()["matching"] == 1)
        assert state()["cards"] == 1
        assert "Entity 2999" in driver.find_element(By.ID, "grid").text
        driver.save_screenshot(str(tmp_path / "viewer-paging.png"))
    finally:
        driver.quit()
    assert (tmp_path / "viewer-paging.png").stat().st_size > 5_000
