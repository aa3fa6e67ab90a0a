"""``reparameterize(model)``: a trained Admin or DeepNorm model as a plain post-LN model of the same function.

Admin (Liu et al. 2020) and DeepNorm (Wang et al. 2022) compute ``LN(w * x + F(x))`` with ``w > 1`` on the
skip. LayerNorm ignores a positive scale of its input, ``LN(c z) = LN(z)`` (up to its ``eps``, which
becomes ``eps / c^2``), so

    LN(w * x + F(x)) = LN(x + F(x) / w)

and dividing the branch's output projection (weight and bias) by ``w`` gives the original Transformer's
``LN(x + F'(x))`` (admin-torch's README: Admin "can be reparameterized into the original Transformer").
That is exact for DeepNorm's ``alpha`` and Admin's default scalar ``w``.

Admin's trainable per-channel ``w`` (``as_parameter=True``) is no common factor. It is folded where the
skip comes from instead: ``w * x`` is the previous sublayer's norm output with gain and bias times ``w``,
and the branch reads ``x = (w * x) / w`` through its input projections with their columns divided by
``w``. The first sublayer's skip is the embedding: its ``w`` goes into the embedding projection, or the
token table (only when it is not tied to the output head) and a learned position table. Where none of
these can take it (a tied, unfactorised embedding, fixed sinusoidal or axial positions, a norm without
per-channel gain and bias), :func:`reparameterize` raises ``ValueError`` naming the place and the fix.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from anydepth.model.build import build_model, output_projections
from anydepth.model.config import EncoderDecoderConfig, ModelConfig
from anydepth.nn.registry import RESIDUALS

__all__ = ["reparameterize"]



def reparameterize(model: nn.Module) -> nn.Module:
    """A new model with ``residual="postnorm"`` computing what the Admin or DeepNorm ``model`` computes.

    Works for a ``TransformerLM`` (decoder-only or encoder-only) and an ``EncoderDecoder``; ``model`` is
    left unchanged. The result gives the same logits up to LayerNorm's ``eps`` and saves with
    ``save_pretrained`` like any model.

    Raises:
        TypeError: ``model`` is not a model built by ``build_model``.
        ValueError: a part's residual does not fold into post-LN (``folds_to_postnorm``: Admin, DeepNorm),
            or a per-channel ``w`` cannot be folded.
    """
    from anydepth.model.encdec import EncoderDecoder
    from anydepth.model.lm import TransformerLM

    if isinstance(model, EncoderDecoder):
        cfg = EncoderDecoderConfig(
            encoder=_plain(model.config.encoder, "encoder"), decoder=_plain(model.config.decoder, "decoder")
        )
        pairs = [("encoder", model.encoder), ("decoder", model.decoder)]
    elif isinstance(model, TransformerLM):
        cfg = _plain(model.config, "model")
        pairs = [("", model)]
    else:
        raise TypeError(
            f"reparameterize expects a TransformerLM or EncoderDecoder from build_model, got {type(model).__name__}"
        )
    new = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".omega")}
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    new_parts = dict(new.named_children())
    with torch.no_grad():
        for name, old_lm in pairs:
            new_lm = new_parts[name] if name else new
            _fold_stack(old_lm, new_lm, name or "model")
    return new


def _plain(cfg: ModelConfig, where: str) -> ModelConfig:
    kind = cfg.residual.kind
    if not RESIDUALS.get(kind).folds_to_postnorm:
        foldable = [k for k in RESIDUALS.kinds() if RESIDUALS.get(k).folds_to_postnorm]
        raise ValueError(
            f"reparameterize: the {where}'s residual is {kind!r}; only {foldable} models (LN(w*x + F(x))) "
            "have a plain post-LN equivalent. Pass a model with one of those residuals."
        )
    if cfg.stack.kind not in ("sequential", "dense"):  # the rule table already forbids this; kept for old configs
        raise ValueError(f"reparameterize: the {where} uses stack={cfg.stack.kind!r}; expected 'sequential' or 'dense'")
    return copy.deepcopy(cfg).replace(residual="postnorm")


def _fold_stack(old_lm: nn.Module, new_lm: nn.Module, where: str) -> None:
    old_chain = [r for b in old_lm.blocks for r in b.residuals()]
    new_chain = [(r, br) for b in new_lm.blocks for r, br in zip(b.residuals(), b.branches())]
    for k, (old_res, (_, branch)) in enumerate(zip(old_chain, new_chain)):
        w = old_res.skip_scale()
        if bool((w <= 0).any()):
            raise ValueError(
                f"reparameterize: sublayer {k} of the {where} has a skip scale <= 0 ({w.min().item():.4g}); LayerNorm "
                "only ignores positive scales, so this model has no post-LN equivalent"
            )
        if w.numel() == 1 or bool((w == w[0]).all()):
            c = float(w[0])
            for lin in output_projections(branch):
                lin.weight.div_(c)
                if lin.bias is not None:
                    lin.bias.div_(c)
            continue
        # per-channel w: the skip x becomes w*x where x is produced, the branch reads it back through 1/w
        place = f"sublayer {k} of the {where}"
        if k == 0:
            _scale_embedding(new_lm, w, place)
        else:
            _scale_norm(new_chain[k - 1][0].norm, w, place)
        for lin in _input_projections(branch):
            lin.weight.div_(w.to(lin.weight.dtype))


def _scale_norm(norm: nn.Module, w: Tensor, place: str) -> None:
    gain = next(
        (getattr(norm, n) for n in ("weight", "scale") if isinstance(getattr(norm, n, None), nn.Parameter)), None
    )
    if gain is None or gain.dim() != 1:
        raise ValueError(
            f"reparameterize: the per-channel Admin w of {place} has to be folded into the previous norm's gain, but "
            f"{type(norm).__name__} has no per-channel gain; use norm='layer' or 'rms', or Admin with "
            "as_parameter=False"
        )
    gain.mul_(w.to(gain.dtype))
    bias = next(
        (getattr(norm, n) for n in ("bias", "offset") if isinstance(getattr(norm, n, None), nn.Parameter)), None
    )
    if bias is not None:
        bias.mul_(w.to(bias.dtype))


def _scale_embedding(lm: nn.Module, w: Tensor, place: str) -> None:
    cfg = lm.config
    if isinstance(lm.emb_proj, nn.Linear):
        lm.emb_proj.weight.mul_(w.to(lm.emb_proj.weight.dtype).unsqueeze(-1))
    elif cfg.tie_embeddings and lm.head is not None:
        raise ValueError(
            f"reparameterize: the per-channel Admin w of {place} multiplies the embeddings, whose table is tied to the "
            "output head, so it cannot be folded there; build the model with tie_embeddings=False (or emb_dim "
            "smaller than dim), or use Admin with as_parameter=False"
        )
    else:
        lm.tok_emb.weight.mul_(w.to(lm.tok_emb.weight.dtype))
    if getattr(lm.pos, "absolute", False):
        if cfg.position.kind != "learned":
            raise ValueError(
                f"reparameterize: the per-channel Admin w of {place} multiplies the {cfg.position.kind!r} positions, "
                "which are not one learned table; use position='learned', 'rotary' or 'none', or Admin with "
                "as_parameter=False"
            )
        lm.pos.weight.mul_(w.to(lm.pos.weight.dtype))


def _input_projections(branch: nn.Module) -> list[nn.Linear]:
    # cross-attention's to_kv reads the encoder output, not this residual, and keeps its weights
    names = ("to_qkv", "to_q", "proj_in", "toqk", "tov")
    out = [m for n in names if isinstance(m := getattr(branch, n, None), nn.Linear)]
    if not out:
        raise ValueError(
            f"reparameterize: {type(branch).__name__} has no input projection to fold a per-channel w into; "
            "use Admin with as_parameter=False"
        )
    return out
