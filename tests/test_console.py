"""The web console in a real headless Chromium (Debian's chromium and chromedriver, installed
by .ci/install-system): log in with the admin token, see a running agent appear, allow its
waiting call with the button and see the agent go on; an agent's token sees only its own
agent and its own files. A screenshot goes to docs/console.png (shown in the README)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from servers import Harness, serve_approving

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console.png"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    driver_path = shutil.which("chromedriver")
    assert driver_path and shutil.which("chromium"), "run .ci/install-system (chromium)"
    options = Options()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                 "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def kernel_server(tmp_path: Path) -> Iterator[Harness]:
    with serve_approving(tmp_path, 60.0) as harness:
        yield harness


def log_in(browser: webdriver.Chrome, url: str, token: str) -> WebDriverWait[Any]:
    browser.get(url + "/")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait = WebDriverWait(browser, 20)
    wait.until(lambda b: b.find_element(By.ID, "app").is_displayed())
    return wait


def text(browser: webdriver.Chrome, element: str) -> str:
    return str(browser.find_element(By.ID, element).text)


def test_the_admin_allows_a_waiting_call_with_the_button(
    browser: webdriver.Chrome, kernel_server: Harness
) -> None:
    server = kernel_server
    alice = server.agent("alice")
    client = server.client(alice)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/api/v1/llm/chat", json=chat).is_success
    assert client.post("/api/v1/storage/write", json={"path": "x.txt", "content": "x"}).is_success

    wait = log_in(browser, server.url, server.admin)
    assert "admin" in text(browser, "who")
    wait.until(lambda b: "@alice" in text(b, "agents"))
    assert "fake" in text(browser, "cores")

    deleted: list[httpx.Response] = []
    agent = threading.Thread(
        target=lambda: deleted.append(
            server.client(alice).post("/api/v1/storage/delete", json={"path": "x.txt"})
        )
    )
    agent.start()
    wait.until(lambda b: "storage.delete:x.txt" in text(b, "approvals"))
    wait.until(lambda b: "queued" in text(b, "timeline"))  # the live stream shows the call
    assert agent.is_alive()  # the agent waits for the person
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    browser.find_element(By.CSS_SELECTOR, "button[data-verdict='allow']").click()
    agent.join(20)
    assert not agent.is_alive() and deleted[0].status_code == 200, deleted
    assert deleted[0].json()["status"] == "done"
    wait.until(lambda b: "storage.delete:x.txt" not in text(b, "approvals"))
    wait.until(lambda b: "done" in text(b, "timeline"))
    listed = server.client(alice).post("/api/v1/storage/ls", json={"path": ""}).json()
    assert listed["result"] == []  # the agent went on: its file is gone
    wait.until(lambda b: "storage.delete" in text(b, "audit") and "approved" in text(b, "audit"))


def test_an_agents_token_sees_only_its_own_agent(
    browser: webdriver.Chrome, kernel_server: Harness
) -> None:
    server = kernel_server
    alice, bob = server.agent("alice"), server.agent("bob")
    for token, name in ((alice, "a.txt"), (bob, "b.txt")):
        written = server.client(token).post(
            "/api/v1/storage/write", json={"path": name, "content": "x"}
        )
        assert written.is_success
    wait = log_in(browser, server.url, alice)
    assert "agent alice" in text(browser, "who")
    wait.until(lambda b: "a.txt" in text(b, "files"))
    wait.until(lambda b: "@alice" in text(b, "agents"))
    assert "@bob" not in text(browser, "agents") and "b.txt" not in text(browser, "files")
    assert not browser.find_element(By.ID, "approvals-section").is_displayed()
    wait.until(lambda b: "storage.write" in text(b, "audit"))
    assert "bob" not in text(browser, "audit")


def test_the_audit_route_shows_each_agent_its_own_records(kernel_server: Harness) -> None:
    server = kernel_server
    alice, bob = server.agent("alice"), server.agent("bob")
    for token in (alice, bob):
        written = server.client(token).post(
            "/api/v1/storage/write", json={"path": "a.txt", "content": "x"}
        )
        assert written.is_success

    def records(token: str) -> list[dict[str, Any]]:
        response = server.client(token).get("/api/v1/audit", params={"limit": 10})
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()
        return found

    everything = [(r["principal"], r["kind"], r["op"], r["outcome"]) for r in records(server.admin)]
    assert ("alice", "storage", "write", "done") in everything
    assert ("bob", "storage", "write", "done") in everything
    mine = records(alice)
    assert {r["principal"] for r in mine} == {"alice"}
    assert [r["seq"] for r in mine] == sorted(r["seq"] for r in mine)  # oldest first
    assert server.client(alice).get("/api/v1/audit", params={"limit": 0}).status_code == 422
    assert server.client().get("/api/v1/audit").status_code == 401


def test_a_wrong_token_is_refused_on_the_page(
    browser: webdriver.Chrome, kernel_server: Harness
) -> None:
    browser.get(kernel_server.url + "/")
    browser.find_element(By.ID, "token").send_keys("not-a-token")
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    WebDriverWait(browser, 10).until(lambda b: "invalid" in text(b, "login-error"))
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert httpx.get(kernel_server.url + "/console/secrets.txt").status_code == 404
