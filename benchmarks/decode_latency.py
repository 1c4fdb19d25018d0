"""Per-token decode latency vs context length: FAVOR+ recurrent state vs exact attention's key/value cache.

Two parts, each measured side by side in one process (SmolLM2-135M shapes: 9 query heads, 3
key/value heads of 64, float32, batch 1; FAVOR+ with ``nb_features=256``):

- ``attention``: one attention layer's decoding step, as a model runs it: the cache's ``update``
  then the attention function.  FAVOR+: ``FavorCache`` + ``favor_attention_forward`` (the state
  does not grow).  Exact: transformers' ``DynamicCache`` (concatenates the new key/value) +
  ``sdpa_attention_forward`` over the whole context.  The context is filled first with random
  queries/keys/values through the same two calls, in chunks of 2048.
- ``model``: one ``forward`` of the whole SmolLM2-135M on the next token, with the cache of a real
  prefill of ``context`` random tokens (done in chunks of 2048, not timed): FAVOR+ (``FavorCache``,
  what ``generate()`` uses) vs the same weights with ``attn_implementation="sdpa"`` and a
  ``DynamicCache``.

Each step advances the cache by one token (real decoding).  All decoders of a part are prefilled
first, then timed in interleaved rounds of 5 steps each (medians over ``--rounds``), so the load of
the shared machine falls on all of them alike; one torch thread by default for the same reason.
Both wall time and this process's CPU time per step are recorded.  Writes
``results/decode_latency.csv`` and ``decode_latency_run.json``; ``decode_latency.md`` discusses a run.
With ``--local-window W --sink-tokens S`` FAVOR+ is hybrid (its cache keeps the sinks, the window and the
FAVOR+ state of the rest) and the files are ``decode_latency_w{W}_s{S}.csv`` and ``..._run.json``.

    python benchmarks/decode_latency.py
    python benchmarks/decode_latency.py --attention-contexts 512 2048 --model-contexts 512 --rounds 5
    python benchmarks/decode_latency.py --local-window 64 --sink-tokens 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from measurement import Run
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_performer import PerformerConfig
from hf_performer.integration.attention import favor_attention_forward
from hf_performer.integration.cache import FavorCache
from hf_performer.integration.projection import FavorProjection

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
NB_FEATURES = 256
FILL_CHUNK = 2048
SMOLLM2 = Path(os.environ.get("HF_PERFORMER_CACHE", Path.home() / ".cache" / "hf-performer")) / "smollm2-135m"


def attention_decoder(attention: str, context: int, settings: PerformerConfig):
    """A function running one decoding step of one attention layer, its cache filled to ``context``
    (FAVOR+ with ``settings``)."""
    generator = torch.Generator().manual_seed(0)

    def projected(length):
        query = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)
        key, value = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator) for _ in range(2))
        return query, key, value

    config = SimpleNamespace(performer_config=settings)  # a model config's part
    module = SimpleNamespace(
        favor=FavorProjection(config, HEAD_DIM, layer_idx=0),
        is_causal=True,
        training=False,
        num_key_value_groups=HEADS // KV_HEADS,
    )
    cache, attend = (
        (FavorCache(), favor_attention_forward) if attention == "favor+" else (DynamicCache(), sdpa_attention_forward)
    )

    def step(query, key, value):
        key, value = cache.update(key, value, 0)
        return attend(module, query, key, value, None, scaling=HEAD_DIM**-0.5)

    for start in range(0, context, FILL_CHUNK):
        step(*projected(min(FILL_CHUNK, context - start)))
    token = projected(1)
    return lambda: step(*token), cache


def cache_bytes(cache) -> int:
    """Bytes a cache holds for its (single) sequence."""
    if isinstance(cache, FavorCache):
        return cache.nbytes
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def model_decoder(model, attention: str, context: int):
    """A function running one ``forward`` of ``model`` on the next token after a ``context``-token prefill."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (1, context + 1), generator=generator)
    cache = FavorCache() if attention == "favor+" else DynamicCache(config=model.config)
    for start in range(0, context, FILL_CHUNK):
        model(ids[:, start : min(start + FILL_CHUNK, context)], past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = ids[:, -1:]
    return lambda: model(token, past_key_values=cache, use_cache=True), cache


def interleaved_ms_per_call(decoders: dict, rounds: int, burst: int = 5) -> dict:
    """Median wall and CPU milliseconds per call of each decoder: ``key → (wall_ms, cpu_ms)``.

    Timed in ``rounds`` rounds of ``burst`` consecutive calls per decoder: interleaving spreads the
    shared machine's changing load over all decoders alike, and the median over a burst ignores the
    first call after another decoder evicted the CPU caches.  CPU time (this process only) is what
    a single-threaded step costs without the waits for other users' processes.
    """
    wall, cpu = ({key: [] for key in decoders} for _ in range(2))
    for decode in decoders.values():
        decode()
    for _ in range(rounds):
        for key, decode in decoders.items():
            for _ in range(burst):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                decode()
                wall[key].append(time.perf_counter() - start_wall)
                cpu[key].append(time.process_time() - start_cpu)
    return {key: (statistics.median(wall[key]) * 1e3, statistics.median(cpu[key]) * 1e3) for key in decoders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention-contexts", type=int, nargs="*", default=[512, 2048, 8192, 32768])
    parser.add_argument("--model-contexts", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=10, help="rounds of 5 steps per decoder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a loaded machine)")
    parser.add_argument(
        "--model-attentions",
        nargs="+",
        choices=("favor+", "exact"),
        default=["favor+", "exact"],
        help="decoders of the model part (the exact model's prefill dominates a run's time at long contexts)",
    )
    parser.add_argument("--local-window", type=int, default=0, help="hybrid FAVOR+: exact attention to the last W tokens")
    parser.add_argument("--sink-tokens", type=int, default=0, help="hybrid FAVOR+: exact attention to the first S tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = PerformerConfig(nb_features=NB_FEATURES, local_window=args.local_window, sink_tokens=args.sink_tokens)
    hybrid = args.local_window or args.sink_tokens

    run = Run(f"decode_latency_w{args.local_window}_s{args.sink_tokens}" if hybrid else "decode_latency")
    rows = []

    def measure(part: str, decoders: dict) -> None:
        """``decoders``: ``(attention, context) → (decode, cache)``."""
        timings = interleaved_ms_per_call({key: decode for key, (decode, _) in decoders.items()}, args.rounds)
        for (attention, context), (_, cache) in decoders.items():
            rows.append(
                {
                    "part": part,
                    "attention": attention,
                    "context": context,
                    "ms_per_token": round(timings[attention, context][0], 3),
                    "cpu_ms_per_token": round(timings[attention, context][1], 3),
                    "cache_bytes_per_sequence": cache_bytes(cache),
                }
            )
            print(rows[-1], flush=True)

    with torch.inference_mode():
        measure(
            "attention",
            {
                (attention, context): attention_decoder(attention, context, settings)
                for context in args.attention_contexts
                for attention in ("favor+", "exact")
            },
        )
        if args.model_contexts:
            positions = max(8192, max(args.model_contexts) + 5 * args.rounds + 8)  # RoPE: any length works
            loaders = {
                "favor+": lambda: AutoModelForCausalLM.from_pretrained(
                    SMOLLM2, attention="favor+", performer_config=settings, max_position_embeddings=positions
                ),
                "exact": lambda: AutoModelForCausalLM.from_pretrained(
                    SMOLLM2, attn_implementation="sdpa", max_position_embeddings=positions
                ),
            }
            models = {attention: loaders[attention]() for attention in args.model_attentions}
            measure(
                "model",
                {
                    (attention, context): model_decoder(model.eval(), attention, context)
                    for context in args.model_contexts
                    for attention, model in models.items()
                },
            )
    run.finish(rows)


if __name__ == "__main__":
    main()
