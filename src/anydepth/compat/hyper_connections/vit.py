"""``hyper_connections.vit``: the package's example vision transformer, with mHC residual streams.

``ViT`` splits the image into ``patch_size`` patches, embeds them (LayerNorm, Linear, LayerNorm),
prepends a class token, adds learned positions and runs ``depth`` pre-LayerNorm attention and
feed-forward blocks, each wrapped in a :class:`~anydepth.compat.hyper_connections.mHCv2.mHC` of
``num_residual_streams`` streams; the streams are summed, normalised, and the class token (or the mean
token, ``pool="mean"``) goes through a linear head. The layers are the library's
(:class:`anydepth.nn.attention.FullAttention`, :class:`anydepth.nn.feedforward.MLP`, the mHC of
:mod:`anydepth.nn.residual.hyper`); ``state_dict()`` uses the package's keys and shapes, so its weights load.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anydepth.compat.hyper_connections._state import Renamed, translate_state_dict
from anydepth.compat.hyper_connections.mHCv2 import mHC
from anydepth.nn.attention import FullAttention
from anydepth.nn.feedforward import MLP

__all__ = ["Attention", "FeedForward", "Transformer", "ViT"]


def pair(t):
    return t if isinstance(t, tuple) else (t, t)


class FeedForward(MLP):
    """``dropout(W_2 dropout(gelu(W_1 LayerNorm(x) + b_1)) + b_2)``: the library's MLP after a LayerNorm."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        # int(dim * mult) must give hidden_dim exactly; the half keeps float rounding from taking one off
        super().__init__(MLP.Config(mult=(hidden_dim + 0.5) / dim, activation="gelu", dropout=dropout), dim=dim)
        self.norm = nn.LayerNorm(dim)
        self.post_dropout = nn.Dropout(dropout)
        h = self.hidden
        translate_state_dict(
            self,
            Renamed("norm.weight", "net.0.weight", (dim,), (dim,)),
            Renamed("norm.bias", "net.0.bias", (dim,), (dim,)),
            Renamed("proj_in.weight", "net.1.weight", (h, dim), (h, dim)),
            Renamed("proj_in.bias", "net.1.bias", (h,), (h,)),
            Renamed("proj_out.weight", "net.4.weight", (dim, h), (dim, h)),
            Renamed("proj_out.bias", "net.4.bias", (dim,), (dim,)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.post_dropout(super().forward(self.norm(x)))


class Attention(FullAttention):
    """Pre-LayerNorm multi-head self-attention (the library's :class:`FullAttention`); dropout on the
    attention weights and on the output. With one head of width ``dim`` there is no output projection."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__(
            FullAttention.Config(dropout=dropout, post_dropout=dropout), dim=dim, heads=heads, dim_head=dim_head
        )
        self.norm = nn.LayerNorm(dim)
        if heads == 1 and dim_head == dim:
            self.to_out, self.post_dropout = nn.Identity(), nn.Identity()
        else:
            inner = heads * dim_head
            translate_state_dict(
                self,
                Renamed("to_out.weight", "to_out.0.weight", (dim, inner), (dim, inner)),
                Renamed("to_out.bias", "to_out.0.bias", (dim,), (dim,)),
            )

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.norm(x))


class Transformer(nn.Module):
    """``depth`` pairs (attention, feed-forward), each in an mHC over ``num_residual_streams`` streams."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        mlp_dim: int,
        dropout: float = 0.0,
        num_residual_streams: int = 4,
        mhc_kwargs: dict | None = None,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        init_hyper_conn, self.expand_streams, self.reduce_streams = mHC.get_init_and_expand_reduce_stream_functions(
            num_residual_streams, **(mhc_kwargs or {})
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    init_hyper_conn(dim=dim, branch=Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                    init_hyper_conn(dim=dim, branch=FeedForward(dim, mlp_dim, dropout=dropout)),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.expand_streams(x)
        for attn, ff in self.layers:
            x = ff(attn(x))
        return self.norm(self.reduce_streams(x))


class ViT(nn.Module):
    """``hyper_connections.vit.ViT``: ``img (b, channels, H, W) -> logits (b, num_classes)``."""

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        num_residual_streams: int = 4,
        mhc_kwargs: dict | None = None,
    ):
        super().__init__()
        (ih, iw), (ph, pw) = pair(image_size), pair(patch_size)
        if ih % ph or iw % pw:
            raise ValueError(
                f"image_size={image_size!r} must be divisible by patch_size={patch_size!r}; "
                "choose a patch size that tiles the image"
            )
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' (class token) or 'mean' (mean pooling), got {pool!r}")
        self.patch_height, self.patch_width = ph, pw
        num_patches, patch_dim = (ih // ph) * (iw // pw), channels * ph * pw
        num_cls = 1 if pool == "cls" else 0
        self.to_patch_embedding = nn.Sequential(
            nn.Identity(),  # index 0 is the package's patch rearrangement, done in forward
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.cls_token = nn.Parameter(torch.randn(num_cls, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls, dim))
        self.dropout = nn.Dropout(emb_dropout)
        if mhc_kwargs is None:
            mhc_kwargs = {"num_dynamic_alpha_proposals": 1}
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, num_residual_streams, mhc_kwargs)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes)

    def _patches(self, img: Tensor) -> Tensor:
        """``(b, c, h p1, w p2) -> (b, h w, p1 p2 c)``: row-major patches, pixel-major features."""
        b, c, height, width = img.shape
        ph, pw = self.patch_height, self.patch_width
        x = img.reshape(b, c, height // ph, ph, width // pw, pw)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (height // ph) * (width // pw), ph * pw * c)

    def forward(self, img: Tensor) -> Tensor:
        if img.dim() != 4:
            raise ValueError(f"ViT expects images (batch, channels, height, width), got shape {tuple(img.shape)}")
        x = self.to_patch_embedding(self._patches(img))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.dropout(x + self.pos_embedding[: x.shape[1]])
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))
