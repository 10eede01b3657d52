"""The status page in a real browser: headless Chromium (selenium) against a
real 3-node cluster (real processes on loopback).

n1 runs with ``--open-reads`` (read-only page without a token; an action
asks for it), n2 and n3 without (the page asks for the token before showing
anything). Checks: members and tasks appear; a task named
``<script>alert(1)</script>`` (and an output holding an ``<img onerror>``)
renders as text and no alert fires; pausing from the page pauses the task
cluster-wide (read back from another node's API); a SIGKILLed node turns
dead on the page within the detection time; the browser logs no CSP
violation. Screenshots go to ``tmp_path``; with
``PEERD_UPDATE_SCREENSHOTS=1`` the cluster view is also written to
``docs/images/status-page.png`` (the README's picture).
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.cluster_util import ROOT, TOKEN, Cluster, api, wait_converged, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException, WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (apt install chromium)"),
    pytest.mark.skipif(not os.access(CHROMEDRIVER, os.X_OK),
                       reason=f"no chromedriver at {CHROMEDRIVER} (apt install chromium-driver)"),
]

HOSTILE = "<script>alert(1)</script>"
HOSTILE_OUTPUT = "<img src=x onerror=alert(2)>"
TASKS = [
    {"id": "tick", "schedule": "@every 2s", "command": {"type": "shell", "run": "echo tick"}},
    {"id": "hostile", "name": HOSTILE, "schedule": "@every 2s", "env": {"NOTE": "<b>bold</b>"},
     "command": {"type": "shell", "run": f"echo '{HOSTILE_OUTPUT}'"}},
    {"id": "nightly", "schedule": "30 2 * * *", "timezone": "Europe/Berlin",
     "command": {"type": "shell", "run": "true"}},
]
#: SWIM on the local profile declares a dead node within a few seconds; the
#: page re-reads every 3 s
DETECTION_DEADLINE_S = 30.0
PAGE_DEADLINE_S = 20.0


def make_driver():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def until(driver, cond, what: str, timeout: float = PAGE_DEADLINE_S):
    """Poll ``cond()`` with a deadline; the failure shows the page's text."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except WebDriverException as e:
            last = e
        time.sleep(0.1)
    try:
        body = driver.find_element(By.TAG_NAME, "body").text[:3000]
    except WebDriverException:
        body = "?"
    raise AssertionError(f"page: timed out after {timeout}s waiting for {what} (last error {last!r})\n{body}")


