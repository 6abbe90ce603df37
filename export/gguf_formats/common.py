"""What every GGUF format entry shares: the entry type and the byte-reading helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class GGUFFormat:
    name: str  # the GGUF type name, as gguf.GGMLQuantizationType spells it
    block_values: int  # weights per GGUF block
    block_bytes: int  # bytes per GGUF block
    form: str  # the onnxruntime form, as the manifest and `jishi info` show it
    decode: Callable[[np.ndarray], object]  # raw (n, blocks, block_bytes) uint8 -> QuantizedWeight | ndarray

    @property
    def bits(self) -> int | None:
        """MatMulNBits bit width of this form (None for floats)."""
        return 4 if self.form.startswith("int4") else 8 if self.form.startswith("int8") else None


def f16(raw: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 value at ``offset`` of every block, as float32 (n, blocks)."""
    return np.ascontiguousarray(raw[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes (…, m) holding two 4-bit codes each → (…, 2m): the low nibbles first, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def bits_of(byte: np.ndarray, count: int) -> np.ndarray:
    """Bit i (0..count-1) of each byte (…, m) → (…, count, m)."""
    return (byte[..., None, :] >> np.arange(count, dtype=np.uint8)[:, None]) & 1


def rows(x: np.ndarray) -> np.ndarray:
    """(n, blocks, …) → (n, blocks·…): blocks of one row side by side."""
    return x.reshape(x.shape[0], -1)
