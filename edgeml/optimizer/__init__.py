"""The build machine's job: turn a Keras, SavedModel or ONNX model into a signed, measured artifact.

``job.optimize`` runs it: load the source (``sources/``), train stages (``training/``: distill,
prune), build each recipe with a backend (``backends/``: TFLite, ONNX) or tune int8 with Intel
Neural Compressor (``inc/``), measure every candidate (``evaluate``), choose, and write the
artifact with ``edgeml.core``. Heavy imports (tensorflow, keras, onnx) stay inside the functions
that need them. The public names are re-exported by ``edgeml`` itself.
"""
