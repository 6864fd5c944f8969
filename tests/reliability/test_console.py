"""The console in a real browser against the reliability service: the /secure application (keys on, internals
hidden) asks for a key, shows the refusal of a wrong one in words, works with a right one, keeps it in the tab's
sessionStorage only, and shows only what a public caller may learn of the fleet; and a stream that fails after it
began shows the failure in words."""

from __future__ import annotations

import pytest
from selenium.webdriver.support.select import Select

from tests.browser import assert_stayed_on, fill, policy_violations, requested_urls, wait

pytestmark = pytest.mark.integration


def key_panel_says(driver, words: str):
    panel = driver.find_element("id", "key-panel")
    return panel if panel.is_displayed() and words in driver.find_element("id", "key-error").text else None


def give_key(driver, key: str) -> None:
    fill(driver, "key-input", key)
    # The form's handler hides the panel and clears its message before it calls the API: what shows next is the
    # answer to this key.
    driver.find_element("css selector", "#key-form button").click()


def test_with_keys_on_the_console_refuses_without_a_key_and_works_with_one(reliable, browser, api_key, tmp_path):
    origin = reliable.url
    requested_urls(browser), policy_violations(browser)
    browser.get(origin + "/secure/ui")
    wait(browser, lambda d: key_panel_says(d, "a valid API key is required"))
    assert browser.find_elements("css selector", "#model option") == []

    give_key(browser, "sk-not-a-key")
    wait(browser, lambda d: key_panel_says(d, "a valid API key is required"))

    give_key(browser, api_key)
    wait(browser, lambda d: d.find_elements("css selector", "#model option"))
    assert not browser.find_element("id", "key-panel").is_displayed()
    assert browser.find_element("id", "key-state").text == "using an API key"
    fill(browser, "prompt", "a fox")
    fill(browser, "size", "64x64")
    fill(browser, "steps", "1")
    fill(browser, "seed", "3")
    browser.find_element("id", "stream").click()  # off
    browser.find_element("id", "submit").click()
    (card,) = wait(browser, lambda d: d.find_elements("css selector", "#results .result.final"))
    assert "seed 3" in card.text and "pool" not in card.text  # internals are hidden on /secure

    browser.find_element("id", "tab-fleet").click()
    row = wait(browser, lambda d: d.find_elements("css selector", "#variants tbody tr[data-variant=z-image-turbo]"))
    assert "ready" in row[0].text
    assert browser.find_element("id", "fleet-hidden").is_displayed()
    assert not browser.find_element("id", "pools").is_displayed()
    browser.save_screenshot(str(tmp_path / "console-keys-fleet.png"))  # the test's own folder only

    # The key lives in this tab's sessionStorage, and nowhere in the page or the other storage.
    assert browser.execute_script("return window.sessionStorage.getItem('imageserve.apiKey')") == api_key
    assert browser.execute_script("return window.localStorage.length") == 0
    assert api_key not in browser.page_source

    browser.find_element("id", "forget-key").click()
    wait(browser, lambda d: key_panel_says(d, "a valid API key is required"))
    assert browser.execute_script("return window.sessionStorage.getItem('imageserve.apiKey')") is None
    assert_stayed_on(browser, origin)


def test_a_stream_that_fails_after_it_began_shows_the_error_events_message(reliable, browser, tmp_path):
    """The reliability app's qwen-image-edit-2509 runs out of memory on a trigger prompt (a TEST DOUBLE: no CUDA
    here) after its stream began: the page shows the error event's message and code, and no image."""
    from PIL import Image

    from serve_app.engines.gpu_doubles import OOM_TRIGGER

    upload = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 90, 30)).save(upload)
    origin = reliable.url
    requested_urls(browser), policy_violations(browser)
    browser.get(origin + "/ui")
    browser.find_element("css selector", "input[name=task][value=edit]").click()
    wait(browser, lambda d: d.find_elements("css selector", "#model option[value=qwen-image-edit-2509]"))
    Select(browser.find_element("id", "model")).select_by_value("qwen-image-edit-2509")
    browser.find_element("id", "images").send_keys(str(upload))
    fill(browser, "prompt", OOM_TRIGGER)
    fill(browser, "size", "64x64")
    fill(browser, "steps", "2")
    fill(browser, "partial-images", "1")
    assert browser.find_element("id", "stream").is_selected()
    browser.find_element("id", "submit").click()
    error = wait(browser, lambda d: d.find_element("id", "error") if d.find_element("id", "error").is_displayed()
                 else None)
    assert "(out_of_memory)" in error.text and "out of memory" in error.text.lower(), error.text
    assert "HTTP" not in error.text  # the stream began with 200: the error event has no status of its own
    assert browser.find_elements("css selector", "#results .result.final") == []
    assert_stayed_on(browser, origin)
