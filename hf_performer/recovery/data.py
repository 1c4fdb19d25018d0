"""Datasets for the recovery recipes: local text/TSV/CSV/JSON files or any Hub dataset id.

Everything goes through ``datasets.load_dataset``, so a recipe takes a Hub dataset id (with its
configuration and split) or a local file the same way.  TSV files are read with quoting off
(``csv.QUOTE_NONE``): sentiment and STS texts contain bare quote characters that would otherwise
swallow lines.
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import torch

_BUILDERS = {".txt": "text", ".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_split(
    source: str,
    *,
    split: str = "train",
    column_names: list[str] | None = None,
    dataset_config: str | None = None,
    sample_by: str = "line",
) -> datasets.Dataset:
    """One split of ``source``: a local file (its split is the whole file) or a Hub dataset id.

    - ``.txt``: column ``text``; ``sample_by="line"``: one example a line (empty lines dropped),
      ``"document"``: the whole file as one example, line breaks kept (a text stream such as
      WikiText, whose perplexity is measured on the file as written);
    - ``.tsv`` / ``.csv``: a header row gives the column names, unless ``column_names`` names the
      columns of a headerless file; columns past ``len(column_names)`` are ignored (a few STS-B rows
      carry extra trailing fields);
    - ``.json`` / ``.jsonl``: one object per example;
    - anything else: ``datasets.load_dataset(source, dataset_config, split=split)``.
    """
    suffix = Path(source).suffix.lower()
    if not Path(source).is_file():
        return datasets.load_dataset(source, dataset_config, split=split)
    if suffix not in _BUILDERS:
        raise ValueError(f"{source}: cannot tell the format from the suffix {suffix!r}; use one of {sorted(_BUILDERS)}")
    if sample_by not in ("line", "document"):
        raise ValueError(f"sample_by must be 'line' or 'document', got {sample_by!r}")
    options: dict = {"sample_by": sample_by} if suffix == ".txt" else {}
    if _BUILDERS[suffix] == "csv":
        options = {"sep": "\t" if suffix == ".tsv" else ",", "quoting": csv.QUOTE_NONE if suffix == ".tsv" else 0}
        if column_names:
            options.update(header=None, names=column_names, usecols=list(range(len(column_names))))
    dataset = datasets.load_dataset(_BUILDERS[suffix], data_files={"data": source}, split="data", **options)
    if suffix == ".txt":
        dataset = dataset.filter(lambda row: bool(row["text"].strip()))
    return dataset


def card_dataset(source: str, split: str, name: str | None = None) -> dict[str, str]:
    """``dataset_type``, ``dataset_name`` (and for a Hub dataset ``dataset_split``) of a model-card result
    measured on ``source``.

    A Hub id is the dataset's type and, unless ``name`` gives a readable one, its name.  A local file's
    path means nothing to the card's readers and may be private (``/tmp/run/heldout.txt``), so a file is
    described by ``name`` or else by its folder and file name (``stsb/dev.tsv``), never by its path.
    """
    path = Path(source)
    if not path.is_file():
        return {"dataset_type": source, "dataset_name": name or source, "dataset_split": split}
    described = name or f"{path.resolve().parent.name}/{path.name}"
    return {"dataset_type": described, "dataset_name": described}


def text_examples(dataset: datasets.Dataset, text_columns: list[str]) -> datasets.Dataset:
    """One ``text`` example per non-empty cell of ``text_columns`` (an STS pair gives two sentences)."""
    missing = [c for c in text_columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"text columns {missing} not in the data; its columns are {dataset.column_names}")
    texts = [str(t) for column in text_columns for t in dataset[column] if t is not None and str(t).strip()]
    return datasets.Dataset.from_dict({"text": texts})


def tokenized(dataset: datasets.Dataset, tokenizer, max_length: int, column: str = "text") -> datasets.Dataset:
    """``input_ids`` / ``attention_mask`` of ``column``, truncated to ``max_length`` (padding is the collator's)."""
    return dataset.map(
        lambda rows: tokenizer(rows[column], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=dataset.column_names,
    )


def token_blocks(dataset: datasets.Dataset, tokenizer, block_size: int, column: str = "text") -> datasets.Dataset:
    """Causal-LM examples: the whole text tokenized as one stream (an EOS between documents, when
    the tokenizer has one), cut into ``block_size`` tokens; the ragged tail is dropped, so no padding."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer(list(dataset[column]), add_special_tokens=False)["input_ids"]:
        stream.extend(ids + separator)
    blocks = [stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one block of {block_size}")
    return datasets.Dataset.from_dict({"input_ids": blocks, "attention_mask": [[1] * block_size] * len(blocks)})


def skipped_positions(blocks: datasets.Dataset, up_to: int, *, seed: int = 0) -> datasets.Dataset:
    """``blocks`` (of :func:`token_blocks`, ``L`` tokens each) with ``position_ids`` that jump once, so that a model
    trained on ``L``-token blocks sees relative distances up to ``up_to − 1`` (PoSE, Zhu et al., ICLR 2024, arXiv
    2309.10400): block ``i``'s positions are ``0 … p − 1`` then ``p + s … L − 1 + s``, with the cut ``p`` drawn
    from ``1 … L − 1`` and the skip ``s`` from ``0 … up_to − L`` (uniformly, seeded: the same blocks get the same
    positions in every process).  The first tokens keep positions ``0, 1, …`` as at inference, where they are a
    hybrid's sinks.  Why: a hybrid's far part trained on 512-token blocks only ever saw keys 64–511 tokens back
    (and their rotary angles); at 2,048 tokens of context it meets distances it was never trained on.

    The tokens stay contiguous text: only their positions move.  Pass an ``attention_mask`` with them (the blocks
    have one): without it transformers reads a jump in ``position_ids`` as the start of another packed sequence."""
    length = len(blocks[0]["input_ids"])
    if up_to < length:
        raise ValueError(
            f"positions up to {up_to} cannot hold blocks of {length} tokens: give --positions_up_to ≥ the block "
            f"length (--max_length {length}), or leave it unset for positions 0 … {length - 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    count = len(blocks)
    cuts = torch.randint(1, max(length, 2), (count, 1), generator=generator)  # a one-token block: no cut inside
    skips = torch.randint(0, up_to - length + 1, (count, 1), generator=generator)
    tokens = torch.arange(length)
    positions = tokens + skips * (tokens >= cuts)
    return blocks.add_column("position_ids", positions.tolist())


def stream_token_ids(source: str, tokenizer, *, split: str = "test", dataset_config: str | None = None) -> torch.Tensor:
    """``[N]`` token ids of ``source`` (see :func:`load_split`) read as one stream: its documents joined by line
    breaks, no special tokens (perplexity over a text as written)."""
    texts = load_split(source, split=split, dataset_config=dataset_config, sample_by="document")
    return torch.tensor(tokenizer("\n".join(texts["text"]), add_special_tokens=False)["input_ids"])
