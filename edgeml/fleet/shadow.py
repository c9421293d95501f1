"""Shadow evaluation across a fleet: the windows devices send (``shadow`` records) while a
candidate runs beside their active model, added up per device and for the whole fleet.

Every figure of a window is a count (requests sampled, compared, dropped, failed; rows and rows
agreed; cosines summed; latencies counted in ``edgeml.core.shadow``'s fixed log buckets), so the
fleet-wide figures are the exact sums of the devices' ones: top-1 agreement is all rows agreed
over all rows, not a mean of the devices' rates, and latency percentiles come from the summed
buckets (within ~9% of the exact value, the half width of a quarter-octave bucket).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from edgeml.core.shadow import agreement, summarize


def shadow_report(store, fleet: Optional[str] = None, *, version: Optional[int] = None,
                  rollout: Optional[str] = None, since: Optional[float] = None) -> dict:
    """Shadow windows per (fleet, device, candidate version) and fleet-wide, oldest to newest.
    ``version``: only this candidate version; ``rollout``: only the windows of this shadow rollout
    (its id or a unique prefix of it); ``since``: only windows from this unix time on."""
    if rollout is not None:
        found = store.rollout(rollout)  # an id prefix, as the dashboard and `fleet rollouts` show them
        rollout = found["id"] if found is not None else rollout
    groups: Dict[Tuple[str, str, object], list] = {}
    for fl, device, record in store.records(["shadow"], fleet=fleet, since=since):
        if version is not None and record.get("shadow_version") != version:
            continue
        if rollout is not None and record.get("rollout") != rollout:
            continue
        groups.setdefault((fl, device, record.get("shadow_version")), []).append(record)
    devices = []
    for (fl, device, shadow_version), records in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0],
                                                                                        str(kv[0][2]))):
        summary = summarize(records)
        latest = records[-1]  # the active model is the one the newest window ran beside
        devices.append({"device": device, "fleet": fl, "shadow_version": shadow_version, "model": latest.get("model"),
                        "active_version": latest.get("version"), **summary, "agreement": agreement(summary)})
    everything = [r for records in groups.values() for r in records]
    fleet_wide = summarize(everything)
    fleet_wide.update(agreement=agreement(fleet_wide), devices=len({(d["fleet"], d["device"]) for d in devices}),
                      shadow_versions=sorted({d["shadow_version"] for d in devices}, key=str))
    return {"ok": True, "fleet": fleet, "version": version, "rollout": rollout, "devices": devices,
            "fleet_wide": fleet_wide}


def describe_agreement(summary: dict) -> str:
    """The agreement of a summary in a few words: ``97.3% top-1``, ``cosine 0.9981 (min 0.912)``."""
    if summary.get("top1_agreement") is not None:
        return f"{100 * summary['top1_agreement']:.1f}% top-1"
    if summary.get("cosine_mean") is not None:
        low = summary.get("cosine_min")
        return f"cosine {summary['cosine_mean']:.4f}" + ("" if low is None else f" (min {low:.3f})")
    return "-"
