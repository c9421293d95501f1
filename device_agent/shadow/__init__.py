"""Shadow evaluation: a candidate run beside the serving model on sampled requests, in a process
of its own, off the response path (``runner``: the agent's side; ``worker``: the candidate's)."""
from .runner import ShadowRunner

__all__ = ["ShadowRunner"]
