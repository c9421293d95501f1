"""The host's shadow report (``edgeml fleet shadow``, the dashboard's Shadow section): ``shadow``
windows stored through the store's real insert path, on SQLite and PostgreSQL, added up per
device and fleet-wide; counts add up exactly and latency percentiles of summed buckets stay
close to the exact ones."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgeml.cli import main
from edgeml.core.shadow import add_counts, bucket, quantile
from edgeml.fleet import open_store
from edgeml.fleet.shadow import shadow_report

ROLLOUT = "s-20261130-0001abcd"
NOW = time.time()


def _buckets(latencies) -> dict:
    counts: dict = {}
    for ms in latencies:
        add_counts(counts, {bucket(float(ms)): 1})
    return counts


def windows(rng, n: int, *, start_seq: int = 1, start_ts: float = NOW - 600, shadow_version: int = 2,
            active_version: int = 1, rollout: str = ROLLOUT, speed: float = 1.0, agree: float = 0.95,
            cosine: bool = False):
    """``n`` shadow windows as a device sends them, and the raw latencies behind their buckets."""
    records, raw_active, raw_shadow = [], [], []
    for i in range(n):
        sampled = int(rng.integers(40, 120))
        dropped = int(rng.integers(0, 4))
        errors = int(rng.integers(0, 3))
        compared = sampled - dropped - errors
        active = rng.lognormal(np.log(4.0 * speed), 0.5, compared)
        shadow = rng.lognormal(np.log(9.0 * speed), 0.6, compared)
        raw_active += list(active)
        raw_shadow += list(shadow)
        r = {"kind": "shadow", "ts": start_ts + 5.0 * i, "seq": start_seq + i, "model": "digits",
             "version": active_version, "shadow_version": shadow_version, "shadow_sha256": f"{shadow_version:064x}",
             "rollout": rollout, "window_s": 5.0, "sampled": sampled, "compared": compared, "dropped": dropped,
             "errors": errors, "rows": 0, "agreed": 0, "cosine_n": 0, "cosine_sum": 0.0, "cosine_min": None,
             "active_ms": _buckets(active), "shadow_ms": _buckets(shadow)}
        if cosine:
            cos = rng.uniform(0.9, 1.0, compared)
            r.update(cosine_n=compared, cosine_sum=float(cos.sum()), cosine_min=float(cos.min()))
        else:
            r.update(rows=compared, agreed=int(rng.binomial(compared, agree)))
        records.append(r)
    return records, raw_active, raw_shadow


def _sum(records, key):
    return sum(r[key] for r in records)


def test_device_and_fleet_wide_figures_are_exact_sums_on_both_databases(db_url):
    rng = np.random.default_rng(7)
    sent, raw_a, raw_s = {}, [], []
    for device, speed, agree in (("cam-a", 1.0, 0.97), ("cam-b", 1.5, 0.9), ("cam-c", 0.7, 0.99)):
        sent[device], a, s = windows(rng, 12, speed=speed, agree=agree)
        raw_a += a
        raw_s += s
    with open_store(db_url) as store:
        for device, records in sent.items():
            assert store.insert_records("f1", device, records) == len(records)
            assert store.insert_records("f1", device, records[:5]) == 0  # a batch delivered twice counts once
        other, _, _ = windows(rng, 3)
        store.insert_records("f2", "cam-a", other)  # another fleet's device of the same name
        report = shadow_report(store, "f1")
    assert report["ok"] and report["fleet"] == "f1" and report["version"] is None
    assert [d["device"] for d in report["devices"]] == ["cam-a", "cam-b", "cam-c"]
    for d in report["devices"]:
        records = sent[d["device"]]
        assert (d["fleet"], d["model"], d["shadow_version"], d["active_version"]) == ("f1", "digits", 2, 1)
        assert d["windows"] == 12
        for key in ("sampled", "compared", "dropped", "errors", "rows"):
            assert d[key] == _sum(records, key), key
        assert d["top1_agreement"] == round(_sum(records, "agreed") / _sum(records, "rows"), 6)
        assert d["agreement"] == d["top1_agreement"] and d["cosine_mean"] is None
        assert d["first"] == records[0]["ts"] and d["last"] == records[-1]["ts"]
    everything = [r for records in sent.values() for r in records]
    fw = report["fleet_wide"]
    assert fw["devices"] == 3 and fw["windows"] == 36 and fw["shadow_versions"] == [2]
    for key in ("sampled", "compared", "dropped", "errors", "rows"):
        assert fw[key] == _sum(everything, key) == sum(d[key] for d in report["devices"]), key
    assert fw["top1_agreement"] == round(_sum(everything, "agreed") / _sum(everything, "rows"), 6)
    assert fw["error_rate"] == round(fw["errors"] / (fw["compared"] + fw["errors"]), 6)
    assert fw["drop_rate"] == round(fw["dropped"] / fw["sampled"], 6)
    # the fleet's percentiles from summed buckets, against the exact ones of every raw latency
    for got, raw, q in ((fw["active_p50_ms"], raw_a, 50), (fw["active_p95_ms"], raw_a, 95),
                        (fw["shadow_p50_ms"], raw_s, 50), (fw["shadow_p95_ms"], raw_s, 95)):
        exact = float(np.percentile(raw, q))
        assert abs(got - exact) <= 0.10 * exact, (q, got, exact)
    assert fw["latency_ratio"] == pytest.approx(fw["shadow_p50_ms"] / fw["active_p50_ms"], rel=1e-3)


def test_version_rollout_and_since_filters(tmp_path):
    rng = np.random.default_rng(3)
    old, _, _ = windows(rng, 4, start_ts=NOW - 7200, shadow_version=2, rollout="s-20261129-00000000")
    new, _, _ = windows(rng, 5, start_seq=5, start_ts=NOW - 60, shadow_version=3, rollout=ROLLOUT)
    b_new, _, _ = windows(rng, 2, start_ts=NOW - 30, shadow_version=3, rollout=ROLLOUT)
    with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        store.insert_records("f1", "a", old + new)
        store.insert_records("f1", "b", b_new)
        store.create_rollout({"id": ROLLOUT, "fleet": "f1", "kind": "shadow", "artifact": "c" * 64,
                              "plan": {"target": {"name": "digits", "version": 3}, "waves": [2],
                                       "shadow": {"sample": 0.2}}}, [{"device": "a", "wave": 1}])
        every = shadow_report(store)
        assert [(d["device"], d["shadow_version"]) for d in every["devices"]] == [("a", 2), ("a", 3), ("b", 3)]
        assert every["fleet_wide"]["devices"] == 2 and every["fleet_wide"]["shadow_versions"] == [2, 3]
        v3 = shadow_report(store, "f1", version=3)
        assert [(d["device"], d["windows"]) for d in v3["devices"]] == [("a", 5), ("b", 2)]
        assert v3["fleet_wide"]["compared"] == _sum(new + b_new, "compared")
        assert shadow_report(store, "f1", version=9)["devices"] == []
        by_rollout = shadow_report(store, "f1", rollout="s-20261129-00000000")
        assert [(d["device"], d["shadow_version"], d["windows"]) for d in by_rollout["devices"]] == [("a", 2, 4)]
        prefix = shadow_report(store, "f1", rollout=ROLLOUT[:12])  # a unique prefix of a rollout's id
        assert prefix["rollout"] == ROLLOUT and prefix["fleet_wide"]["windows"] == 7
        recent = shadow_report(store, "f1", since=NOW - 3600)
        assert {d["shadow_version"] for d in recent["devices"]} == {3} and recent["fleet_wide"]["windows"] == 7
        assert shadow_report(store, "f1", version=2, since=NOW - 3600)["fleet_wide"]["windows"] == 0
        assert shadow_report(store, "f2")["devices"] == []


def test_cosine_only_windows_give_the_mean_and_the_minimum(tmp_path):
    rng = np.random.default_rng(11)
    records, _, _ = windows(rng, 6, cosine=True)
    with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        store.insert_records("f1", "emb-1", records)
        d = shadow_report(store, "f1")["devices"][0]
    assert d["top1_agreement"] is None and d["rows"] == 0
    assert d["cosine_mean"] == round(_sum(records, "cosine_sum") / _sum(records, "cosine_n"), 6)
    assert d["cosine_min"] == round(min(r["cosine_min"] for r in records), 6)
    assert d["agreement"] == d["cosine_mean"]


def test_summed_buckets_give_percentiles_within_ten_percent():
    rng = np.random.default_rng(0)
    devices = [rng.lognormal(np.log(mu), sigma, n) for mu, sigma, n in
               ((3.0, 0.4, 5000), (12.0, 0.9, 3000), (0.4, 0.3, 800), (40.0, 1.2, 1500))]
    summed: dict = {}
    for latencies in devices:
        add_counts(summed, _buckets(latencies))  # as each device's windows reach the host
    every = np.concatenate(devices)
    assert sum(summed.values()) == every.size
    for q in (0.05, 0.25, 0.5, 0.9, 0.95, 0.99):
        exact = float(np.percentile(every, 100 * q))
        got = quantile(summed, q)
        assert abs(got - exact) <= 0.10 * exact, (q, got, exact)
    assert quantile({}, 0.5) is None


def test_cli_json_is_one_object_and_the_table_says_when_there_is_nothing(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    open_store(url).close()
    assert main(["fleet", "shadow", "--db", url, "--fleet", "f1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no shadow windows yet") and "--shadow" in out and out.count("\n") == 1
    assert main(["fleet", "shadow", "--db", url, "--json"]) == 0
    empty = json.loads(capsys.readouterr().out)
    assert empty["ok"] and empty["devices"] == [] and empty["fleet_wide"]["windows"] == 0

    rng = np.random.default_rng(5)
    records, _, _ = windows(rng, 4)
    with open_store(url) as store:
        store.insert_records("f1", "cam-a", records)
        store.insert_records("f1", "cam-b", windows(rng, 3)[0])
    assert main(["fleet", "shadow", "--db", url, "--fleet", "f1", "--version", "2", "--rollout", ROLLOUT,
                 "--since", "1h", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    assert result["ok"] and result["version"] == 2 and result["rollout"] == ROLLOUT
    assert [d["device"] for d in result["devices"]] == ["cam-a", "cam-b"]
    assert result["devices"][0]["compared"] == _sum(records, "compared") and result["fleet_wide"]["devices"] == 2
    assert main(["fleet", "shadow", "--db", url, "--fleet", "f1"]) == 0
    table = capsys.readouterr().out
    assert "cam-a" in table and "cam-b" in table and "fleet-wide" in table and "top-1" in table

    assert main(["fleet", "shadow", "--db", url, "--since", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--since" in err
    assert main(["fleet", "shadow", "--db", f"sqlite:///{tmp_path / 'none.db'}"]) == 3


def _rollout(store, rollout_id, state, version, devices, updated_offset=0.0):
    store.create_rollout({"id": rollout_id, "fleet": "f1", "kind": "shadow", "artifact": f"{version:064x}",
                          "plan": {"target": {"name": "digits", "version": version, "content_sha256": f"{version:064x}"},
                                   "waves": [len(devices)], "shadow": {"sample": 0.2}}},
                         [{"device": d, "wave": 1} for d in devices])
    with store.transaction():
        store.update_rollout(rollout_id, state=state)
    time.sleep(updated_offset)


def test_the_dashboard_shows_live_shadows_and_the_latest_promoted_one(tmp_path):
    from edgeml.fleet.dashboard import page, sections

    rng = np.random.default_rng(9)
    with open_store(f"sqlite:///{tmp_path / 'fleet.db'}") as store:
        assert "fleet push ART --fleet F --shadow" in sections(store)["shadow"]
        _rollout(store, "s-old-promoted", "promoted", 2, ["a"], 0.01)
        _rollout(store, "s-aborted", "aborted", 3, ["a"])
        _rollout(store, "s-new-promoted", "promoted", 4, ["a"], 0.01)
        _rollout(store, ROLLOUT, "shadowing", 5, ["a", "b"])
        _rollout(store, "s-starting", "running", 6, ["c"])
        store.insert_records("f1", "a", windows(rng, 3, shadow_version=5)[0])
        b, _, _ = windows(rng, 2, start_seq=1, shadow_version=5, agree=0.5)
        b[0]["errors"] += 4
        store.insert_records("f1", "b", b)
        html = sections(store)["shadow"]
        full = page(store)
    assert "id='shadow'" in full and html in full
    shown = [part.split("'")[0] for part in html.split("data-rollout='")[1:]]
    assert shown == [ROLLOUT, "s-starting", "s-new-promoted"]
    live = html.split(f"data-rollout='{ROLLOUT}'")[1].split("</div>")[0]
    assert "<tr data-device='a'>" in live and "<tr data-device='b'>" in live and "% top-1" in live
    assert "sampling 20%" in live and "shadowing" in live and "class='errors alert'" in live
    assert "No shadow window from its devices yet" in html.split("data-rollout='s-starting'")[1]
