"""A real browser for the console's tests: Debian's headless Chromium, driven by selenium through Debian's
chromedriver (both installed by `make test`).

Chromium starts with the flags that keep it off the network on its own (no background networking, component
updates, sync or QUIC), in a fresh profile. Its DevTools performance log records every request the page makes,
so a test can check that the page reached nothing but the service (``requests_outside``), and its console log
shows what the Content-Security-Policy refused (``policy_violations``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("IMAGESERVE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("IMAGESERVE_CHROMEDRIVER", "/usr/bin/chromedriver")
# Where `IMAGESERVE_CONSOLE_SCREENSHOTS=docs/images` copies the views' screenshots (docs/console.md says how).
SCREENSHOTS_ENV = "IMAGESERVE_CONSOLE_SCREENSHOTS"
WAIT_S = 300  # the longest a page waits for the service: a tiny edit on a loaded two-core machine, many times over


def start_chromium(profile: Path):
    """A headless Chromium under selenium, with its request and console logs on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), f"{path} not found: run `make test`, which installs Debian's chromium and " \
                                    "chromium-driver"
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for a driver online: the path is given
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--window-size=1280,1000", "--force-device-scale-factor=1",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    return driver


def wait(driver, condition):
    """``condition(driver)`` once it is truthy: polled, with a deadline far past what any step takes here."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition)


def fill(driver, field_id: str, text: str) -> None:
    field = driver.find_element("id", field_id)
    field.clear()
    field.send_keys(text)


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for since the last call (DevTools' Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


# Schemes that reach a network. The log also holds the data: and blob: URLs the page makes of its images, and
# Chromium's own chrome:// pages (its internal resources, read from the binary).
NETWORK_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp"})


def requests_outside(urls: list[str], origin: str) -> list[str]:
    """The URLs that went to the network anywhere but ``origin`` (the service)."""
    allowed = urlsplit(origin).netloc
    return [url for url in urls if urlsplit(url).scheme in NETWORK_SCHEMES and urlsplit(url).netloc != allowed]


def assert_stayed_on(driver, origin: str) -> None:
    """Since the last check: the page made requests (the log works), all to ``origin``, none refused by its
    Content-Security-Policy."""
    urls = requested_urls(driver)
    assert any(url.startswith(origin) for url in urls), urls
    assert requests_outside(urls, origin) == []
    assert policy_violations(driver) == []


def policy_violations(driver) -> list[str]:
    """The console's messages about something the Content-Security-Policy refused, since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if "Content Security Policy" in entry["message"]]


def save_screenshot(driver, folder: Path, name: str) -> Path:
    """A PNG of the window into ``folder`` (the test's own), and into $IMAGESERVE_CONSOLE_SCREENSHOTS when set."""
    path = folder / name
    driver.save_screenshot(str(path))
    if os.environ.get(SCREENSHOTS_ENV):
        from PIL import Image

        # A 256-colour copy for the docs: a page of flat colours loses nothing seen, and the picture stays small.
        target = Path(os.environ[SCREENSHOTS_ENV])
        target.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as shot:
            shot.convert("RGB").quantize(256).save(target / name, optimize=True)
    return path
