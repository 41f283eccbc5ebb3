"""The scheduler's web page in headless Chromium (Debian's, driven by Playwright): a running job listed, its
progress moving, one thumbnail per image when it is done; without a token, a form and no job."""

import os
import shutil
import time
import urllib.error
import urllib.request

import pytest

import renderfarm as rf
from renderfarm.cluster.config import AuthConfig
from renderfarm.cluster.keys import add_user

playwright_sync = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
IMAGES = 6
# One image a batch, long enough a loop that the page sees the job run, with previews every few steps.
SLOW = dict(model="builtin:tiny-sd", width=128, height=128, steps=30, scheduler="ddim", preview_every=5)
TIMEOUT_MS = 60_000
LOADED_IMAGES = "[...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length"
PROGRESS = "document.getElementById('job-progress-text').textContent.split(' / ').map(Number)"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("web") / "keys.toml"
    return keys_file, {name: add_user(keys_file, name) for name in ("alice", "bob")}


@pytest.fixture
def web_farm(start_farm, tokens):
    farm = start_farm(max_batch=1, auth=AuthConfig(keys_file=tokens[0]))
    farm.url = f"http://127.0.0.1:{farm.web_port}/"
    return farm


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def _save(page, tmp_path, name: str) -> None:
    """A screenshot in the test's directory, and in RENDERFARM_ARTIFACTS when set (CI keeps that)."""
    path = tmp_path / name
    page.screenshot(path=path, full_page=True)
    if artifacts := os.environ.get("RENDERFARM_ARTIFACTS"):
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(path, os.path.join(artifacts, name))


def _sign_in(page, url: str, token: str) -> None:
    page.goto(url)
    page.fill("#token", token)
    page.click("#token-form button[type=submit]")


def test_the_page_lists_a_running_job_shows_its_progress_move_and_one_thumbnail_per_image(
    web_farm, tokens, browser, tmp_path
):
    expect = playwright_sync.expect
    alice = tokens[1]["alice"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _sign_in(page, web_farm.url, alice)
    expect(page.locator("#list-view")).to_be_visible()
    expect(page.locator("#who")).to_have_text("alice (member)")
    with rf.Client(web_farm.address, token=alice) as client:
        started = time.monotonic()
        job = client.sweep(["a fox on the web page"], seeds=range(IMAGES), **SLOW)
        row = page.locator(f'tr.job-row[data-job-id="{job.id}"]')
        expect(row).to_be_visible(timeout=TIMEOUT_MS)
        assert row.get_attribute("data-state") in ("queued", "running")
        expect(row).to_contain_text("alice")
        row.click()

        expect(page.locator("#job-id")).to_have_text(job.id)
        # Some images done, not all: the count moves while the page watches, with the current step beside it.
        page.wait_for_function(f"() => {{ const [done, total] = {PROGRESS}; return done > 0 && done < total; }}",
                               timeout=TIMEOUT_MS)  # fmt: skip
        expect(page.locator("#job-state")).to_have_attribute("data-state", "running")
        expect(page.locator("#job-step")).to_contain_text("step", timeout=TIMEOUT_MS)
        expect(page.locator("#cancel")).to_be_visible()
        _save(page, tmp_path, "web-running.png")

        expect(page.locator("#job-state")).to_have_attribute("data-state", "succeeded", timeout=TIMEOUT_MS)
        page.wait_for_function(f"() => {LOADED_IMAGES} === {IMAGES}", timeout=TIMEOUT_MS)
        print(f"the job took {time.monotonic() - started:.1f} s from submission to its thumbnails")
        assert page.evaluate(LOADED_IMAGES) == IMAGES
        expect(page.locator("#job-progress-text")).to_have_text(f"{IMAGES} / {IMAGES}")
        expect(page.locator("#cancel")).to_be_hidden()
        assert job.status().completed == IMAGES
        _save(page, tmp_path, "web.png")

        # A thumbnail opens the full image and its spec.
        page.locator("#results button.thumb").first.click()
        expect(page.locator("#viewer-parameters")).to_contain_text("Seed:")
        page.wait_for_function("() => document.getElementById('viewer-image').naturalWidth === 128")
        page.click("#viewer button[type=submit]")

        # The grid of its results, seeds across (the axis offered first).
        page.click("#grid-form button[type=submit]")
        page.wait_for_function("() => document.getElementById('grid-image').naturalWidth > 0")
        _save(page, tmp_path, "web-grid.png")
    page.close()


def test_without_a_token_the_page_asks_for_one_and_shows_no_job(web_farm, tokens, browser):
    expect = playwright_sync.expect
    with rf.Client(web_farm.address, token=tokens[1]["alice"]) as client:
        job = client.sweep(["a fox nobody sees"], model="builtin:tiny-sd", width=64, height=64, steps=2)
        job.wait()
    # The API itself: no token, no jobs.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{web_farm.url}api/jobs", timeout=10)
    assert refused.value.code == 401

    context = browser.new_context()
    page = context.new_page()
    page.goto(web_farm.url)
    expect(page.locator("#token-form")).to_be_visible()
    expect(page.locator("#list-view")).to_be_hidden()
    assert page.locator("tr.job-row").count() == 0
    # A job's address without a token: the form again, and nothing of the job.
    page.goto(f"{web_farm.url}#/jobs/{job.id}")
    expect(page.locator("#token-form")).to_be_visible()
    expect(page.locator("#job-view")).to_be_hidden()
    # A wrong token is refused, and still no job shows.
    _sign_in(page, web_farm.url, "rf_not-a-token")
    expect(page.locator("#login-error")).to_contain_text("refused")
    assert page.locator("tr.job-row").count() == 0
    # Bob's token: his (empty) list, never Alice's job.
    _sign_in(page, web_farm.url, tokens[1]["bob"])
    expect(page.locator("#no-jobs")).to_be_visible()
    assert page.locator(f'tr.job-row[data-job-id="{job.id}"]').count() == 0
    context.close()
