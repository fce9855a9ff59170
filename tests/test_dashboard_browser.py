"""The staff dashboard in a real browser: Debian's chromium, headless, driven by Selenium through
chromium-driver, against the ASGI app served in-process (tests/live_server.py).

A staff user signs in with the form, a memory written through the API appears in the live feed
without a reload, a memory's history opens, and a dead letter is retried. Screenshots go to
test-artifacts/dashboard/ (gitignored; the path is printed). Skipped, with the reason printed,
where chromium or its driver is missing or cannot start.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from rest_framework.test import APIClient

from memories import accounts
from memories.models import EndUser, MemoryRequest, Tenant
from tests.live_server import uvicorn_live_server

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
WAIT = 15


def _skip(reason: str) -> None:
    print(f"\nSKIPPED dashboard browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator:
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _skip("selenium is not installed (the dev extra has it)")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        _skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1300"):  # fmt: skip
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except WebDriverException as exc:
        _skip(f"chromium did not start: {exc.msg}")
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        # What the browser saw last and what its console said, for a failure's post-mortem.
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "last.png"))
        logs = driver.get_log("browser")
        (ARTIFACTS / "console.log").write_text("\n".join(str(entry) for entry in logs))
        driver.quit()


@pytest.fixture
def shots() -> Iterator:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)

    def save(driver, name: str) -> None:
        driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    yield save
    print(f"\ndashboard screenshots: {ARTIFACTS}")


def test_staff_watches_a_memory_arrive_opens_its_history_and_retries_a_dead_letter(browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    User.objects.create_user("ops", password="pw-ops-123", is_staff=True)
    tenant = accounts.tenant_get_or_create(name="acme")
    alice = EndUser.objects.create(tenant=tenant, external_id="alice")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {accounts.api_key_create(tenant=tenant)[1]}")
    paris = api.post(
        "/v1/memories/direct",
        {"user_id": str(alice.id), "content": "Lives in Paris"},
        format="json",
    ).json()
    failed = _dead_letter(tenant, alice)

    with uvicorn_live_server() as base_url:
        # Signing in: the login form, then the tenant and the user from the menus.
        browser.get(f"{base_url}/dashboard/")
        wait.until(ec.presence_of_element_located((By.ID, "id_username")))
        assert "/dashboard/login/" in browser.current_url
        browser.find_element(By.ID, "id_username").send_keys("ops")
        browser.find_element(By.ID, "id_password").send_keys("pw-ops-123")
        browser.find_element(By.ID, "sign-in").click()
        wait.until(ec.presence_of_element_located((By.ID, "tenant")))
        Select(browser.find_element(By.ID, "tenant")).select_by_visible_text("acme")
        wait.until(ec.presence_of_element_located((By.ID, "user")))
        Select(browser.find_element(By.ID, "user")).select_by_visible_text("alice")
        wait.until(ec.text_to_be_present_in_element((By.ID, "memory-list"), "Lives in Paris"))
        # (textContent: the heading shows it in capitals)
        wait.until(
            lambda d: d.find_element(By.ID, "feed-status").get_attribute("textContent") == "live"
        )

        # A memory written through the API appears in the feed, with no reload.
        page_marker = browser.execute_script("return window.__marker = Math.random()")
        written = api.post(
            "/v1/memories/direct",
            {"user_id": str(alice.id), "content": "Adopted a cat named Miso"},
            format="json",
        )
        assert written.status_code == 201
        wait.until(ec.text_to_be_present_in_element((By.ID, "feed"), "Adopted a cat named Miso"))
        assert browser.execute_script("return window.__marker") == page_marker  # same page
        _charts_drawn(browser, wait)
        shots(browser, "1-dashboard-live-feed")

        # A memory's history, with its version: opened from its row in the list.
        api.patch(f"/v1/memories/{paris['id']}", {"content": "Lives in Berlin"}, format="json")
        browser.find_element(
            By.CSS_SELECTOR, f'tr[data-memory-id="{paris["id"]}"] a.history-link'
        ).click()
        wait.until(ec.presence_of_element_located((By.ID, "history")))
        assert browser.find_element(By.ID, "memory-version").text == "2"
        events = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#history .pill")]
        assert events == ["ADD", "UPDATE"]
        shots(browser, "2-memory-history")

        # The dead letter, retried from its row.
        browser.back()
        row = wait.until(
            ec.presence_of_element_located(
                (By.CSS_SELECTOR, f'tr[data-request-id="{failed.id}"] button.retry')
            )
        )
        shots(browser, "3-dead-letter")
        row.click()
        wait.until(ec.text_to_be_present_in_element((By.CLASS_NAME, "messages"), "sent again"))
        shots(browser, "4-retried")
        failed.refresh_from_db()
        assert failed.status == MemoryRequest.Status.PENDING
        assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-request-id="{failed.id}"]')


def _charts_drawn(browser, wait) -> None:
    # uPlot draws into a canvas in each chart's box once the first series has arrived.
    wait.until(lambda driver: len(driver.find_elements("css selector", "#charts canvas")) == 3)
    status = 'return document.getElementById("charts-status").textContent'
    wait.until(lambda driver: driver.execute_script(status).startswith("updated"))
    time.sleep(0.3)


def _dead_letter(tenant: Tenant, user: EndUser) -> MemoryRequest:
    return MemoryRequest.objects.create(
        tenant=tenant,
        user=user,
        request_hash="dead-letter-of-the-browser-test",
        payload={"messages": [{"role": "user", "content": "I like tea"}]},
        status=MemoryRequest.Status.FAILURE,
        holds_idempotency_slot=False,
        attempts=3,
        error="Failed after 3 attempts: the LLM provider timed out",
        expires_at=timezone.now() + timedelta(hours=1),
        finished_at=timezone.now(),
    )
