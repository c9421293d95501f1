"""MLflow, where the teams who train the models keep them: model URIs as sources, optimize runs
tracked, signed artifacts registered. Host side only; ``mlflow`` is imported inside the functions
(the ``edgeml[mlflow]`` extra), so ``import edgeml`` stays fast and a device never sees it."""
from .client import TrackingError, is_mlflow_uri

__all__ = ["TrackingError", "is_mlflow_uri"]
