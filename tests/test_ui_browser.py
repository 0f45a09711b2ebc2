"""The web UI in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium; nothing downloads a browser) opens ``lorakit ui`` started by the test, uploads two LoRAs, merges them,
and the file it writes equals the CLI's output for the same options byte for byte; a bad input shows the
library's one-line message. Screenshots of the screens go to the test's tmp folder (and to
``$LORAKIT_ARTIFACTS`` when set, e.g. ``artifacts/`` in CI). Skipped when chromium, its driver, selenium or
gradio is missing."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="no system chromium/chromedriver (Debian: apt-get install chromium chromium-driver)"),
]
selenium = pytest.importorskip("selenium", reason="selenium not installed (pip install 'lorakit[test]')")
pytest.importorskip("gradio", reason="gradio not installed (pip install 'lorakit[ui]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
START_SECONDS = 120
SLOW_WRITE = 0.25         # seconds per tensor written by the server (its bake of 84 tensors takes ~20 s)
STEP_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lora(path: Path, rank: int, seed: int) -> str:
    """A tiny kohya-style LoRA written by safetensors itself (not by lorakit): two FLUX.1 double-block modules."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in {"lora_unet_double_blocks_0_img_attn_proj": (32, 32),
                             "lora_unet_double_blocks_1_txt_mlp_0": (128, 32)}.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui")
    out = folder / "out"
    port = _free_port()
    # the writers' public test hook slows every tensor write a little, so that a bake runs long enough to be
    # cancelled from the browser (a merge writes a handful of tensors: it stays well under a second)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GRADIO_ANALYTICS_ENABLED": "False", "LORAKIT_TEST_SLOW_WRITE": str(SLOW_WRITE)}
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "ui", "--port", str(port), "--output-dir", str(out)],
                            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + START_SECONDS
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read(100)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"lorakit ui did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"url": url, "folder": folder, "out": out}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200",
                "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(STEP_SECONDS)
    yield driver
    driver.quit()


def _shot(driver, name: str, folder: Path) -> None:
    targets = [folder / "screenshots"]
    if os.environ.get("LORAKIT_ARTIFACTS"):
        targets.append(Path(os.environ["LORAKIT_ARTIFACTS"]) / "screenshots")
    for t in targets:
        t.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(t / f"{name}.png"))


def _value(driver, elem_id: str) -> str:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.value : null;",
        f"#{elem_id} textarea, #{elem_id} input") or ""


def _set_text(driver, elem_id: str, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    box.send_keys(Keys.TAB)


def _tab(driver, label: str) -> None:
    for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]"):
        if b.text.strip() == label:
            b.click()
            return
    raise AssertionError(f"no tab {label!r}")


def _wait_status(driver, elem_id: str, done) -> str:
    WebDriverWait(driver, STEP_SECONDS).until(lambda d: done(_value(d, elem_id)))
    return _value(driver, elem_id)


def test_merge_in_the_browser_equals_the_cli(server, browser, tmp_path):
    a = _lora(tmp_path / "style_a.safetensors", 4, 1)
    b = _lora(tmp_path / "style_b.safetensors", 2, 2)
    browser.get(server["url"])
    WebDriverWait(browser, STEP_SECONDS).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role=tab]"))
    _shot(browser, "01-inspect", server["folder"])
    _tab(browser, "Merge")
    upload = browser.find_element(By.CSS_SELECTOR, "#merge-upload input[type=file]")
    upload.send_keys(a + "\n" + b)
    WebDriverWait(browser, STEP_SECONDS).until(
        lambda d: _value(d, "merge-path-0").endswith("style_a.safetensors")
        and _value(d, "merge-path-1").endswith("style_b.safetensors"))
    _set_text(browser, "merge-weight-1", "0.5")
    _set_text(browser, "merge-output", "merged_ui.safetensors")
    _shot(browser, "02-merge-filled", server["folder"])
    browser.find_element(By.ID, "merge-run").click()
    status = _wait_status(browser, "merge-status", lambda v: "saved:" in v or v.startswith(("error", "internal")))
    _shot(browser, "03-merge-done", server["folder"])
    written = server["out"] / "merged_ui.safetensors"
    assert "saved:" in status, status
    assert _value(browser, "merge-saved") == str(written)

    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    expected = cli_dir / "merged_ui.safetensors"
    env = {**os.environ, "PYTHONPATH": SRC}
    run = subprocess.run([sys.executable, "-m", "lorakit", "merge", f"{a}:1", f"{b}:0.5", "-o", str(expected)],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert written.read_bytes() == expected.read_bytes()


def test_an_error_shows_the_one_line_message(server, browser, tmp_path):
    browser.get(server["url"])
    WebDriverWait(browser, STEP_SECONDS).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role=tab]"))
    _tab(browser, "Merge")
    missing = str(tmp_path / "missing.safetensors")
    _set_text(browser, "merge-path-0", missing)
    _set_text(browser, "merge-output", "never.safetensors")
    browser.find_element(By.ID, "merge-run").click()
    status = _wait_status(browser, "merge-status", lambda v: v.startswith(("error", "internal", "saved")))
    _shot(browser, "04-merge-error", server["folder"])
    assert status.startswith("error: "), status
    assert "\n" not in status and "Traceback" not in status
    assert "missing.safetensors" in status
    assert not (server["out"] / "never.safetensors").exists()


