"""Tensor descriptions shared by the host and the device (standard library only)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    ``shape`` uses ``None`` for a dynamic dimension. ``scale``/``zero_point`` are set when the
    tensor itself is quantized (an int8 model's input or output): real = scale * (q - zero_point).
    """

    name: str
    dtype: str
    shape: tuple
    scale: Optional[float] = None
    zero_point: Optional[int] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(
            name=d["name"],
            dtype=d["dtype"],
            shape=tuple(d["shape"]),
            scale=d.get("scale"),
            zero_point=d.get("zero_point"),
        )

    def describe(self) -> str:
        dims = ",".join("?" if s is None else str(s) for s in self.shape)
        return f"{self.name} {self.dtype}[{dims}]"
