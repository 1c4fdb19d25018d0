"""``PerformerConfig``: the FAVOR+ settings of a model, validated and JSON-serialisable.

Torch only.  A Performer model's transformers config holds one as ``config.performer_config``
(written to config.json in its dict form); the attention layers read their settings from there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hf_performer.favor.features import FEATURE_MAPS, FEATURE_SCALINGS, KERNELS
from hf_performer.favor.hybrid import FAR_PARTS

__version__ = "0.1.0"


FEATURE_FIELDS = ("nb_features", "kernel", "orthogonal", "feature_scaling", "seed", "kernel_epsilon", "feature_map")
"""The settings a converted model's random features were drawn and are used with.  The others
(``redraw_interval``, ``causal_chunk_size``, ``local_window``, ``sink_tokens``, ``far_part``, ``far_weight``)
schedule redraws or the computation, or say which keys are weighted exactly instead of by the same features
(and how much the others weigh), so they may change when a converted checkpoint is loaded."""


@dataclass
class PerformerConfig:
    """How FAVOR+ replaces softmax attention in every attention layer of a model."""

    nb_features: int = field(
        default=256,
        metadata={"help": "Number m of random features per layer (≥ 1). Error falls as m grows; cost is O(L·m·d)."},
    )
    kernel: str = field(
        default="softmax",
        metadata={
            "help": "'softmax' (positive random features, unbiased softmax estimate), 'relu' (generalised "
            "attention), or a name registered with hf_performer.register_kernel."
        },
    )
    orthogonal: bool = field(
        default=True, metadata={"help": "Orthogonal random features (lower variance) instead of i.i.d. Gaussian."}
    )
    feature_scaling: str = field(
        default="chi",
        metadata={"help": "Row norms of ω: 'chi' (unbiased, Gaussian-like norms), 'sqrt_d' (all equal to √d) or 'unit' "
                  "(all 1). feature_map='softmax' always starts from unit rows."},
    )
    redraw_interval: int = field(
        default=1000,
        metadata={
            "help": "Redraw the random features every this many training steps (0: never): Trainer counts its "
            "global steps, hand-written loops call hf_performer.count_training_step(model) after each update. "
            "Draws depend only on the seed, so every process of a distributed run draws the same features."
        },
    )
    causal_chunk_size: int = field(
        default=64,
        metadata={
            "help": "Tokens per chunk of causal attention (≥ 1): exact inside a chunk, prefix sums across "
            "(64 was fastest at 8 heads of 64, m=256 on CPU: benchmarks/results/block_size.csv)."
        },
    )
    kernel_epsilon: float = field(
        default=1e-3,
        metadata={"help": "ε added to generalised-kernel features (≥ 0) so the denominator stays positive."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random features (≥ 0); layer l draws from (seed, l)."})
    local_window: int = field(
        default=0,
        metadata={
            "help": "Hybrid FAVOR+: exact softmax attention to the keys within this many tokens (≥ 0; causal: the last "
            "W tokens up to the query, bidirectional: |i − j| < W), FAVOR+ beyond, one normaliser. 0: pure FAVOR+."
        },
    )
    sink_tokens: int = field(
        default=0,
        metadata={
            "help": "Hybrid FAVOR+: exact softmax attention to the first this many real tokens (≥ 0; 'attention "
            "sinks'); needs local_window ≥ 1. 0: none."
        },
    )
    far_part: str = field(
        default="favor",
        metadata={
            "help": "Hybrid FAVOR+: what weights the keys beyond the window and the sinks: 'favor' (FAVOR+ features) "
            "or 'none' (they are dropped: window + sinks only, the ablation that shows what FAVOR+ adds); needs "
            "local_window ≥ 1.",
        },
    )

    far_weight: bool = field(
        default=False,
        metadata={
            "help": "Hybrid FAVOR+: a learnable weight exp(θ_h) per attention head on the FAVOR+ part (the parameter "
            "favor.far_log_weight, θ = 0 at conversion: outputs unchanged until training moves it), so attention "
            "transfer and fine-tuning can turn each head's far part up or down (LoLCATs' per-head factor); needs "
            "local_window ≥ 1 and far_part='favor'.",
        },
    )
    feature_map: str = field(
        default="favor+",
        metadata={
            "help": "Hybrid FAVOR+: the features of the far part. 'favor+': the paper's positive random features, "
            "φ(x) = m^-½ exp(ωx − ‖x‖²/2), an unbiased estimate of exp(qᵀk). 'softmax': a learned feature map, "
            "φ(x) = softmax(ωx) over the m features (Hedgehog, arXiv 2402.04347): ω starts as unit-norm orthogonal "
            "rows and must be trained (attention transfer, far_weight=True); needs local_window ≥ 1 and "
            "redraw_interval=0 (with far_part='none' it is unused: a trained model's far part switched off). "
            "'hedgehog': learned too, φ(x) = [softmax(ω₁x), softmax(ω₂x)] over the two halves of the m features "
            "(m even), started at ω₂ = −ω₁ (Hedgehog's pair), with the same needs.",
        },
    )
    far_key_limit: int = field(
        default=0,
        metadata={
            "help": "Hybrid FAVOR+: a query with n > N far keys (beyond the window, not sinks) has its FAVOR+ weights "
            "times N / n; 0: no limit. Learned features are bounded and sum to 1, so the far part's share of the "
            "attention mass grows with its number of keys: N = the most far keys a query met in training "
            "(block length − local_window − sink_tokens) keeps that share at longer contexts. Needs local_window ≥ 1 "
            "and far_part='favor'; may change on load.",
        },
    )

    def __post_init__(self):
        _check_int(self, "nb_features", 1)
        _check_int(self, "redraw_interval", 0)
        _check_int(self, "causal_chunk_size", 1)
        _check_int(self, "seed", 0)
        _check_int(self, "local_window", 0)
        _check_int(self, "sink_tokens", 0)
        if self.sink_tokens and not self.local_window:
            raise ValueError(
                f"PerformerConfig.sink_tokens={self.sink_tokens} needs PerformerConfig.local_window ≥ 1 (the current "
                "token at least); set local_window too, or sink_tokens=0"
            )
        if self.far_part not in FAR_PARTS:
            raise ValueError(f"PerformerConfig.far_part must be one of {FAR_PARTS}, got {self.far_part!r}")
        if self.far_part != "favor" and not self.local_window:
            raise ValueError(
                f"PerformerConfig.far_part={self.far_part!r} drops every key beyond the local window, but "
                "local_window=0 leaves no window; set local_window ≥ 1 too, or far_part='favor'"
            )
        if not isinstance(self.far_weight, bool):
            raise ValueError(f"PerformerConfig.far_weight must be True or False, got {self.far_weight!r}")
        if self.far_weight and (not self.local_window or self.far_part != "favor"):
            raise ValueError(
                f"PerformerConfig.far_weight=True weighs the FAVOR+ part against a local window, but local_window="
                f"{self.local_window}, far_part={self.far_part!r}; set local_window ≥ 1 and far_part='favor', or "
                "far_weight=False"
            )
        _check_int(self, "far_key_limit", 0)
        if self.far_key_limit and (not self.local_window or self.far_part != "favor"):
            raise ValueError(
                f"PerformerConfig.far_key_limit={self.far_key_limit} limits the FAVOR+ part beyond a local window, but "
                f"local_window={self.local_window}, far_part={self.far_part!r}; set local_window ≥ 1 and "
                "far_part='favor', or far_key_limit=0"
            )
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"PerformerConfig.feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if self.feature_map != "favor+":
            self._check_learned_feature_map()
        if (self.local_window or self.sink_tokens) and self.kernel != "softmax":
            raise ValueError(
                f"PerformerConfig.local_window/sink_tokens need kernel='softmax' (exact and FAVOR+ weights share one "
                f"normaliser), got kernel={self.kernel!r}"
            )
        if self.kernel not in KERNELS:
            raise ValueError(
                f"PerformerConfig.kernel must be one of {sorted(KERNELS)} (register others with "
                f"hf_performer.register_kernel), got {self.kernel!r}"
            )
        if not isinstance(self.orthogonal, bool):
            raise ValueError(f"PerformerConfig.orthogonal must be True or False, got {self.orthogonal!r}")
        if self.feature_scaling not in FEATURE_SCALINGS:
            raise ValueError(
                f"PerformerConfig.feature_scaling must be one of {FEATURE_SCALINGS}, got {self.feature_scaling!r}"
            )
        if isinstance(self.kernel_epsilon, bool) or not isinstance(self.kernel_epsilon, (int, float)) or not (
            self.kernel_epsilon >= 0
        ):
            raise ValueError(f"PerformerConfig.kernel_epsilon must be a number ≥ 0, got {self.kernel_epsilon!r}")

    def _check_learned_feature_map(self) -> None:
        """A learned ``feature_map`` needs a far part to serve, an ω that is never redrawn, and no row norms of its own."""
        learned = f"feature_map={self.feature_map!r}"
        if not self.local_window:
            raise ValueError(
                f"PerformerConfig.{learned} is a learned map for the far part of hybrid attention, but local_window=0; "
                "set local_window ≥ 1, or feature_map='favor+'"
            )
        if self.redraw_interval:
            raise ValueError(
                f"PerformerConfig.redraw_interval={self.redraw_interval} would replace the learned ω of {learned} by "
                "a new random draw; set redraw_interval=0"
            )
        if self.feature_scaling != "chi":
            raise ValueError(
                f"PerformerConfig.feature_scaling={self.feature_scaling!r} sets the norms of random features, but "
                f"{learned} starts ω from unit-norm rows and learns them; leave feature_scaling at its default ('chi')"
            )
        if self.feature_map == "hedgehog" and self.nb_features % 2:
            raise ValueError(
                f"PerformerConfig.nb_features={self.nb_features} must be even for {learned}, which splits the "
                "features into two halves; set an even nb_features"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fields, stamped with the hf-performer version that wrote them."""
        return {**dataclasses.asdict(self), "hf_performer_version": __version__}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PerformerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names - {"hf_performer_version"}
        if unknown:
            raise ValueError(f"unknown PerformerConfig fields {sorted(unknown)}; known fields: {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if k in names})

    def updated(self, values: PerformerConfig | dict[str, Any]) -> PerformerConfig:
        """New settings: a ``PerformerConfig`` replaces these; a dict changes only the fields it names."""
        if isinstance(values, dict):
            return PerformerConfig.from_dict({**dataclasses.asdict(self), **values})
        return PerformerConfig.coerce(values)

    def reloaded_with(self, requested: PerformerConfig | dict[str, Any] | None) -> PerformerConfig:
        """The settings a model converted with these loads with when ``requested`` is asked for.

        Fields outside :data:`FEATURE_FIELDS` apply; a change to one of those raises, since the saved
        features were drawn for these values (a dict ``requested`` names only what it changes).
        """
        if requested is None:
            return self
        settings = self.updated(requested)
        changed = [name for name in FEATURE_FIELDS if getattr(settings, name) != getattr(self, name)]
        if changed:
            asked = ", ".join(f"{name}={getattr(settings, name)!r}" for name in changed)
            saved = ", ".join(f"{name}={getattr(self, name)!r}" for name in changed)
            raise ValueError(
                f"this checkpoint is already FAVOR+ with {saved}, and its random features were drawn for those "
                f"settings; it cannot switch to {asked}. To get them, convert the original (softmax) checkpoint "
                f"with these settings (`hf-performer convert`, or `from_pretrained(original, attention='favor+', "
                "performer_config=...)`). Only redraw_interval, causal_chunk_size, local_window, sink_tokens, far_part, far_weight and "
                "far_key_limit may change on load: pass just those, e.g. performer_config={'local_window': 64, 'sink_tokens': 4}."
            )
        return settings

    @classmethod
    def coerce(cls, value: PerformerConfig | dict[str, Any] | None) -> PerformerConfig:
        """Accept a ``PerformerConfig``, its dict form (as saved in config.json) or ``None`` (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        raise TypeError(f"performer_config must be a PerformerConfig or a dict, got {type(value).__name__}")


def _check_int(config: PerformerConfig, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"PerformerConfig.{name} must be an integer ≥ {minimum}, got {value!r}")
