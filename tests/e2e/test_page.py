"""The digit page (client/page.py) in a real headless Chromium, driven by Selenium, against the session's
real TorchServe: draw a digit with mouse strokes, get the right class and the saliency map; also the
page's own checks and that the inference key never reaches the browser.

Needs Debian's ``chromium`` and ``chromium-driver``; when they are missing and we are root with apt-get,
the fixture installs them (``apt-get install -y chromium chromium-driver``), else the test fails saying so.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from client.api import TorchServeClient
from client.page import make_server, mnist_pixels
from servers import clean_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1200,900")


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), installing Debian's packages first when missing."""
    def found():
        return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

    chromium, driver = found()
    if not (chromium and driver) and shutil.which("apt-get") and os.geteuid() == 0:
        env = clean_env(DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], env=env, check=False,
                       capture_output=True, timeout=1200)
        chromium, driver = found()
    if not (chromium and driver):
        pytest.fail("the page test needs chromium and chromedriver: apt-get install -y chromium chromium-driver")
    return chromium, driver


@pytest.fixture(scope="module")
def page(server):
    client = TorchServeClient(server.inference_url, server.management_url, key_file=server.key_file)
    httpd = make_server(client, "mnistnet", "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        client.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def draw(driver, strokes: list[list[tuple[float, float]]]) -> None:
    """Mouse strokes on the 280x280 drawing canvas; points in [0, 1] canvas fractions."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "draw")
    size = canvas.size
    for stroke in strokes:
        actions = ActionChains(driver, duration=10)
        x0, y0 = stroke[0]
        # Offsets are from the element's centre.
        actions.move_to_element_with_offset(canvas, int((x0 - 0.5) * size["width"]), int((y0 - 0.5) * size["height"]))
        actions.click_and_hold()
        previous = (x0, y0)
        for x, y in stroke[1:]:
            steps = 8
            for k in range(1, steps + 1):
                px = previous[0] + (x - previous[0]) * k / steps
                py = previous[1] + (y - previous[1]) * k / steps
                actions.move_to_element_with_offset(canvas, int((px - 0.5) * size["width"]), int((py - 0.5) * size["height"]))
            previous = (x, y)
        actions.release()
        actions.perform()


def classify(driver, timeout: float = 60) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "classify").click()
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                         in ("done", "error"))
    state = driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")
    assert state == "done", driver.find_element(By.ID, "error").text
    bars = driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar")
    return {
        "predicted": int(driver.find_element(By.ID, "prediction").text),
        "probabilities": [float(bar.get_attribute("data-p")) for bar in bars],
        "details": driver.find_element(By.ID, "details").text,
    }


def heatmap_pixels(driver) -> np.ndarray:
    """The saliency canvas as an RGB array (read back through the canvas API in the browser)."""
    data = driver.execute_script(
        "const c = document.getElementById('heatmap');"
        "return c.toDataURL('image/png');"
    )
    import base64

    raw = base64.b64decode(data.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)


SEVEN = [[(0.25, 0.2), (0.75, 0.2)], [(0.75, 0.2), (0.42, 0.85)]]
ONE = [[(0.52, 0.15), (0.5, 0.85)]]


@pytest.mark.parametrize("digit, strokes", [(7, SEVEN), (1, ONE)])
def test_draw_a_digit_and_see_probabilities_and_saliency(page, browser, tmp_path, digit, strokes):
    from selenium.webdriver.common.by import By

    browser.get(page.url)
    assert browser.find_element(By.ID, "model").text == "mnistnet"
    browser.find_element(By.ID, "clear").click()
    draw(browser, strokes)
    result = classify(browser)
    browser.save_screenshot(str(tmp_path / f"page_digit_{digit}.png"))
    assert (tmp_path / f"page_digit_{digit}.png").stat().st_size > 10_000
    assert result["predicted"] == digit, result
    assert len(result["probabilities"]) == 10 and sum(result["probabilities"]) == pytest.approx(1, abs=1e-3)
    assert int(np.argmax(result["probabilities"])) == digit
    assert "integrated_gradients" in result["details"] and f"class {digit}" in result["details"]
    heat = heatmap_pixels(browser)
    red = (heat[..., 0] - heat[..., 2] > 80).sum()  # positive evidence, drawn red over the digit
    assert red > 500, red


def test_the_key_never_reaches_the_browser(page, browser, server):
    browser.get(page.url)
    key = server.keys()["inference"]
    assert key not in browser.page_source
    draw(browser, ONE)
    classify(browser)
    assert key not in browser.page_source
    logs = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(page.url.rstrip("/")) for name in logs), logs  # only the page's own server


def test_page_api_errors(page):
    url = page.url + "api/explain"
    assert requests.post(url, data=b"not an image", timeout=30).status_code == 400
    blank = io.BytesIO()
    Image.new("L", (280, 280), 0).save(blank, format="PNG")
    empty = requests.post(url, data=blank.getvalue(), timeout=30)
    assert empty.status_code == 400 and "empty" in empty.json()["error"]
    assert requests.get(page.url + "nothing", timeout=10).status_code == 404


def test_dropped_picture_dark_ink_on_white_is_inverted_and_centred(page, mnist_test):
    images, labels = mnist_test
    seven = images[int(np.flatnonzero(labels == 7)[0])]
    big = Image.fromarray(255 - seven).resize((300, 300), Image.NEAREST)  # black 7 on white, 10x larger
    prepared = mnist_pixels(big)
    assert prepared.shape == (28, 28) and prepared[0].max() == 0 and prepared.max() > 0.9
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    answer = requests.post(page.url + "api/explain", data=buffer.getvalue(), timeout=60).json()
    assert answer["predicted_class"] == 7 and np.shape(answer["attributions"]) == (28, 28)
