"""Whole all-MiniLM-L6-v2 on padded batches of short sentences: FAVOR+ with its batch pieces, FAVOR+ in one call, SDPA.

A BERT user fine-tunes and evaluates on batches of short sequences, where pure FAVOR+ cuts the batch into pieces
(``hf_performer.favor.attention.BATCH_PIECE_ELEMENTS``).  One process per attention: FAVOR+ alternates calls with
the pieces and in one call (the constant switched between calls, same model and inputs), SDPA (stock transformers)
runs alone.  Batches of random token ids, each row padded after a random length between a third of the tokens and
all of them.  Medians of ``--repeats`` calls after a warm-up.  Writes ``results/<name>.csv`` and ``<name>_run.json``.

    python benchmarks/minilm_batch.py                                        # 64 × 32 and 32 × 128, forward
    python benchmarks/minilm_batch.py --shapes 32x64 --passes forward+backward --repeats 6 --name minilm_batch_train
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from measurement import Run, run_child
from providers import minilm

ATTENTIONS = ("favor+", "sdpa")
PASSES = ("forward", "forward+backward")


def child(attention: str, batch: int, tokens: int, pass_: str, repeats: int) -> None:
    """Runs in the fresh process: prints ``{setting: median seconds}``."""
    import torch

    from hf_performer.favor import attention as op

    model = minilm(attention)
    settings = ({"favor+ in pieces": op.BATCH_PIECE_ELEMENTS, "favor+ in one call": 1 << 62} if attention == "favor+"
                else {attention: None})
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, tokens), generator=generator)
    lengths = torch.randint(tokens // 3, tokens + 1, (batch,), generator=generator)
    mask = (torch.arange(tokens)[None] < lengths[:, None]).long()

    def call() -> None:
        if pass_ == "forward":
            model.eval()
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
        else:
            model.train()
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()

    times = {name: [] for name in settings}
    order = list(settings.items())
    for _, elements in order:  # a warm-up of each
        if elements is not None:
            op.BATCH_PIECE_ELEMENTS = elements
        call()
    for index in range(repeats):
        for name, elements in order if index % 2 == 0 else order[::-1]:
            if elements is not None:
                op.BATCH_PIECE_ELEMENTS = elements
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    print(json.dumps({name: statistics.median(values) for name, values in times.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["64x32", "32x128"], help="batch x tokens (default: 64x32 32x128)")
    parser.add_argument("--passes", nargs="+", default=["forward"], choices=PASSES)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--name", default="minilm_batch", help="results/<name>.csv (default: minilm_batch)")
    parser.add_argument("--child-timeout", type=float, default=900)
    parser.add_argument("--child", nargs=4, metavar=("ATTENTION", "BATCH", "TOKENS", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        attention, batch, tokens, pass_ = args.child
        child(attention, int(batch), int(tokens), pass_, args.repeats)
        return

    run = Run(args.name)
    rows = []
    for shape in args.shapes:
        batch, tokens = (int(n) for n in shape.split("x"))
        for pass_ in args.passes:
            cells = {}
            for attention in ATTENTIONS:
                command = [sys.executable, __file__, "--child", attention, str(batch), str(tokens), pass_,
                           "--repeats", str(args.repeats)]
                result = run_child(command, args.child_timeout, f"{attention} {shape} {pass_}")
                cells.update(result or {})
            for setting, seconds in cells.items():
                rows.append(dict(batch=batch, tokens=tokens, pass_=pass_, setting=setting, seconds=f"{seconds:.5g}"))
            text = "  ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in cells.items())
            print(f"{batch} x {tokens} {pass_:<16} {text}", flush=True)
    for row in rows:
        row["pass"] = row.pop("pass_")
    run.finish(rows, repeats=args.repeats)


if __name__ == "__main__":
    main()
