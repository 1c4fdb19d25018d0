"""``FavorProjection``: the random features ω of one attention module, kept as buffers, and with
``PerformerConfig(far_weight=True)`` the learnable per-head weight of the hybrid's FAVOR+ part.

Attached as ``attention_module.favor``; its buffers are persistent, so they are saved in the
safetensors file and a saved model reloads with bit-identical features.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from hf_performer.config import PerformerConfig
from hf_performer.favor.features import LEARNED_FEATURE_MAPS, learned_projection, orthogonal_random_matrix


def feature_seed(seed: int, layer_idx: int, stream: int, draw: int) -> int:
    """A 63-bit seed for draw number ``draw`` of layer ``layer_idx`` (stream 0: self-, 1: cross-attention).

    Hashing keeps the draws of different layers and redraws independent while depending on nothing
    but these integers, so all processes of a distributed run agree without communicating.
    """
    digest = hashlib.sha256(f"{seed}/{layer_idx}/{stream}/{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class FavorProjection(nn.Module):
    """Random features of one attention layer, shared by its heads.

    ``config`` is the model's transformers config (the object itself, shared by all layers): its
    ``performer_config`` says how to draw and use the features, so a setting changed there after
    loading reaches every layer.

    Buffers: ``projection`` ``[nb_features, head_dim]`` (float32, the ω of the paper), ``draws``
    (how many times it has been redrawn; the next draw's seed depends on it) and ``steps`` (training
    steps counted so far; a redraw falls every ``redraw_interval`` of them).  With ``far_weight`` set when
    the model is built, the parameter ``far_log_weight`` ``[num_attention_heads]`` (zeros at first: weight 1).
    """

    def __init__(self, config, head_dim: int, layer_idx: int, stream: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.stream = stream
        self.register_buffer("projection", self._draw(0, head_dim))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # called by the attention function with (query, key, value, key_padding_mask, scaling, causal) of every
        # uncached call while set: how a training loss reads the layer's queries and keys (attention transfer's
        # far-share error); never saved
        self.inputs_hook = None
        if self.settings.far_weight:
            self.far_log_weight = nn.Parameter(torch.zeros(config.num_attention_heads))

    @property
    def settings(self) -> PerformerConfig:
        """The model config's ``performer_config``, read at each use (never a copy taken at init)."""
        return self.config.performer_config

    def far_log_weights(self) -> torch.Tensor | None:
        """The per-head log weights of the hybrid's FAVOR+ part in use: ``far_log_weight`` when ``far_weight``
        is set (and the far part is FAVOR+), else None (weight 1)."""
        settings = self.settings
        if not settings.far_weight or settings.far_part != "favor":
            return None
        if not hasattr(self, "far_log_weight"):
            raise ValueError(
                "PerformerConfig.far_weight=True was set after this model was built, so its layers have no "
                "far_log_weight parameter. Load or convert the model with performer_config={'far_weight': True}."
            )
        return self.far_log_weight

    def _apply(self, fn, recurse=True):
        """Move ``projection`` with the model but keep it float32 through ``.to(dtype)``, ``.half()``, ...

        ω in bfloat16 keeps 8 bits of mantissa: every feature ``exp(ωᵀk)`` would be off by up to 2⁻⁸ of
        its exponent, and the draws would no longer be the ones the seed gives.  The attention casts
        queries and keys to float32 anyway, so a float32 ω costs nothing there.
        """
        features = self.projection
        super()._apply(fn, recurse)
        if self.projection.dtype != features.dtype:
            self.projection = features.to(self.projection.device)
        return self

    def _draw(self, draw: int, head_dim: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(feature_seed(self.settings.seed, self.layer_idx, self.stream, draw))
        # orthogonal_random_matrix draws in torch's default dtype, which from_pretrained(dtype=...) sets
        # while it builds the model: the buffer must be float32 from the start, so that loading keeps it so
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            if self.settings.feature_map in LEARNED_FEATURE_MAPS:
                return learned_projection(self.settings.feature_map, self.settings.nb_features, head_dim,
                                          generator=generator, orthogonal=self.settings.orthogonal)
            return orthogonal_random_matrix(
                self.settings.nb_features,
                head_dim,
                generator=generator,
                orthogonal=self.settings.orthogonal,
                scaling=self.settings.feature_scaling,
            )
        finally:
            torch.set_default_dtype(default_dtype)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the first draw of the seed (what a freshly converted checkpoint gets)."""
        self.draws.zero_()
        self.steps.zero_()
        self.projection.copy_(self._draw(0, self.projection.shape[1]))
        if hasattr(self, "far_log_weight"):
            self.far_log_weight.zero_()

    @torch.no_grad()
    def redraw(self) -> None:
        """Replace ω by the next draw of the seed (training only: eval never redraws)."""
        self.draws += 1
        self.projection.copy_(self._draw(int(self.draws), self.projection.shape[1]))

    @torch.no_grad()
    def count_step(self) -> bool:
        """Count one training step; redraw if it completes a ``redraw_interval``.  Returns whether it redrew."""
        self.steps += 1
        interval = self.settings.redraw_interval
        if interval and int(self.steps) % interval == 0:
            self.redraw()
            return True
        return False

    def extra_repr(self) -> str:
        return f"nb_features={self.settings.nb_features}, head_dim={self.projection.shape[1]}, layer={self.layer_idx}"
