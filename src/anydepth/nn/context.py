"""What a leaf layer is told about where it sits in the network."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["encoder", "decoder", "encdec_encoder", "encdec_decoder"]


@dataclass
class LayerContext:
    """Position of one residual sublayer in the network.

    Depth-dependent schemes (Admin, DeepNorm, hyper-connections) read their init from here, so the
    same class gives the right constants at any depth without the caller computing them.
    """

    layer: int = 0  # index of the block (0-based)
    n_layers: int = 1  # number of blocks in this stack
    sublayer: int = 0  # index of the residual sublayer inside the block (0 attention, then cross, then ff)
    n_sublayers: int = 2  # residual sublayers per block (2 encoder/decoder-only, 3 with cross-attention)
    arch: Arch = "decoder"  # DeepNorm's constants differ for encoder/decoder-only and enc-dec stacks
    n_enc_layers: int = 0  # encoder depth N of an encoder-decoder model (DeepNorm's enc-dec constants)
    n_dec_layers: int = 0  # decoder depth M of an encoder-decoder model
    shared: dict[str, Any] = field(default_factory=dict)  # per-block state shared by its sublayers
    stack: dict[str, Any] = field(default_factory=dict)  # state shared by every block of the stack (value residual)

    @property
    def index(self) -> int:
        """Global 0-based index of this residual sublayer in its stack."""
        return self.layer * self.n_sublayers + self.sublayer

    @property
    def total(self) -> int:
        """Total number of residual sublayers N in the stack (Admin's ``num_res_layers``)."""
        return self.n_layers * self.n_sublayers
