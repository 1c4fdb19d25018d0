"""Random features for FAVOR+ (Choromanski et al., ICLR 2021, arXiv 2009.14794).

Torch only: nothing here knows about transformers.

Notation follows the paper: ``d`` is the head dimension, ``m`` the number of random features,
``ω`` (``projection``, shape ``[m, d]``) the random directions.  Softmax attention uses the kernel
``SM(x, y) = exp(xᵀy)``, estimated without bias by the positive random features of Lemma 1::

    φ(x) = m^-½ · exp(ωx − ‖x‖²/2)          (paper eq. 7 with h(x) = exp(−‖x‖²/2), f = exp)

so that ``E[φ(x)ᵀφ(y)] = exp(xᵀy)``.  Generalised attention (paper §2.2) replaces ``exp`` by any
non-negative ``f``: ``φ(x) = m^-½ · (f(ωx) + ε)``.  The learned ``"softmax"`` and ``"hedgehog"`` feature maps keep
the form ``log φ(x) = ωx − c(x) − ½ log m`` with another normaliser ``c`` (:func:`log_normaliser`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

FEATURE_SCALINGS = ("chi", "sqrt_d", "unit")

FEATURE_MAPS = ("favor+", "softmax", "hedgehog")
"""The normalisers ``c(x)`` of ``log φ(x) = ωx − c(x) − ½ log m`` (see :func:`log_normaliser`)."""

LEARNED_FEATURE_MAPS = ("softmax", "hedgehog")
"""The feature maps whose ω is learned (by attention transfer) rather than drawn: they start from unit-norm rows
(:func:`learned_projection`) and are never redrawn."""

NEG_LOG_WEIGHT = -1e30
"""Log-weight of a padding key: exp(NEG_LOG_WEIGHT − anything finite) is exactly 0."""

LOG2_E = 1.0 / math.log(2.0)


def exp_(x: torch.Tensor) -> torch.Tensor:
    """``x.exp_()`` for the op's large tensors (features ``[L, m]``, exact weights ``[L, keys]``), in place.

    On the CPU it runs as ``exp2(x·log₂e)``: torch's CPU ``exp`` is its 1-ulp Sleef routine, about 2.2× the time
    of ``exp2`` (1.3 M floats, 2 threads: 0.59 against 0.27 ms with the product; ``benchmarks/RESULTS.md``, issue
    14), and it was 12–17 % of the op's time.  Rounding ``x·log₂e`` to float32 adds a relative error of about
    ``|x|·2⁻²⁴``: float rounding for the arguments ``≤ 0`` that stabilised features and weights take.  On other
    devices ``exp`` is a fast intrinsic already and the product would be one more pass: plain ``exp_``."""
    if x.device.type != "cpu":
        return x.exp_()
    return x.mul_(LOG2_E).exp2_()


def orthogonal_random_matrix(
    nb_features: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    orthogonal: bool = True,
    scaling: str = "chi",
) -> torch.Tensor:
    """Draw the random projection ``ω`` of shape ``[nb_features, dim]`` (float32, on the CPU).

    With ``orthogonal=True`` the rows come from stacked ``dim × dim`` blocks, each an exactly
    orthogonal (Haar) matrix: the QR factor of a Gaussian matrix with the signs of ``diag(R)``
    folded in, so that rows within a block are orthogonal (paper §2.4, "ORFs"); the last block is
    truncated when ``nb_features`` is not a multiple of ``dim``.  Orthogonality lowers the
    estimator's variance for every ``m`` (paper Theorem 2).  With ``orthogonal=False`` the rows are
    i.i.d. Gaussian.

    ``scaling`` sets the row norms: ``"chi"`` gives each row the norm of an independent
    ``N(0, I_d)`` vector (chi-distributed with ``d`` degrees of freedom), which keeps every row
    marginally ``N(0, I_d)`` and so the estimator unbiased; ``"sqrt_d"`` fixes all norms at ``√d``
    (the regularised variant of the paper's code); ``"unit"`` at 1 (the start of a learned ``"softmax"``
    feature map, whose logits ``ωx`` then stay of the order of ``‖x‖/√d``: soft, with gradients).

    The draw happens on the CPU from ``generator`` so that the same seed gives the same matrix on
    every device and every process of a distributed run; move it where it is needed.
    """
    if scaling not in FEATURE_SCALINGS:
        raise ValueError(f"scaling must be one of {FEATURE_SCALINGS}, got {scaling!r}")
    if orthogonal:
        nb_blocks = math.ceil(nb_features / dim)
        gaussian = torch.randn(nb_blocks, dim, dim, generator=generator)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        directions = q.transpose(-2, -1).reshape(nb_blocks * dim, dim)[:nb_features]  # unit rows
    else:
        directions = torch.randn(nb_features, dim, generator=generator)
        if scaling == "chi":
            return directions
        directions = directions / directions.norm(dim=1, keepdim=True)
    if scaling == "chi":
        norms = torch.randn(nb_features, dim, generator=generator).norm(dim=1, keepdim=True)
    else:
        norms = torch.full((nb_features, 1), math.sqrt(dim) if scaling == "sqrt_d" else 1.0)
    return directions * norms


def learned_projection(feature_map: str, nb_features: int, dim: int, *, generator: torch.Generator | None = None,
                       orthogonal: bool = True) -> torch.Tensor:
    """The ω ``[m, d]`` a learned feature map (:data:`LEARNED_FEATURE_MAPS`) starts from: unit-norm rows (of
    :func:`orthogonal_random_matrix`), which keep its logits ``ωx`` of the order of ``‖x‖/√d``: soft, with gradients;
    for ``"hedgehog"`` ``[ω₁; −ω₁]`` with ``m/2`` such rows ``ω₁``, Hedgehog's ``[softmax(ωx), softmax(−ωx)]``."""
    check_feature_count(feature_map, nb_features)
    draw = dict(generator=generator, orthogonal=orthogonal, scaling="unit")
    if feature_map == "hedgehog":
        half = orthogonal_random_matrix(nb_features // 2, dim, **draw)
        return torch.cat([half, -half])
    return orthogonal_random_matrix(nb_features, dim, **draw)


def log_normaliser(x: torch.Tensor, logits: torch.Tensor | None, feature_map: str = "favor+", *,
                   scale: float = 1.0) -> torch.Tensor:
    """``c(s·x)`` of ``log φ(s·x) = ω(s·x) − c(s·x) − ½ log m`` for inputs ``x [..., L, d]`` (``s = scale``) and their
    logits ``ω(s·x)`` ``[..., L, m]`` (``"favor+"`` does not read them): ``[..., L, 1]``, or ``[..., L, m]`` (one per
    feature) for ``"hedgehog"``:

    - ``"favor+"``: ``‖s·x‖²/2``, the positive random features of the paper (eq. 7): ``E[φ(q)ᵀφ(k)] = exp(qᵀk)``.
      With ``‖q‖, ‖k‖`` of a pretrained model the estimate is an average of log-normal terms whose mean rests on
      rare large ones: 256 features give the far keys of a hybrid about e^-9 of their weight
      (``examples/results/smollm2_hybrid.md``).
    - ``"softmax"``: ``logsumexp(ω(s·x)) − ½ log m``, so ``φ(x) = softmax(ωx)`` over the ``m`` features: a learned
      feature map (Hedgehog, Zhang et al., ICLR 2024, arXiv 2402.04347; LoLCATs) with bounded features that sum
      to 1. It estimates nothing until ω (and the hybrid's far weight) are trained, by attention transfer.
    - ``"hedgehog"``: the features in two halves, each a softmax of its own: ``φ(x) = [softmax(ω₁x), softmax(ω₂x)]``
      (``m`` even), started at ``ω₂ = −ω₁`` (:func:`learned_projection`): Hedgehog's own map, whose
      ``[softmax(ωx), softmax(−ωx)]`` pair weighs keys by their large negative products with the query as well as
      their large positive ones (a single softmax only sees the latter). ``c_j`` is the log-sum-exp of feature
      ``j``'s half, ``− ½ log m``.
    """
    if feature_map == "favor+":  # from x, not from a scaled copy of it
        return torch.linalg.vecdot(x, x).unsqueeze(-1).mul_(0.5 * scale**2)
    if feature_map == "softmax":
        return torch.logsumexp(logits, -1, keepdim=True) - 0.5 * math.log(logits.shape[-1])  # (backward reads lse)
    if feature_map == "hedgehog":
        m = logits.shape[-1]
        halves = logits.unflatten(-1, (2, m // 2))
        return (torch.logsumexp(halves, -1, keepdim=True) - 0.5 * math.log(m)).expand_as(halves).flatten(-2)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def per_query_normaliser(logits: torch.Tensor, normaliser: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query logits ``ωq`` ``[..., L, m]`` and their :func:`log_normaliser` → ``(logits', c' [..., L, 1])`` with
    ``logits' − c' = ωq − c``: a normaliser of one value per feature (``"hedgehog"``) goes into the logits (``c' =
    0``), so that the query side, which keeps ``c`` apart from the logits it exponentiates, has one per query."""
    if normaliser.shape[-1] == 1:
        return logits, normaliser
    logits = logits - normaliser if logits.requires_grad else logits.sub_(normaliser)
    return logits, normaliser.new_zeros(*normaliser.shape[:-1], 1)


def check_feature_count(feature_map: str, nb_features: int) -> None:
    """``"hedgehog"`` splits the ``m`` features into two halves: ``m`` must be even (ValueError otherwise)."""
    if feature_map == "hedgehog" and nb_features % 2:
        raise ValueError(f"feature_map='hedgehog' splits the features into two halves: nb_features must be even, "
                         f"got {nb_features}")


def query_log_features(q: torch.Tensor, projection: torch.Tensor, key_reference: torch.Tensor,
                       feature_map: str = "favor+") -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled queries ``q [..., L, d]`` → ``(ωq + R [..., L, m], c(q) [..., L, 1])``: the logits of the query side of
    a hybrid's FAVOR+ part against keys kept relative to ``R`` (``key_reference``, broadcast over ``L``), and the
    normaliser (:func:`log_normaliser`) that no longer cancels against the exact part (one of one value per feature
    goes into the logits instead: :func:`per_query_normaliser`)."""
    logits = torch.matmul(q, projection.transpose(0, 1))
    logits, normaliser = per_query_normaliser(logits, log_normaliser(q, logits, feature_map))
    if feature_map != "favor+" and logits.requires_grad:  # the normaliser's backward reads the logits
        return logits + key_reference, normaliser
    return logits.add_(key_reference), normaliser


def _project(x: torch.Tensor, projection_t: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``x [..., L, d] @ projection_t [d, m]``, into ``out [..., L, m]`` if given.  An ``out`` whose ``[L, m]``
    matrices are apart in memory (the end of each row of an output, in the bidirectional forward's read-out) is
    written by one batched product: ``matmul`` would fold a contiguous ``x`` into one ``[N·L, d]`` matrix and
    refuse such an ``out``."""
    if out is None or out.is_contiguous():
        return torch.matmul(x, projection_t, out=out)
    rows = x.reshape(-1, *x.shape[-2:])
    torch.bmm(rows, projection_t.expand(rows.shape[0], *projection_t.shape), out=out.view(-1, *out.shape[-2:]))
    return out


def query_features(
    q: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kernel_epsilon: float = 1e-3,
    *,
    input_scale: float = 1.0,
    key_reference: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """φ(s·q) up to a per-query positive factor, ``[..., L, d] → [..., L, m]`` (``s = input_scale``).

    For the softmax kernel the keys' features come relative to a per-feature reference ``R``
    (``key_reference``, ``[..., m]`` broadcast over ``L``; see :func:`key_features`), so the query side
    carries ``exp(R_j)``: ``φ̃(q)_j = m^-½ exp(ω_j q + R_j − max_i (ω_i q + R_i))`` (max detached).  The
    per-query factor cancels between the numerator and the denominator of ``D⁻¹ φ(Q)(φ(K)ᵀV)``; every
    entry lies in ``(0, m^-½]`` and the feature ``j*`` that reaches the maximum meets keys whose own
    feature ``j*`` sums to ≥ 1, so the denominator is ≥ ``m^-1`` whatever the norms of ``q`` and ``k``.
    ``kernel_fn=None`` means softmax.  The scale goes into ``ω`` (``[m, d]``) rather than into ``q``
    (``[L, d]``): ``(s·q)ω = q(s·ω)`` with no pass over ``q``.  ``out`` (``[..., L, m]``, each ``[L, m]`` contiguous):
    where to compute them, a buffer reused block after block instead of a new allocation each time.
    """
    m = projection.shape[0]
    logits = _project(q, (projection * input_scale).transpose(0, 1), out)
    if kernel_fn is not None:
        return (kernel_fn(logits) + kernel_epsilon) * m**-0.5
    if key_reference is not None:
        logits = logits.add_(key_reference.unsqueeze(-2))
    # in place: one pass over the [L, m] tensor; m^-½ rides in the exponent
    return exp_(logits.sub_(logits.detach().amax(-1, keepdim=True) + 0.5 * math.log(m)))


def key_log_features(
    k: torch.Tensor,
    projection: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    input_scale: float = 1.0,
    out: torch.Tensor | None = None,
    feature_map: str = "favor+",
) -> torch.Tensor:
    """``log φ(s·k) + ½ log m = ω(s·k) − c(s·k)``, by default ``c(s·k) = ‖s·k‖²/2`` (paper eq. 7 with ``h(k) =
    exp(−‖k‖²/2)``; :func:`log_normaliser` for ``feature_map``): ``[..., L, d] → [..., L, m]``; keys where ``keep``
    (``[..., L]`` bool) is False get ``NEG_LOG_WEIGHT``.  ``out``: a buffer to compute them in (see
    :func:`query_features`); written in place unless autograd needs the logits."""
    logits = torch.matmul(k, (projection * input_scale).transpose(0, 1), out=out)
    normaliser = log_normaliser(k, logits, feature_map, scale=input_scale)
    if feature_map != "favor+" and logits.requires_grad:  # the normaliser's backward reads the logits
        logits = logits - normaliser
    else:
        logits = logits.sub_(normaliser)
    return logits if keep is None else logits.masked_fill_(~keep[..., None], NEG_LOG_WEIGHT)


def key_features(
    k: torch.Tensor,
    projection: torch.Tensor,
    kernel_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    kernel_epsilon: float = 1e-3,
    keep: torch.Tensor | None = None,
    *,
    input_scale: float = 1.0,
    out: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    feature_map: str = "favor+",
    at_least: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """φ(s·k) for ``k [..., L, d]`` (``s = input_scale``, folded into ``ω``) as ``(φ̃, R)`` with
    ``φ(s·k)_j = exp(R_j) · φ̃_j``: features ``[..., L, m]`` and a per-feature reference ``R [..., m]``.

    ``keep`` (``[..., L]`` bool, broadcastable) marks real keys; the others get ``φ(k) = 0``.  ``out``: a
    buffer for the softmax features (see :func:`query_features`).  ``reference`` (``[..., m]``, softmax kernel):
    a given ``R`` instead of the keys' own maximum, e.g. the one a summary of several blocks was kept relative to
    (it must be ≥ their log-features, or features exceed ``m^-½``).  ``at_least`` (``[..., m]``): a floor for the
    keys' own ``R``, e.g. the reference of a summary these keys are added to, which then needs no rescaling
    of their sum.  ``feature_map``: see :func:`log_normaliser`.

    For the softmax kernel ``R_j = max_s (ω_j k_s − ‖k_s‖²/2)`` over the real keys (detached;
    ``NEG_LOG_WEIGHT`` when there is none), so every ``φ̃ ≤ m^-½`` and no feature's sum over the keys
    underflows: stabilising per feature rather than per key (or with one maximum over all keys) is what
    keeps large query/key norms from underflowing whole rows (:func:`query_features` folds ``R`` into
    the queries).  Generalised kernels need no stabiliser: ``R = 0``.  Blocks of keys with their own
    ``R`` add up exactly after rescaling to the larger one.  (``m^-½`` rides in the exponent: each
    feature's sum over the keys is ≥ ``m^-½``.)
    """
    m = projection.shape[0]
    if kernel_fn is not None:
        features = (kernel_fn(k @ (projection * input_scale).transpose(0, 1)) + kernel_epsilon) * m**-0.5
        if keep is not None:
            features = features * keep[..., None]
        return features, features.new_zeros(*features.shape[:-2], m)
    logits = key_log_features(k, projection, keep, input_scale=input_scale, out=out, feature_map=feature_map)
    reference = logits.detach().amax(-2) if reference is None else reference
    if at_least is not None:
        reference = torch.maximum(reference, at_least)
    features = exp_(logits.sub_((reference + 0.5 * math.log(m)).unsqueeze(-2)))
    return (features, reference) if keep is None else (features.mul_(keep[..., None]), reference)


KERNELS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "softmax": None,
    "relu": torch.relu,
}
"""Kernel name → ``f`` of generalised attention (``None``: the positive softmax features)."""


def register_kernel(name: str, kernel_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make ``kernel=name`` select generalised attention with ``φ(x) = m^-½ (kernel_fn(ωx) + ε)``.

    ``kernel_fn`` must map ``[..., m]`` to non-negative values of the same shape.  Configs store
    only the name, so register the same function before loading a model saved with it.
    """
    if name == "softmax":
        raise ValueError("'softmax' names the positive softmax features and cannot be replaced")
    if not callable(kernel_fn):
        raise TypeError(f"kernel_fn for {name!r} must be callable, got {type(kernel_fn).__name__}")
    KERNELS[name] = kernel_fn
