"""How much weight does a hybrid model's FAVOR+ part give the keys it stands in for?  Per layer, on held-out text.

For each ``--models NAME=CHECKPOINT`` (hybrid FAVOR+ checkpoints: ``local_window > 0``, FAVOR+ far part), the text
(a file read as one stream, or a Hub dataset id) is cut into ``--blocks`` blocks of ``--block`` tokens, and every
attention layer's :func:`~hf_performer.favor.far_share.far_share_error` is averaged over them: the log of FAVOR+'s
estimate of the far keys' total weight against softmax's (``log_mass_bias``: negative means FAVOR+ gives them less;
``log_mass``: its square), and the error of the far-only attention output (``output``).  The models run freely (each
layer sees its own model's input).  Prints one Markdown table (the mean over layers, and each layer's bias) and
writes it to ``--out``.

    python examples/far_share.py --text examples/data/wikitext2_valid_300.txt \\
        --models hybrid=out/w64_s4_favor/finetune [--block 512] [--blocks 4] [--out table.md]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_performer  # noqa: F401  (registers FAVOR+)
from hf_performer.recovery.attention_transfer import recorded_far_share
from hf_performer.recovery.arguments import add_text_and_models_arguments
from hf_performer.recovery.data import stream_token_ids


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_and_models_arguments(parser, "NAME=CHECKPOINT of hybrid models.")
    parser.add_argument("--block", type=int, default=512, help="Tokens per block (O(block²) memory per layer).")
    parser.add_argument("--blocks", type=int, default=4, help="Blocks from the start of the text.")
    return parser.parse_args(argv)


@torch.no_grad()
def layer_means(model, blocks: torch.Tensor) -> dict[str, list[float]]:
    """``{field: [mean over blocks, per layer]}`` of the far-share error of ``model`` on ``blocks [N, block]``."""
    sums: dict[str, list[float]] = {}
    for ids in blocks:
        with recorded_far_share(model) as errors:
            model(input_ids=ids[None])
        for field in errors[0]._fields:
            values = [float(getattr(error, field)) for error in errors]
            sums[field] = [a + b for a, b in zip(sums.get(field, [0.0] * len(values)), values)]
    return {field: [value / len(blocks) for value in values] for field, values in sums.items()}


def main(argv=None) -> None:
    args = parse(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.models[0][1])
    ids = stream_token_ids(args.text, tokenizer, split=args.split, dataset_config=args.dataset_config)
    if ids.numel() < args.block * args.blocks:
        raise ValueError(f"--text has {ids.numel()} tokens, fewer than --blocks × --block = {args.block * args.blocks}")
    blocks = ids[: args.block * args.blocks].view(args.blocks, args.block)
    lines = [
        f"Far-share error per layer, {args.blocks} blocks of {args.block} tokens of {args.text}",
        "",
        "| model | log-mass bias, mean over layers | log-mass error² | far-only output error | bias per layer |",
        "|---|---|---|---|---|",
    ]
    for name, checkpoint in args.models:
        means = layer_means(AutoModelForCausalLM.from_pretrained(checkpoint).eval(), blocks)
        mean = {field: sum(values) / len(values) for field, values in means.items()}
        per_layer = " ".join(f"{value:.1f}" for value in means["log_mass_bias"])
        lines.append(f"| {name} | {mean['log_mass_bias']:.2f} | {mean['log_mass']:.1f} | {mean['output']:.3f} | {per_layer} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