def member_states(driver) -> dict[str, str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#members tbody tr")
    return {r.get_attribute("data-member"): r.get_attribute("data-state") for r in rows}


def shown(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def no_alert(driver) -> bool:
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def give_token(driver) -> None:
    until(driver, lambda: shown(driver, "token-panel"), "the token form")
    box = driver.find_element(By.ID, "token-input")
    box.clear()
    box.send_keys(TOKEN)
    driver.find_element(By.ID, "token-submit").click()


def hostile_output_seen(addr: str) -> bool:
    st, runs = api(addr, "GET", "/v1/tasks/hostile/runs")
    return st == 200 and any(HOSTILE_OUTPUT in (r.get("output") or "") for r in runs)


def test_status_page_in_a_browser(tmp_path):
    c = Cluster(tmp_path, 3, profile="local")
    c.procs[0].args.append("--open-reads")
    c.start()
    driver = None
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        wait_converged(c, 30)
        a1, a2, a3 = (p.api_addr for p in c.procs)
        st, rep = api(a2, "PUT", "/v1/tasks", TASKS)
        assert st == 200, rep
        wait_for(lambda: hostile_output_seen(a1), timeout=30, what="a run of the hostile task with its output", cluster=c)
        driver = make_driver()

        # n1 has open reads: the page shows the cluster without a token, read-only
        driver.get(f"http://{a1}/")
        until(driver, lambda: member_states(driver) == {"n1": "alive", "n2": "alive", "n3": "alive"},
              "three alive members")
        assert "read-only" in driver.find_element(By.ID, "auth-state").text
        assert not shown(driver, "token-panel")
        health = driver.find_element(By.ID, "health").text
        assert "awareness" in health and "packets rejected" in health
        until(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#ring tbody tr")) == 3, "ring rows")

        # the task list, its human readings and the filter box
        driver.get(f"http://{a1}/#/tasks")
        until(driver, lambda: {r.get_attribute("data-task") for r in
                               driver.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")} ==
              {"tick", "hostile", "nightly"}, "three tasks listed")
        until(driver, lambda: "at 02:30, Europe/Berlin" in driver.find_element(By.ID, "tasks").text,
              "the human reading of the nightly schedule")
        until(driver, lambda: "every 2s" in driver.find_element(By.ID, "tasks").text, "every 2s")
        until(driver, lambda: HOSTILE in driver.find_element(By.ID, "tasks").text, "the hostile name as text")
        driver.find_element(By.ID, "task-filter").send_keys("berlin")
        until(driver, lambda: [r.get_attribute("data-task") for r in
                               driver.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")] == ["nightly"],
              "the filter keeping only nightly")
        driver.find_element(By.ID, "task-filter").send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
        until(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")) == 3,
              "all tasks again once the filter is empty")
        driver.save_screenshot(str(shots / "tasks.png"))

        # the hostile task's page: everything is text, nothing runs
        driver.get(f"http://{a1}/#task/hostile")
        until(driver, lambda: driver.find_element(By.ID, "task-name").text == HOSTILE, "the task name as text")
        until(driver, lambda: HOSTILE_OUTPUT in driver.find_element(By.ID, "runs").text, "the output as text")
        until(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#run-chart svg rect"), "the run chart")
        assert driver.find_elements(By.CSS_SELECTOR, "body script") == []
        assert driver.find_elements(By.CSS_SELECTOR, "body img") == []
        assert "<b>bold</b>" in driver.find_element(By.ID, "task-def").text
        assert driver.find_elements(By.CSS_SELECTOR, "body b") == []
        assert "next slot" in driver.find_element(By.ID, "explain-next").text
        assert no_alert(driver)

        # pause from the page: it asks for the token, then pauses cluster-wide
        driver.find_element(By.ID, "act-pause").click()
        give_token(driver)
        until(driver, lambda: "paused" in driver.find_element(By.ID, "act-result").text, "the pause result")
        wait_for(lambda: api(a3, "GET", "/v1/tasks/hostile")[1]["paused"] is True, timeout=20,
                 what="n3 sees hostile paused", cluster=c)
        until(driver, lambda: "paused\nyes" in driver.find_element(By.ID, "task-summary").text, "paused: yes")
        assert "token set" in driver.find_element(By.ID, "auth-state").text
        driver.save_screenshot(str(shots / "task.png"))

        # n2 has no open reads: the token first, nothing shown before it
        driver.get(f"http://{a2}/")
        until(driver, lambda: shown(driver, "token-panel"), "the token form on n2")
        assert not shown(driver, "view-cluster")
        assert member_states(driver) == {}
        driver.save_screenshot(str(shots / "token.png"))
        give_token(driver)
        until(driver, lambda: member_states(driver) == {"n1": "alive", "n2": "alive", "n3": "alive"},
              "three alive members on n2")

        # n3 is SIGKILLed: the page shows it dead within the detection time,
        # by re-reading the API (the marker shows the page was not reloaded)
        driver.execute_script("window.peerdTestMarker = 42;")
        c.procs[2].popen.send_signal(signal.SIGKILL)
        c.procs[2].popen.wait(timeout=10)
        t0 = time.monotonic()
        until(driver, lambda: member_states(driver).get("n3") == "dead", "n3 dead on the page",
              timeout=DETECTION_DEADLINE_S)
        print(f"n3 shown dead {time.monotonic() - t0:.1f} s after SIGKILL")
        assert driver.execute_script("return window.peerdTestMarker;") == 42, "the page was reloaded"
        driver.save_screenshot(str(shots / "cluster.png"))
        if os.environ.get("PEERD_UPDATE_SCREENSHOTS") == "1":
            shutil.copy(shots / "cluster.png", Path(ROOT) / "docs" / "images" / "status-page.png")
            shutil.copy(shots / "task.png", Path(ROOT) / "docs" / "images" / "status-page-task.png")

        assert no_alert(driver)
        logs = driver.get_log("browser")
        bad = [e for e in logs if "Content Security Policy" in e.get("message", "")
               or "Uncaught" in e.get("message", "")]
        assert not bad, bad
    finally:
        if driver is not None:
            driver.quit()
        c.stop()
