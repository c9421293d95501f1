"""A transformer encoder as people export it: all-MiniLM-L6-v2 (from a package on the registry),
through torch.onnx.export's default exporter (weights in external data), int64 token inputs and
a sentence-embedding output.

It used to be judged by argmax "agreement" (its dynamic int8 build failed at drop 0.13 with a
cosine of 0.99) and its 47 MB word-embedding table stayed float32."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeml
import pretrained
from edgeml.cli.main import main
from edgeml.core.artifact import verify_artifact

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    edgeml.generate_keys(out)
    return out


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    work = tmp_path_factory.mktemp("minilm")
    path = pretrained.export_minilm(work / "minilm.onnx")
    np.savez(work / "eval.npz", **pretrained.minilm_inputs(48, seed=1))
    return path, work / "eval.npz"


def test_a_sentence_encoder_keeps_an_int8_model_judged_by_cosine(minilm, tmp_path, keys, capsys):
    path, eval_data = minilm
    assert (path.parent / (path.name + ".data")).exists()  # the exporter's external data file
    out = tmp_path / "minilm.edgeml"
    code = main(["optimize", str(path), "-o", str(out), "--eval", str(eval_data), "--key", str(keys / "signing.key"),
                 "--latency-runs", "10", "--no-plot", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["ok"], doc
    by_recipe = {c["recipe"]: c for c in doc["candidates"]}
    kept = by_recipe[doc["chosen"]]
    assert kept["quality"]["kinds"] == {"sentence_embedding": "cosine"}
    assert kept["quality"]["drop_kind"] == "cosine" and kept["quality"]["drop"] <= 0.01
    assert doc["chosen"] in ("dynamic", "int8-weights")
    # int8-class: at most 0.45x the float bytes (the embedding table too) and not slower than float
    assert kept["bytes"] <= 0.45 * by_recipe["fp32"]["bytes"]
    dynamic = by_recipe["dynamic"]
    # the word-embedding table (30522 x 384) int8 too: with it in float32 the build was 0.65x
    assert dynamic["bytes"] <= 0.3 * by_recipe["fp32"]["bytes"], dynamic["notes"]
    weights = by_recipe["int8-weights"]
    assert weights["quality"]["cosine"] >= 0.998 and weights["bytes"] <= 0.3 * by_recipe["fp32"]["bytes"]
    art = verify_artifact(out, keys / "signing.pub")
    assert art.manifest["inputs"][0]["dtype"] == "int64"
    assert edgeml.run_selftest(art).ok
