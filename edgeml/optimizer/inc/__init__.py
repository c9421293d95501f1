"""``--tuner inc``: Intel Neural Compressor in its own NumPy < 2 environment (``tuner`` here, the
``worker`` folder there, run as a script by that environment's Python)."""
