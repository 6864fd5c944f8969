"""The console page (/ui) in a real browser, against the embedded default: a streamed generation, an edit of an
uploaded PNG, an error in words, and the fleet view. After each test the browser's request log must show no
request outside the service, and its console no request the Content-Security-Policy refused."""

from __future__ import annotations

import pytest

from tests.browser import assert_stayed_on, fill, policy_violations, requested_urls, save_screenshot, wait

pytestmark = pytest.mark.integration


@pytest.fixture
def page(browser, service):
    """The browser on a fresh console page; afterwards, its request log and console are checked."""
    requested_urls(browser), policy_violations(browser)  # drain what earlier tests left
    browser.get(service.url + "/ui")
    wait(browser, lambda d: d.find_elements("css selector", "#model option"))
    yield browser
    assert_stayed_on(browser, service.url)


def final_images(driver):
    return driver.find_elements("css selector", "#results .result.final")


def test_a_streamed_generation_with_a_lora_shows_previews_then_the_final_image(page, tmp_path):
    from selenium.webdriver.support.select import Select

    fill(page, "prompt", "a lighthouse at dusk")
    fill(page, "steps", "4")
    fill(page, "seed", "7")
    fill(page, "partial-images", "2")
    # The LoRA picker offers the variant's LoRAs from the allow-list (embedded: one per base model).
    loras = [o.get_attribute("value") for o in page.find_elements("css selector", "#lora option")]
    assert loras == ["", "tiny-style"], loras
    Select(page.find_element("id", "lora")).select_by_value("tiny-style")
    fill(page, "lora-scale", "0.8")
    assert page.find_element("id", "stream").is_selected()
    page.find_element("id", "submit").click()
    (card,) = wait(page, final_images)
    log = [item.text for item in page.find_elements("css selector", "#event-log li")]
    assert log[0].startswith("preview") and log[-1] == "final image 1" and len(log) >= 2, log
    assert int(card.get_attribute("data-previews")) >= 1 and card.get_attribute("data-seed") == "7"
    assert page.execute_script("return arguments[0].querySelector('img').naturalWidth", card) == 256
    link = card.find_element("css selector", "a[download]")
    assert link.get_attribute("download") == "imageserve-z-image-turbo-seed7.png"
    assert link.get_attribute("href").startswith("blob:")
    # The embedded default shows its internals: a CPU replica, outside GPU pools.
    assert "seed 7" in card.text and "pool none · cpu" in card.text
    page.execute_script("window.scrollTo(0, document.body.scrollHeight)")  # the result in the picture
    save_screenshot(page, tmp_path, "console-playground.png")


def test_an_edit_of_an_uploaded_png_shows_its_result(page, tmp_path):
    from PIL import Image

    upload = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(upload)
    page.find_element("css selector", "input[name=task][value=edit]").click()
    wait(page, lambda d: d.find_element("id", "edit-inputs").is_displayed())
    models = [o.get_attribute("value") for o in page.find_elements("css selector", "#model option")]
    assert models and "z-image-turbo" not in models, models  # the picker lists what takes edits
    page.find_element("id", "images").send_keys(str(upload))
    wait(page, lambda d: d.find_elements("css selector", "#thumbs img"))
    fill(page, "prompt", "make the sky orange")
    fill(page, "size", "64x64")
    fill(page, "steps", "2")
    page.find_element("id", "stream").click()  # off: a plain answer
    page.find_element("id", "submit").click()
    (card,) = wait(page, final_images)
    assert page.execute_script("return arguments[0].querySelector('img').naturalWidth", card) == 64
    assert card.get_attribute("data-previews") == "0"
    assert not page.find_element("id", "error").is_displayed()


def test_an_unknown_size_shows_the_services_message(page, http):
    fill(page, "prompt", "a fox")
    fill(page, "size", "1000x999")
    page.find_element("id", "submit").click()
    error = wait(page, lambda d: d.find_element("id", "error") if d.find_element("id", "error").is_displayed()
                 else None)
    refusal = http.post("/v1/images/generations", json={"prompt": "a fox", "size": "1000x999"})
    assert refusal.status_code in (400, 422)
    assert refusal.json()["error"]["message"] in error.text and str(refusal.status_code) in error.text
    assert final_images(page) == []


def test_the_fleet_view_lists_every_served_variant_with_a_running_replica(page, http, tmp_path):
    models = http.get("/v1/models").json()["data"]
    served = {card["id"] for card in models if card.get("replicas")}
    assert served  # the embedded default serves a generation and an edit model
    page.find_element("id", "tab-fleet").click()

    def rows(driver):
        found = {row.get_attribute("data-variant"): row for row in
                 driver.find_elements("css selector", "#variants tbody tr[data-variant]")}
        return found if set(found) >= served else None

    shown = wait(page, rows)
    for variant in served:
        assert int(shown[variant].get_attribute("data-running")) >= 1, variant
        assert "ready" in shown[variant].text
    pools = page.find_elements("css selector", "#pools tbody tr[data-pool]")
    assert [p.get_attribute("data-pool") for p in pools] == ["default"]
    assert "updated" in page.find_element("id", "fleet-updated").text
    save_screenshot(page, tmp_path, "console-fleet.png")
