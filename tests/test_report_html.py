"""``edgeml report``: the optimization report as one self-contained HTML page."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser

from edgeml.core.artifact import read_artifact


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text, self.stack = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeml.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_the_report_shows_every_candidate_the_plot_and_the_manifest_without_fetching_anything(digits_int8_artifact, tmp_path):
    out = tmp_path / "report.html"
    proc = _cli("report", digits_int8_artifact, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    manifest = read_artifact(digits_int8_artifact).manifest
    assert result["kept"] == manifest["recipe"] == "int8" and result["candidates"] == len(manifest["candidates"])
    page = out.read_text()
    parsed = Collect()
    parsed.feed(page)
    text = " ".join(parsed.text)
    # one dot and one table row per candidate; the kept one marked in both
    assert parsed.tags.count("circle") == len(manifest["candidates"])
    assert sum(1 for a in parsed.attrs if a.get("class") == "kept") == 2
    for c in manifest["candidates"]:
        assert c["recipe"] in text and str(c["zstd_bytes"]) in text
    assert f"accuracy {manifest['metrics']['accuracy']:.4f}" in text and "met" in text
    assert "calibration: 200 samples" in text
    # the manifest itself, escaped, in the page; nothing loaded from elsewhere
    assert json.loads(re.search(r"<pre>(.*)</pre>", page, re.S)[1].replace("&quot;", '"').replace("&lt;", "<")
                      .replace("&gt;", ">").replace("&#x27;", "'").replace("&amp;", "&")) == json.loads(
        json.dumps(manifest, default=str))
    assert not any(a.get("src") or (a.get("href") or "").startswith("http") for a in parsed.attrs)
    assert "<script" not in page


def test_a_missing_artifact_or_unwritable_output_is_one_line(digits_int8_artifact, tmp_path):
    proc = _cli("report", tmp_path / "none.edgeml", "-o", tmp_path / "r.html")
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1
    proc = _cli("report", digits_int8_artifact, "-o", tmp_path / "no" / "such" / "dir" / "r.html")
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1 and "output folder" in proc.stderr, proc.stderr
    assert not (tmp_path / "no").exists()
