"""`lorakit ui` in a real headless chromium (selenium): runs listed with status and curves, a run started from the
recipe form runs and finishes, stop and resume, eval reports side by side, and the chat pane streams from `serve`.
Screenshots go to $LORAKIT_UI_SCREENSHOTS (default: the test's tmp dir) for a person to look at."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serve_helpers import build_adapter, free_port, lorakit_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium drives the browser (pip install selenium)")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                      "chromium-driver)")]
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

TINY_SFT = ["data=zh_sft_mix", "max_samples=64", "cutoff_len=128", "batch_size=2", "logging_steps=1", "dtype=fp32"]


def sft_cli(model, out, *extra):
    cmd = [sys.executable, "-m", "lora_kit.cli", "sft", f"model={model}", f"output_dir={out}", *TINY_SFT, *extra]
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1100",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def shot(driver, tmp_path, name):
    where = Path(os.environ.get("LORAKIT_UI_SCREENSHOTS", tmp_path))
    where.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(where / name))
    return where / name


def row_status(driver, name):
    return driver.execute_script(f"const r = document.querySelector(\"tr[data-run='{name}']\"); "
                                 "return r ? r.dataset.status : null;")


def wait_status(driver, name, status, timeout=180):
    WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: row_status(d, name) == status)


def click(driver, css, timeout=30):
    """Click what `css` finds; the runs table is redrawn every 2 s, so a stale element is looked up again."""
    WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException, WebDriverException)).until(
        lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True)


def fill_form(driver, values: dict):
    for key, value in values.items():
        box = driver.find_element(By.CSS_SELECTOR, f"#form input[data-key='{key}']")
        box.clear()
        box.send_keys(str(value))


def test_ui_runs_form_reports_and_chat(browser, tmp_path, tiny_model_dir):
    runs = tmp_path / "runs"
    sft_cli(tiny_model_dir, runs / "finished", "max_steps=4")
    for name, adapter in (("eval_base.json", None), ("eval_finished.json", runs / "finished")):
        subprocess.run([sys.executable, "-m", "lora_kit.cli", "eval", "--model", str(tiny_model_dir), "--task",
                        "sentiment", "--limit", "4", "--max-new-tokens", "4", "--output", str(runs / name),
                        *(["--adapter", str(adapter)] if adapter else [])], check=True, capture_output=True)
    adapter = build_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    serve_port, ui_port = free_port(), free_port()
    serve_args = ["serve", "--model", str(tiny_model_dir), "--name", "base", "--dtype", "fp32", "--adapter",
                  f"tiny-adapter={adapter}"]
    with lorakit_server(serve_args, serve_port), \
            lorakit_server(["ui", "--runs", str(runs), "--serve", f"http://127.0.0.1:{serve_port}"], ui_port, "/"):
        d = browser
        d.get(f"http://127.0.0.1:{ui_port}/")
        wait_status(d, "finished", "finished", 30)

        # the finished run's loss curve has one point per logged step
        click(d, "tr[data-run='finished']")
        logged = [r for r in map(json.loads, (runs / "finished" / "metrics.jsonl").read_text().splitlines())
                  if "loss" in r]
        WebDriverWait(d, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "circle.pt-loss")) == len(logged))

        # a long run from the form: running, stopped, resumed
        WebDriverWait(d, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#form input[data-key='model']"))
        Select(d.find_element(By.ID, "recipe")).select_by_value("alpaca_zh")
        WebDriverWait(d, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#form input[data-key='max_steps']"))
        form = {"model": tiny_model_dir, "data": "zh_sft_mix", "max_samples": 64, "cutoff_len": 128,
                "batch_size": 2, "logging_steps": 1, "dtype": "fp32", "save_steps": 5}
        fill_form(d, form | {"max_steps": 100000})
        name_box = d.find_element(By.ID, "run-name")
        name_box.clear()
        name_box.send_keys("long")
        d.find_element(By.ID, "start").click()
        wait_status(d, "long", "running", 60)
        WebDriverWait(d, 120).until(lambda d: (runs / "long" / "metrics.jsonl").is_file())
        shot(d, tmp_path, "ui-running.png")
        click(d, "tr[data-run='long'] button")  # stop
        wait_status(d, "long", "stopped", 60)
        click(d, "tr[data-run='long'] button")  # resume
        wait_status(d, "long", "running", 60)
        click(d, "tr[data-run='long'] button")  # and stop for good
        wait_status(d, "long", "stopped", 60)

        # a short run from the form appears and finishes, with the steps it was given
        fill_form(d, form | {"max_steps": 6, "save_steps": 3})
        name_box.clear()
        name_box.send_keys("short")
        d.find_element(By.ID, "start").click()
        wait_status(d, "short", "finished", 240)
        assert (runs / "short" / "run.json").is_file()
        step_cell = d.execute_script("return document.querySelector(\"tr[data-run='short']\").cells[3].textContent")
        assert step_cell == "6 / 6"

        # eval reports side by side: one column per result file, the accuracy row filled for both
        WebDriverWait(d, 30).until(lambda d: d.find_elements(By.ID, "report-table"))
        table = d.find_element(By.ID, "report-table")
        head = [th.text for th in table.find_elements(By.TAG_NAME, "th")]
        assert any("eval_base.json" in h for h in head) and any("eval_finished.json" in h for h in head)
        acc = [r for r in table.find_elements(By.TAG_NAME, "tr") if r.text.startswith("accuracy")]
        assert acc and len(acc[0].find_elements(By.TAG_NAME, "td")) == 3

        # the chat pane streams an answer from serve, the adapter picked in the list
        Select(d.find_element(By.ID, "model")).select_by_value("tiny-adapter")
        temp = d.find_element(By.ID, "temperature")
        temp.clear()
        temp.send_keys("0")
        d.find_element(By.ID, "send").click()
        WebDriverWait(d, 60).until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")
        answer = d.find_element(By.ID, "answer")
        assert int(answer.get_attribute("data-chunks")) > 1
        assert answer.get_attribute("data-finish") in ("stop", "length")
        path = shot(d, tmp_path, "ui.png")
    assert path.stat().st_size > 10_000
