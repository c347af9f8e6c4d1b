"""``ModelConfig``: the acoustic model's shape, torch-free (``pipeline.config`` and the stream
drivers read it without loading torch; the model is ``workers.model.bilstm``)."""

from __future__ import annotations

from dataclasses import dataclass

COMBINE_MODES = ("concat", "sum", "mean", "product")
QUANTIZE_MODES = ("none", "int8", "bf16")  # inference-time number formats (``quantize_model``)


@dataclass(frozen=True)
class ModelConfig:
    input_dim: int = 120
    hidden_size: int = 256
    num_layers: int = 3
    num_tokens: int = 29
    bidirectional: bool = True  # False: forward-only LSTM, zero lookahead
    combine: str = "concat"  # how the two directions' outputs are merged
    dropout: float = 0.15

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"model.combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        for name in ("input_dim", "hidden_size", "num_layers", "num_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def layer_output_dim(self) -> int:
        return 2 * self.hidden_size if self.bidirectional and self.combine == "concat" else self.hidden_size
