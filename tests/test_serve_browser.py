"""The page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, which `make test`
does not install but `.ci/run` does) driven by Selenium against a real `finesam serve`."""

import base64
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from finesam.amg.rle import from_coco, rle_to_mask
from finesam.weights import convert_checkpoint

from conftest import SMALL, photo
from official import build_official
from served import Served


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(
            "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("browser")
    checkpoint = folder / "sam_hq_small.pth"
    torch.save(build_official(SMALL, seed=7, hq=True).state_dict(), checkpoint)
    base, hq = convert_checkpoint(checkpoint, folder).written
    server = Served("--weights", base, "--hq", hq)
    yield server
    server.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,950"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield session
    session.quit()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def overlay_mask(browser: Any, view: str = "main") -> np.ndarray:
    """The pixels the page tinted (alpha > 0) on its overlay canvas, which has the image's size."""
    url = browser.execute_script(f"return document.getElementById('overlay-{view}').toDataURL('image/png')")
    picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return np.asarray(picture.convert("RGBA"))[..., 3] > 0


def api_union(served: Served, image_id: str, requests: list[dict]) -> np.ndarray:
    """The union of the masks the API gives for the page's requests (the best candidate of each)."""
    union = None
    for body in requests:
        status, answer = served.call("POST", f"/api/images/{image_id}/masks", body)
        assert status == 200, answer
        best = max(answer["masks"], key=lambda m: m["score"])
        mask = rle_to_mask(from_coco(best["rle"]))
        union = mask if union is None else union | mask
    assert union is not None
    return union


def test_click_drag_hq_toggle_and_export(served, browser, downloads, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    image_file = tmp_path / "rocket.png"
    photo("rocket").save(image_file)
    browser.get(served.page)
    wait_for(lambda: "SAM" in browser.find_element(By.ID, "model").text, "the model description")
    browser.find_element(By.ID, "file").send_keys(str(image_file))
    image_id = wait_for(lambda: browser.execute_script("return finesam.image && finesam.image.id"), "the upload")
    canvas = browser.find_element(By.ID, "prompts-main")
    wait_for(lambda: canvas.size["width"] > 100, "the image on the page")
    width, height = canvas.size["width"], canvas.size["height"]

    def drawn() -> bool:  # every request answered and the canvases redrawn
        return browser.execute_script("return finesam.busy === 0")

    def results() -> list[Any]:
        return browser.execute_script("return finesam.objects.map(o => o.results.main ? o.results.main.request : null)")

    # a foreground click on the rocket (offsets are from the canvas centre)
    ActionChains(browser).move_to_element_with_offset(canvas, 0, -height // 10).click().perform()
    wait_for(lambda: results() and results()[0] and drawn(), "the first mask")
    # a second object from a dragged box
    browser.find_element(By.TAG_NAME, "body").send_keys("n")
    actions = ActionChains(browser).move_to_element_with_offset(canvas, -width // 3, -height // 3).click_and_hold()
    actions.move_by_offset(width // 4, height // 4).move_by_offset(width // 8, height // 8).release().perform()
    wait_for(lambda: len(results()) == 2 and results()[1] and drawn(), "the box's mask")
    requests = results()
    assert requests[0]["points"] and requests[0]["labels"] == [1] and requests[0]["box"] is None
    assert requests[1]["box"] is not None and "points" not in requests[1]
    sam = overlay_mask(browser)
    np.testing.assert_array_equal(sam, api_union(served, image_id, requests))
    assert sam.any()

    browser.find_element(By.ID, "hq").click()
    wait_for(lambda: all(r and r["hq"] for r in results()) and drawn(), "the HQ-SAM masks")
    hq = overlay_mask(browser)
    np.testing.assert_array_equal(hq, api_union(served, image_id, results()))
    assert not np.array_equal(hq, sam)  # HQ-SAM's masks differ (random HQ weights)

    browser.find_element(By.ID, "export-coco").click()
    coco_file = wait_for(lambda: next(downloads.glob("rocket_coco.json"), None), "the COCO export")
    time.sleep(0.3)  # the download is renamed when complete
    coco = json.loads(coco_file.read_text())
    assert coco["images"][0] == {"id": 1, "file_name": "rocket.png", "width": 800, "height": 534}
    exported = [rle_to_mask(from_coco(a["segmentation"])) for a in coco["annotations"]]
    assert len(exported) == 2
    np.testing.assert_array_equal(exported[0] | exported[1], hq)
    browser.find_element(By.ID, "export-polygons").click()
    polygons = json.loads(wait_for(lambda: next(downloads.glob("rocket_polygons.json"), None), "polygons").read_text())
    for annotation in polygons["annotations"]:
        assert annotation["segmentation"] and all(
            len(ring) >= 6 and len(ring) % 2 == 0 for ring in annotation["segmentation"]
        )
        xs = [v for ring in annotation["segmentation"] for v in ring[0::2]]
        assert min(xs) >= 0 and max(xs) < 800

    browser.find_element(By.ID, "compare").click()  # SAM | HQ-SAM side by side, for the picture
    both = "return finesam.objects.every(o => o.results.hq)"
    wait_for(lambda: browser.execute_script(both) and drawn(), "the compare view")
    np.testing.assert_array_equal(overlay_mask(browser, "hq"), hq)
    np.testing.assert_array_equal(overlay_mask(browser, "main"), sam)
    shot = Path(os.environ.get("FINESAM_SCREENSHOT") or tmp_path / "serve.png")
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000

    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, "z")  # undo the box
    wait_for(lambda: results()[1:] == [None] and results()[0] and drawn(), "the undone box")
    np.testing.assert_array_equal(overlay_mask(browser, "main"), api_union(served, image_id, results()[:1]))
