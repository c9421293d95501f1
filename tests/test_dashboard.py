"""The dashboard of ``fleet serve --http`` in a real headless Chromium (Debian's, driven by
Playwright) against a running controller with live agents: a device appears, a push shows its
progress, a drift alert shows up, a shadow shows its agreement and is promoted from the page,
each without a reload; actions need the token."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from agent_proc import AgentProcess
from fleet_harness import FleetServe, cli, cli_json, later_versions
from waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
TOKEN = "0123456789abcdef0123456789abcdef"
MONITORING = ("[monitoring]\ndrift_window_s = 0.5\ndrift_windows = 4\ndrift_min_samples = 40\n"
              "[telemetry]\nstats_window_s = 0.5\n")  # shadow windows too


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # the dev extra installs it; make test, Debian's chromium

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


def _request(url: str, method: str = "GET", headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers or {}), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_dashboard_updates_live_in_chromium(browser, tmp_path, mosquitto, digits_dir, digits_int8_artifact):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    serve = FleetServe(mosquitto.url, db, tmp_path / "serve.log", http=True,
                       extra=["--http-token-file", token_file,
                              "--signing-key", digits_dir / "keys" / "signing.key"]).start()
    base = f"http://127.0.0.1:{serve.http_port}"
    config = tmp_path / "agent.toml"
    config.write_text(MONITORING)
    versions = later_versions(digits_int8_artifact, tmp_path, digits_dir / "keys" / "signing.key")
    pub = digits_dir / "keys" / "signing.pub"
    agents = []
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    foreign = []
    page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith(base) else None)
    try:
        # without the token: nothing; with it once: a cookie for the page and its events
        assert _request(base + "/")[0] == 401
        assert _request(base + "/api/rollouts/x/pause", "POST", {"Authorization": "Bearer wrong-token-0000000"})[0] == 401
        page.goto(f"{base}/?token={TOKEN}")
        page.wait_for_selector("#status:has-text('live')", timeout=15000)
        assert "No device has reported yet" in page.inner_text("#devices")

        agent = AgentProcess(versions[1], pub, tmp_path / "dev1", device="dev1", broker=mosquitto.url,
                             config=config).start()
        agents.append(agent)
        page.wait_for_selector("tr[data-device='dev1'] td.online", timeout=30000)  # no reload

        with np.load(digits_dir / "eval.npz") as data:
            images = data["image"]
        for i in range(60):
            assert agent.infer("digits", {"image": images[i][None]})[0] == 200
        page.wait_for_function("document.querySelector('#traffic .total').textContent.startsWith('6')", timeout=15000)

        pushed = cli_json("fleet", "push", versions[2], "--fleet", "f1", "--key", digits_dir / "keys" / "signing.key",
                          "--health-window", "20s", "--db", db)
        row = f"tr[data-rollout='{pushed['rollout']}']"
        page.wait_for_selector(row, timeout=30000)
        page.wait_for_selector(f"{row} button[data-action='pause']", timeout=30000)
        page.fill("#token", TOKEN)
        page.click(f"{row} button[data-action='pause']")
        page.wait_for_selector("#status:has-text('pause: paused')", timeout=10000)
        page.wait_for_selector(f"{row} td.state:has-text('paused')", timeout=15000)
        page.click(f"{row} button[data-action='resume']")
        # keep traffic flowing so the health window has evidence; the progress bar fills
        for i in range(200):
            agent.infer("digits", {"image": images[i % len(images)][None]})
        page.wait_for_selector(f"{row} td.state:has-text('completed')", timeout=60000)
        assert page.inner_text(f"{row} td.progress").strip() == "1/1"  # paused within its wave, dev1 still committed
        page.wait_for_selector("tr[data-device='dev1']:has-text('committed')", timeout=15000)

        shifted = np.clip(images[:200] * 0.4 + 0.6, 0, 1).astype(np.float32)
        for x in shifted:
            agent.infer("digits", {"image": x[None]})
        page.wait_for_selector("#alerts tr.open:has-text('input_drift')", timeout=30000)
        page.wait_for_selector("#drift td.alert:has-text('DRIFT')", timeout=30000)

        # a shadow: its agreement shows up live, and the page promotes it
        shadow = cli_json("fleet", "push", versions[3], "--fleet", "f1", "--key", digits_dir / "keys" / "signing.key",
                          "--shadow", "--sample", "1.0", "--db", db)
        box = f"#shadow [data-rollout='{shadow['rollout']}']"
        page.wait_for_selector(f"tr[data-rollout='{shadow['rollout']}'] td.state:has-text('shadowing')", timeout=30000)
        for i in range(100):
            agent.infer("digits", {"image": images[i][None]})
        page.wait_for_selector(f"{box}:has-text('100.0% top-1')", timeout=30000)
        page.wait_for_selector(f"{box} tr[data-device='dev1']", timeout=10000)
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        page.click(f"tr[data-rollout='{shadow['rollout']}'] button[data-action='promote']")
        page.wait_for_selector(f"tr[data-rollout='{shadow['rollout']}'] td.state:has-text('promoted')", timeout=15000)
        promoted = [r for r in cli_json("fleet", "rollouts", "--db", db)["rollouts"] if r["version"] == 3
                    and r["kind"] == "update"]
        assert len(promoted) == 1 and promoted[0]["state"] in ("running", "completed")
        assert foreign == []  # nothing fetched from anywhere else

        metrics = _request(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert metrics[0] == 200 and b"edgeml_fleet_alerts_open" in metrics[1]
    finally:
        page.close()
        for a in agents:
            a.terminate()
        serve.stop()


def test_beyond_loopback_the_dashboard_needs_a_token(tmp_path):
    proc = cli("fleet", "serve", "--broker", "mqtt://127.0.0.1:1", "--db", f"sqlite:///{tmp_path / 'f.db'}",
               "--http", "0.0.0.0:0")
    assert proc.returncode == 2 and "--http-token-file" in proc.stderr and proc.stderr.strip().count("\n") == 0
    short = tmp_path / "short"
    short.write_text("abc")
    proc = cli("fleet", "serve", "--broker", "mqtt://127.0.0.1:1", "--db", f"sqlite:///{tmp_path / 'f.db'}",
               "--http", "0.0.0.0:0", "--http-token-file", short)
    assert proc.returncode == 2 and "at least 16" in proc.stderr
