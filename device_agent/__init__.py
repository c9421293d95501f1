"""Device side of edgeml. Never imports tensorflow: only numpy, cryptography and the runtimes."""