def test_bake_shows_progress_and_cancel_leaves_no_file(server, browser, tmp_path):
    from test_bake_util import make_base
    base = make_base(tmp_path, "bfl")
    lora = _lora(tmp_path / "style_c.safetensors", 4, 3)
    browser.get(server["url"])
    WebDriverWait(browser, STEP_SECONDS).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role=tab]"))
    _tab(browser, "Bake")
    _set_text(browser, "bake-base-path", base)
    _set_text(browser, "bake-path-0", lora)
    _set_text(browser, "bake-output", "baked_cancelled.safetensors")
    browser.find_element(By.ID, "bake-run").click()
    # the progress bar gradio draws over the outputs while the job reports progress ("bake - 12.3%"), moving
    WebDriverWait(browser, STEP_SECONDS).until(lambda d: re.search(
        r"[1-9][0-9.]*%", d.execute_script("return document.querySelector('#bake-status').innerText") or ""))
    _shot(browser, "05-bake-progress", server["folder"])
    browser.find_element(By.ID, "bake-cancel").click()
    status = _wait_status(browser, "bake-status", lambda v: v.startswith(("cancelled", "error", "internal"))
                          or "saved:" in v)
    _shot(browser, "06-bake-cancelled", server["folder"])
    assert status == "cancelled; no output was written.", status
    assert not (server["out"] / "baked_cancelled.safetensors").exists()
    assert not [n for n in os.listdir(server["out"]) if n.endswith(".lorakit-tmp")]


def test_inspect_and_doctor_screens(server, browser, tmp_path):
    from test_bake_util import make_base
    lora = _lora(tmp_path / "style_d.safetensors", 4, 4)
    base = make_base(tmp_path, "bfl")
    browser.get(server["url"])
    WebDriverWait(browser, STEP_SECONDS).until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role=tab]"))
    browser.find_element(By.CSS_SELECTOR, "#inspect-upload input[type=file]").send_keys(lora)
    WebDriverWait(browser, STEP_SECONDS).until(lambda d: _value(d, "inspect-path").endswith("style_d.safetensors"))
    browser.find_element(By.ID, "inspect-run").click()
    report = _wait_status(browser, "inspect-status", lambda v: bool(v))
    assert "kohya" in report and "error" not in report.lower()[:20], report
    WebDriverWait(browser, STEP_SECONDS).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#inspect-coverage tbody tr")) >= 1)
    cells = browser.find_element(By.ID, "inspect-coverage").text
    assert "%" in cells            # the coverage bars
    if importlib.util.find_spec("matplotlib") is not None:   # the library's per-block picture (lorakit[plot])
        WebDriverWait(browser, STEP_SECONDS).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#inspect-plot img"))
    _shot(browser, "07-inspect-result", server["folder"])
    _tab(browser, "Doctor")
    _set_text(browser, "doctor-path", lora)
    _set_text(browser, "doctor-base-path", base)
    browser.find_element(By.ID, "doctor-run").click()
    verdict = _wait_status(browser, "doctor-status", lambda v: bool(v))
    assert "OK" in verdict and "apply" in verdict, verdict
    if importlib.util.find_spec("matplotlib") is not None:
        WebDriverWait(browser, STEP_SECONDS).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#doctor-plot img"))
    _shot(browser, "08-doctor", server["folder"])
    for i, tab in enumerate(("Convert", "Extract", "Resize"), start=9):
        _tab(browser, tab)
        time.sleep(0.5)
        _shot(browser, f"{i:02d}-{tab.lower()}", server["folder"])
