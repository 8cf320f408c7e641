"""Model configuration and presets (SPEC §7)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from agpt.errors import AgptError

#: name -> (d_model, n_heads, n_layers, d_ff). `micro` is the seed's µGPT (108,481 parameters at
#: vocabulary 65); the larger ones are for benchmarks.
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "micro": (64, 4, 2, 256),
    "small": (128, 4, 4, 512),
    "base": (256, 8, 6, 1024),
    "large": (512, 8, 8, 2048),
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. `context` is the longest context it is meant for (the seed's seq_len)."""

    vocab_size: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    context: int = 32
    rope_base: float = 10000.0
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise AgptError(f"vocabulary size {self.vocab_size} must be >= 1")
        for name in ("d_model", "n_heads", "n_layers", "d_ff", "context"):
            if getattr(self, name) < 1:
                raise AgptError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise AgptError(f"d_model {self.d_model} must split into {self.n_heads} heads of even "
                            "size (rotary encoding rotates pairs)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        return replace(self, vocab_size=vocab_size)


def preset(name: str, vocab_size: int, context: int = 32) -> ModelConfig:
    """A named preset at the given vocabulary size."""
    if name not in PRESETS:
        raise AgptError(f"unknown model preset {name!r}: use one of {', '.join(PRESETS)}")
    d, h, n, f = PRESETS[name]
    return ModelConfig(vocab_size, d, h, n, f, context)
