#!/usr/bin/env bash
# The whole path on a small real task: train, make keys, optimize, inspect, verify, bench,
# check the artifact the way a device will, distill -> prune -> quantize by recipe, and serve
# the result with the device agent, then roll v2 out to two devices over a broker. Run from the
# repository root (make quickstart).
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${OUT:-build/quickstart}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}  # TensorFlow's C++ start-up lines (CUDA, oneDNN) are noise here

"$BIN/python" examples/digits/train.py --out "$OUT"
[ -f "$OUT/keys/signing.key" ] || "$BIN/edgeml" keys generate --out "$OUT/keys"
"$BIN/edgeml" optimize "$OUT/digits.keras" -o "$OUT/digits.edgeml" \
    --calibration "$OUT/calib.npz" --eval "$OUT/eval.npz" --labels "$OUT/labels.txt" \
    --recipe auto --max-accuracy-drop 0.01 --key "$OUT/keys/signing.key" --name digits --version 1
"$BIN/edgeml" inspect "$OUT/digits.edgeml"
"$BIN/edgeml" verify "$OUT/digits.edgeml" --public-key "$OUT/keys/signing.pub"
"$BIN/edgeml" bench "$OUT/digits.edgeml" --data "$OUT/eval.npz"
"$BIN/edgeml-agent" check "$OUT/digits.edgeml" --public-key "$OUT/keys/signing.pub"
# The recipe chain: distill into a half-width student, prune it to 75% zeros, quantize to int8.
# Exit code 9 means a stage missed its accuracy gate: the artifact is still written, and said so.
"$BIN/edgeml" optimize "$OUT/digits.keras" -o "$OUT/digits-small.edgeml" --recipe-file examples/digits/recipe.toml \
    --train "$OUT/train.npz" --calibration "$OUT/calib.npz" --eval "$OUT/eval.npz" --labels "$OUT/labels.txt" \
    --key "$OUT/keys/signing.key" --name digits-small --version 1 || [ $? -eq 9 ]
"$BIN/edgeml-agent" check "$OUT/digits-small.edgeml" --public-key "$OUT/keys/signing.pub"
# The device side: the agent serves the small artifact over its local KServe v2 API.
rm -rf "$OUT/agent-data"
"$BIN/python" examples/digits/serve.py "$OUT/digits-small.edgeml" --public-key "$OUT/keys/signing.pub" \
    --eval "$OUT/eval.npz" --data-dir "$OUT/agent-data" --agent "$BIN/edgeml-agent"
# Fleet updates: v2 of the digits model, pushed over a broker to two devices in health-gated waves.
"$BIN/edgeml" optimize "$OUT/digits.keras" -o "$OUT/digits-v2.edgeml" --calibration "$OUT/calib.npz" \
    --eval "$OUT/eval.npz" --labels "$OUT/labels.txt" --recipe int8 --key "$OUT/keys/signing.key" \
    --name digits --version 2 --no-plot
"$BIN/python" examples/digits/fleet.py --v1 "$OUT/digits.edgeml" --v2 "$OUT/digits-v2.edgeml" \
    --key "$OUT/keys/signing.key" --eval "$OUT/eval.npz" --work "$OUT/fleet" --bin "$BIN"
echo "quickstart done: artifacts $OUT/digits.edgeml, $OUT/digits-v2.edgeml and $OUT/digits-small.edgeml, plots $OUT/*.candidates.png"
