"""How the FAVOR+ op's time depends on its block size (and, causal, its chunk size): the evidence behind
``hf_performer.favor.attention.block_length`` and the default ``causal_chunk_size``.

``favor_attention`` computes the features of ``block_size`` tokens at a time (all heads together) and
uses them before the next block; ``block_size = L`` is the one-pass computation, every ``[L, m]``
tensor streamed through memory.  One process, forward and forward+backward, best of ``--repeats``.
Writes ``results/block_size.csv`` and ``block_size_run.json``.  ``default`` marks the block the op picks for
a forward without autograd (``LEAN_BLOCK_ELEMENTS`` of features; causally ``causal_block_elements``, more for
sequences below 2,048 tokens at 8 heads); under autograd causal attention picks
``recompute_block_length`` instead (memory, see its docstring), bidirectional the same as without.

    python benchmarks/block_size.py                      # L = 16384, 8 heads, d 64, m 256
    python benchmarks/block_size.py --length 4096 --blocks 128 512
"""

from __future__ import annotations

import argparse

import torch

from measurement import Run, seconds_per_call
from providers import add_op_shape_arguments, attention_call, import_favor_without_transformers, random_qkv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384)
    add_op_shape_arguments(parser)
    parser.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 16384],
                        help="block sizes to time; the default (block_length) is always timed too")
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256], help="causal chunk sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import_favor_without_transformers()
    from hf_performer.favor import favor_attention, orthogonal_random_matrix
    from hf_performer.favor.attention import LEAN_BLOCK_ELEMENTS, block_length, causal_block_elements

    run = Run("block_size")
    q, k, v = random_qkv(args.length, args.heads, args.head_dim)
    projection = orthogonal_random_matrix(args.nb_features, args.head_dim, generator=torch.Generator().manual_seed(0))
    rows = []
    for causal in (False, True):
        chunks = args.chunks if causal else [128]
        for chunk in chunks:
            elements = causal_block_elements(args.heads, args.length, args.nb_features) if causal else LEAN_BLOCK_ELEMENTS
            default = block_length(args.heads, args.nb_features, chunk if causal else 1, elements)
            for block in sorted({*args.blocks, default}):
                if causal and block % chunk:
                    continue

                def op(q, k, v, block=block, chunk=chunk):
                    return favor_attention(q, k, v, projection, causal=causal, chunk_size=chunk, block_size=block)[0]

                for pass_ in ("forward", "forward+backward"):
                    seconds = seconds_per_call(attention_call(op, q, k, v, pass_), args.repeats)
                    row = dict(mode="causal" if causal else "bidirectional", **{"pass": pass_}, chunk=chunk if causal else "",
                               block=block, default=block == default, seconds=round(seconds, 4))
                    rows.append(row)
                    print(row, flush=True)
    run.finish(rows, length=args.length, heads=args.heads, head_dim=args.head_dim, nb_features=args.nb_features)


if __name__ == "__main__":
    main()
