"""The chat page in a real headless browser (Debian's chromium and chromedriver, driven by selenium)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette")
selenium = pytest.importorskip("selenium")

import jishi  # noqa: E402
from serving import LiveServer, artifacts_dir, build_endless  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or not Path(DRIVER).exists(),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does it as root)")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, tiny_tokenizer):
    # Speculation off: the page's stop button needs an answer that is still being written when it looks.
    model = jishi.load(build_endless(tiny_tokenizer, tmp_path_factory.mktemp("page"), adapter=True), threads=1,
                       speculation="off")
    with LiveServer(model, max_concurrent=2, queue=2, max_tokens=4000) as s:
        yield s


def browser(width: int, height: int, phone: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    if phone:
        opts.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": width, "height": height,
                                                                           "pixelRatio": 2, "touch": True}})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def wait(driver, predicate, timeout=20.0, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d), f"{what} did not happen")


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def replies(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def send(driver, text):
    by_id(driver, "input").send_keys(text)
    by_id(driver, "send").click()


def test_chat_streams_stops_switches_skill_and_starts_over(page_server, caplog):
    from selenium.webdriver.support.ui import Select

    s = page_server
    name = s.server.model.name
    d = browser(1100, 800)
    try:
        d.get(s.url + "/")
        wait(d, lambda d: len(Select(by_id(d, "model")).options) == 2, what="the skills list")
        assert [o.text for o in Select(by_id(d, "model")).options] == ["general", "alpha"]
        assert by_id(d, "title").text == name

        with caplog.at_level("INFO", logger="jishi.server"):
            send(d, "What is a list?")
            # Text arrives while the answer is still being written (4000 tokens: many seconds).
            wait(d, lambda d: len(replies(d)) == 1 and len(replies(d)[0].text) > 20, what="streamed text")
            assert by_id(d, "stop").is_displayed() and not by_id(d, "send").is_displayed()
            first = replies(d)[0].text
            wait(d, lambda d: len(replies(d)[0].text) > len(first) + 20, what="more streamed text")
            shot = artifacts_dir() / "chat-page.png"
            d.save_screenshot(str(shot))
            print(f"screenshot: {shot}")
            by_id(d, "stop").click()
            wait(d, lambda d: "(stopped)" in replies(d)[0].text, what="the stop")
            assert by_id(d, "send").is_displayed()
            wait(d, lambda d: s.health()["active"] == 0, what="the slot being freed")  # the abort reached the server

            Select(by_id(d, "model")).select_by_visible_text("alpha")
            send(d, "And a tuple?")
            wait(d, lambda d: len(replies(d)) == 2 and len(replies(d)[1].text) > 5, what="the second answer")
            by_id(d, "stop").click()
            wait(d, lambda d: "(stopped)" in replies(d)[1].text, what="the second stop")
            wait(d, lambda d: s.health()["active"] == 0, what="the second slot being freed")
        models = [r.getMessage() for r in caplog.records if "/v1/chat/completions" in r.getMessage()]
        assert f"model={name} " in models[0] and f"model={name}:alpha " in models[1]
        assert all("finish=cancelled" in m for m in models[:2])

        by_id(d, "new").click()
        assert replies(d) == [] and by_id(d, "hint").is_displayed()
        assert d.execute_script("return localStorage.getItem('jishi-model')") == f"{name}:alpha"
    finally:
        d.quit()


def test_the_page_fits_a_phone(page_server):
    d = browser(390, 780, phone=True)
    try:
        d.get(page_server.url + "/")
        wait(d, lambda d: d.execute_script("return document.querySelectorAll('#model option').length") == 2)
        send(d, "Hello")
        wait(d, lambda d: len(replies(d)) == 1 and len(replies(d)[0].text) > 40, what="streamed text")
        width = d.execute_script("return window.innerWidth")
        assert width == 390
        assert d.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scrolling
        for element in ("input", "stop", "model", "new"):
            box = d.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.right, r.bottom];",
                                   by_id(d, element))
            assert 0 <= box[0] and box[1] <= width and box[2] <= 780, (element, box)
        shot = artifacts_dir() / "chat-page-phone.png"
        d.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        by_id(d, "stop").click()
        wait(d, lambda d: "(stopped)" in replies(d)[0].text, what="the stop")
    finally:
        d.quit()
