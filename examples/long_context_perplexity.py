"""Does a model read beyond its window?  Perplexity of the same tokens with short and with long context.

For each ``--models NAME=CHECKPOINT`` (a stock causal LM loads with exact attention, a FAVOR+ checkpoint
with the attention it was saved with), the text (a file read as one stream, or a Hub dataset id) is cut into spans of ``--span`` tokens and the last ``--scored``
tokens of each are predicted from at most each of ``--contexts`` tokens
(:func:`hf_performer.recovery.long_context.tail_perplexity`).  Prints one Markdown table with each
model's perplexity at each context and its ratio to the first model's (the reference), and writes it to
``--out``.

    python examples/long_context_perplexity.py --text examples/data/wikitext2_valid_300.txt \\
        --models exact=SMOLLM2_FOLDER hybrid=out/w64_s4_favor/finetune [--span 2048] [--scored 511] \\
        [--contexts 512 2048] [--far_key_limit 444] [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_performer  # noqa: F401  (registers FAVOR+)
from hf_performer.recovery.arguments import add_text_and_models_arguments
from hf_performer.recovery.data import stream_token_ids
from hf_performer.recovery.long_context import tail_perplexity


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_and_models_arguments(parser, "NAME=CHECKPOINT; the first is the reference.")
    parser.add_argument("--span", type=int, default=2048, help="Tokens per span (the longest context).")
    parser.add_argument("--scored", type=int, default=511, help="Tokens scored at the end of each span.")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048], help="Context lengths (> --scored).")
    parser.add_argument(
        "--far_key_limit", type=int, default=None,
        help="Read every hybrid FAVOR+ checkpoint with this PerformerConfig.far_key_limit (a query's far weights times "
        "N / n beyond N far keys; e.g. 444 for a model trained on 512-token blocks with W = 64, S = 4) instead of its "
        "own; other checkpoints load as they are.",
    )
    return parser.parse_args(argv)


def load(checkpoint: str, far_key_limit: int | None):
    """The causal LM of ``checkpoint``, in eval mode; a FAVOR+ one with ``far_key_limit`` if given."""
    settings = {}
    if far_key_limit is not None and hasattr(AutoConfig.from_pretrained(checkpoint), "performer_config"):
        settings["performer_config"] = {"far_key_limit": far_key_limit}
    return AutoModelForCausalLM.from_pretrained(checkpoint, **settings).eval()


def main(argv=None) -> None:
    args = parse(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.models[0][1])
    ids = stream_token_ids(args.text, tokenizer, split=args.split, dataset_config=args.dataset_config)
    rows, reference = [], None
    for name, checkpoint in args.models:
        model = load(checkpoint, args.far_key_limit)
        start = time.perf_counter()
        scores = [tail_perplexity(model, ids, span=args.span, scored=args.scored, context=c) for c in args.contexts]
        values = [ppl for ppl, _ in scores]
        reference = reference or values
        print(f"{name}: " + ", ".join(f"context {c}: {v:.2f}" for c, v in zip(args.contexts, values))
              + f" ({scores[0][1]} tokens, {time.perf_counter() - start:.0f} s)", flush=True)
        rows.append(f"| {name} | " + " | ".join(f"{v:.2f} | {v / r:.3f}" for v, r in zip(values, reference)) + " |")
        del model
    header = "| model | " + " | ".join(f"context {c} | × {args.models[0][0]}" for c in args.contexts) + " |"
    table = "\n".join([header, "|---" * (1 + 2 * len(args.contexts)) + "|", *rows])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
