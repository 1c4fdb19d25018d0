"""``convert``: a stock BERT, GPT-2 or Llama checkpoint → a FAVOR+ checkpoint anyone can load.

OUT receives the weights with their random features, the exported model code and ``auto_map``
(for ``trust_remote_code=True`` without hf-performer), the tokenizer, a README.md model card and,
for a sentence-transformers checkpoint, its modules (pooling, normalisation, ...) and their configs.

Safety rules, in the order they apply:

- everything that can be checked without loading weights is checked first (SRC is a checkpoint
  of a supported architecture and head, OUT is usable, the settings and evaluation file are
  valid), so a conversion that cannot succeed fails before any work;
- nothing is written into SRC, and OUT may not be SRC, inside it, or contain it;
- a non-empty OUT is refused unless ``overwrite=True``;
- the checkpoint is written to a hidden staging folder next to OUT and renamed into place only
  once complete, so an interrupted conversion leaves no half checkpoint (and, with
  ``overwrite=True``, the previous OUT intact), nor any parent folder of OUT that it created;
- an upload (``push_to_hub``) comes last: when it fails, OUT stays complete and the error says how
  to upload it again without converting (``hf-performer push OUT REPO_ID``).

Every problem a user can cause or fix (a bad SRC or OUT, unreadable weights, an unreachable Hub)
raises :class:`ConversionError` with a message that names it, never a library traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from hf_performer.config import PerformerConfig, __version__
from hf_performer.export.model_card import model_card, read_eval_results
from hf_performer.export.remote_code import auto_map, write_remote_code
from hf_performer.integration.attention import ATTENTION_NAME
from hf_performer.models.base import Family
from hf_performer.models.registry import FAMILIES, family_for

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")
# sentence-transformers' pipeline (modules.json), its settings and the Transformer module's config
# (sentence_bert_config.json and its per-architecture namesakes)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_*_config.json")


class ConversionError(ValueError):
    """A conversion or upload that cannot be done; the message says why and what would work."""


@dataclass(frozen=True)
class Source:
    """What SRC holds, read from its config.json and file names (no weights loaded)."""

    name: str
    local: bool
    family: Family
    stock_class: type  # the head class of SRC, e.g. BertForMaskedLM
    auto_class: str  # the Auto class that loads it, e.g. "AutoModelForMaskedLM"
    has_tokenizer: bool
    config: dict


def _file(src: str, name: str) -> str | None:
    """Path of file ``name`` of SRC (a folder or a Hub id, downloaded to the cache), or ``None`` if absent."""
    return cached_file(src, name, _raise_exceptions_for_missing_entries=False)


def _hub_config_file(src: str) -> str:
    """config.json of the Hub model ``src`` (from the cache when present), or a :class:`ConversionError` saying
    whether the Hub could not be reached, has no such model, or the model has no config.json."""
    not_local = f"SRC {src!r} is not a local folder"
    try:
        return hf_hub_download(src, "config.json")
    except HFValidationError:
        raise ConversionError(f"{not_local}, nor a valid Hub model id (user/name)") from None
    except LocalEntryNotFoundError:  # offline, or no connection, and not in the cache
        why, fix = (
            ("HF_HUB_OFFLINE=1 is set", "unset HF_HUB_OFFLINE")
            if constants.HF_HUB_OFFLINE
            else ("there is no connection to it", "connect")
        )
        raise ConversionError(
            f"{not_local}, and as a Hub model id it cannot be downloaded: the Hub is offline ({why}) and the model is "
            f"not in the local cache; give a local folder, or {fix} and run again"
        ) from None
    except RepositoryNotFoundError:
        raise ConversionError(
            f"{not_local}, nor a Hub model (a private or gated one needs `hf auth login` or HF_TOKEN)"
        ) from None
    except EntryNotFoundError:
        raise ConversionError(f"SRC {src!r} is not a checkpoint: the Hub model has no config.json") from None
    except OSError as error:  # HTTP errors of the Hub
        raise ConversionError(f"{not_local}, and the Hub could not give its config.json: {error}") from None


def inspect_source(src: str) -> Source:
    """Check that SRC is a checkpoint that can be converted, reading only small files."""
    local = Path(src).exists()
    if local and not Path(src).is_dir():
        raise ConversionError(f"SRC {src!r} is a file; give the checkpoint's folder")
    if local:
        config_file = Path(src) / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"SRC {src!r} is not a checkpoint: it has no config.json")
        if not any((Path(src) / name).is_file() for name in WEIGHT_FILES):
            raise ConversionError(f"SRC {src!r} is not a checkpoint: it has a config.json but no weights {WEIGHT_FILES}")
    else:
        config_file = _hub_config_file(src)
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"SRC {src!r}: its config.json is not valid JSON ({error}); fix or replace the file") from None
    if not isinstance(config, dict):
        raise ConversionError(f"SRC {src!r}: its config.json holds a {type(config).__name__}, not a JSON object")

    model_type = config.get("model_type")
    if model_type in {family.model_type for family in FAMILIES.values()}:
        raise ConversionError(f"SRC {src!r} is already a FAVOR+ checkpoint ({model_type}); convert its source instead")
    if model_type not in FAMILIES:
        raise ConversionError(
            f"cannot convert SRC {src!r}: model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    architecture = (config.get("architectures") or [family.base_model.stock_class.__name__])[0]
    head = family.head_named(architecture)
    if head is None:
        raise ConversionError(
            f"cannot convert SRC {src!r}: its head {architecture} has no FAVOR+ version; supported {model_type} "
            f"heads: {', '.join(family.stock_class_names())}"
        )
    return Source(
        name=src,
        local=local,
        family=family,
        stock_class=head.stock_class,
        auto_class=head.auto_class.__name__,
        has_tokenizer=any(_file(src, name) is not None for name in TOKENIZER_FILES),
        config=config,
    )


def _copy_sentence_transformers_files(src: str, local: bool, staging: Path) -> list[str]:
    """Copy SRC's sentence-transformers files and module folders (``1_Pooling/``, ``2_Normalize/``, ...)
    into ``staging``; returns the copied file names (none when SRC is not a sentence-transformers model).

    The Transformer module's weights are the converted ones at the root (its ``path`` is ``""``); the
    other modules are unchanged by the conversion, so ``SentenceTransformer(OUT)`` pools and normalises
    like SRC instead of falling back to plain mean pooling.
    """
    modules_file = _file(src, "modules.json")
    if modules_file is None:
        return []
    modules = json.loads(Path(modules_file).read_text(encoding="utf-8"))
    folders = [module["path"] for module in modules if module["path"]]
    patterns = [*SENTENCE_TRANSFORMERS_FILES, *(f"{folder}/*" for folder in folders)]
    root = Path(src) if local else Path(snapshot_download(src, allow_patterns=patterns))
    files = [path for pattern in SENTENCE_TRANSFORMERS_FILES for path in root.glob(pattern)]
    files += [path for folder in folders for path in (root / folder).rglob("*") if path.is_file()]
    for path in files:
        target = staging / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return sorted(path.relative_to(root).as_posix() for path in files)


def _check_out(out: Path, source: Source, overwrite: bool) -> None:
    existing = next(folder for folder in out.parents if folder.exists())
    if not existing.is_dir():
        raise ConversionError(f"OUT {out} cannot be created: {existing} is a file, not a folder")
    if source.local:
        src = Path(source.name).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise ConversionError(f"OUT {out} must lie outside SRC {src} (and not contain it): SRC is never written")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"OUT {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"OUT {out} is not empty; pass --overwrite (overwrite=True) to replace it")


def _source_card_metadata(source: Source) -> dict:
    """License and language of SRC, from its model card or, failing that, its config."""
    card_file = _file(source.name, "README.md")
    card = ModelCard.load(card_file, ignore_metadata_errors=True).data if card_file else None
    return {
        "license": getattr(card, "license", None) or source.config.get("license"),
        "language": getattr(card, "language", None),
    }


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first: what ``mkdir(parents=True)`` would create."""
    return [path for path in (folder, *folder.parents) if not path.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that exists and is empty; a failed write cleans up after itself."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone
            pass


def staging_folder(out: Path) -> Path:
    """A hidden empty folder next to OUT (same file system, so the final rename is atomic); OUT's missing
    parents are created (:func:`missing_folders` tells which, so a failure can remove them again)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; OUT should get the usual permissions
    return staging


def move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    out.rename(replaced)
    staging.rename(out)
    shutil.rmtree(replaced)


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    """Upload a finished checkpoint folder to the Hub; returns the commit URL.

    The token comes from ``HF_TOKEN`` or ``hf auth login``.  Not exercised by the tests (no network).
    """
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=f"FAVOR+ checkpoint (hf-performer {__version__})"
    ).commit_url


def _check_hub_online(repo_id: str) -> None:
    if constants.HF_HUB_OFFLINE:
        raise ConversionError(
            f"cannot upload to {repo_id}: the Hub is offline (HF_HUB_OFFLINE=1 is set); unset it, or convert without "
            "--push-to-hub and upload later with `hf-performer push OUT REPO_ID`"
        )


def push(out: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload the converted checkpoint OUT to the Hub repository ``repo_id`` (created if absent); returns the commit URL.

    Raises:
        ConversionError: OUT is not a FAVOR+ checkpoint, the Hub is offline, or the upload failed (the
            message says how to retry).
    """
    out = Path(out).expanduser().resolve()
    model_types = {family.model_type for family in FAMILIES.values()}
    try:
        model_type = json.loads((out / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type not in model_types:
        raise ConversionError(
            f"{out} is not a converted FAVOR+ checkpoint (no config.json with a model_type among "
            f"{sorted(model_types)}); convert it first with `hf-performer convert SRC {out}`"
        )
    _check_hub_online(repo_id)
    try:
        return push_folder(out, repo_id, private)
    except Exception as error:  # network, authentication, HTTP: whichever, OUT is left as it was
        retry = f"hf-performer push {out} {repo_id}" + (" --private" if private else "")
        raise ConversionError(
            f"uploading {out} to {repo_id} failed ({type(error).__name__}: {error}); {out} is complete, upload it "
            f"again without converting: {retry}"
        ) from None


def save_checkpoint(
    model: PreTrainedModel,
    folder: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    name: str,
    step: Callable[[str], None] = lambda message: None,
    **card,
) -> None:
    """Write a FAVOR+ ``model`` into ``folder`` as a checkpoint anyone can load: weights with the random
    features, the model code and ``auto_map`` (``trust_remote_code=True`` without hf-performer), the
    tokenizer when given and a README.md model card named ``name``.

    ``card``: the other arguments of :func:`~hf_performer.export.model_card.model_card` (the source, its
    evaluation results, ...); the family, head and settings come from ``model``.  ``step`` is called
    with a line of text before each part.
    """
    family = family_for(model.config.model_type)
    head = family.head_for(type(model))
    if head is None:  # the exported code holds the package's classes only
        raise ValueError(
            f"{type(model).__name__} is not one of hf-performer's {family.model_type} classes, so the exported "
            "code could not load it; save an instance of one of them "
            f"({family.base_model.performer_class.__name__}, ...)"
        )
    model.config.auto_map = auto_map(family)
    step(f"Saving weights and random features ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    model.save_pretrained(folder)
    step("Writing the model code for trust_remote_code=True")
    write_remote_code(family, folder)
    if tokenizer is not None:
        step("Saving the tokenizer")
        tokenizer.save_pretrained(folder)
    step("Writing the model card README.md")
    model_card(
        name,
        stock_model_type=family.stock_model_type,
        auto_class=head.auto_class.__name__,
        settings=model.config.performer_config,
        has_tokenizer=tokenizer is not None,
        **card,
    ).save(folder / "README.md")


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    performer_config: PerformerConfig | dict | None = None,
    *,
    overwrite: bool = False,
    base_model: str | None = None,
    eval_results: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    progress: Callable[[str], None] = _print_progress,
) -> Path:
    """Convert checkpoint SRC (folder or Hub id; BERT, GPT-2 or Llama, any head) to a FAVOR+ checkpoint in OUT.

    Args:
        performer_config: FAVOR+ settings (:class:`PerformerConfig`, its dict, or ``None`` for defaults).
        overwrite: replace a non-empty OUT (only once the new checkpoint is complete).
        base_model: Hub id of the source for the card's ``base_model`` (default: SRC when it is a Hub id).
        eval_results: JSON file of evaluation results for the card (format: :mod:`hf_performer.export.model_card`).
        push_to_hub: Hub repository id to upload OUT to once written; ``private`` creates it private.
        progress: called with a line of text at each step.

    Returns:
        The path of OUT.

    Raises:
        ConversionError: before any work, when SRC, OUT or the options make the conversion impossible; when
            SRC's weights cannot be read (nothing is left behind); when the upload fails (OUT is complete and the
            message says how to upload it again).
    """
    started = time.monotonic()

    def step(message: str) -> None:
        progress(f"[{time.monotonic() - started:6.1f}s] {message}")

    src, out = os.fspath(src), Path(out).expanduser().resolve()
    try:
        settings = PerformerConfig.coerce(performer_config)
        results = read_eval_results(eval_results) if eval_results is not None else None
    except (OSError, TypeError, ValueError) as error:
        raise ConversionError(str(error)) from None
    if private and not push_to_hub:
        raise ConversionError("private=True only applies together with push_to_hub")
    if push_to_hub:
        _check_hub_online(push_to_hub)
    step(f"Reading {src}")
    source = inspect_source(src)
    _check_out(out, source, overwrite)
    card_metadata = _source_card_metadata(source)

    created = missing_folders(out.parent)
    try:
        staging = staging_folder(out)
    except OSError as error:
        remove_empty_folders(created)
        raise ConversionError(f"cannot create OUT {out}: {error}") from None
    try:
        step(f"Loading {source.stock_class.__name__} weights with FAVOR+ attention ({settings.nb_features} features)")
        try:
            model = source.stock_class.from_pretrained(src, attention=ATTENTION_NAME, performer_config=settings)
        except (OSError, SafetensorError, pickle.UnpicklingError, EOFError) as error:
            raise ConversionError(
                f"cannot read the weights of SRC {src!r} ({type(error).__name__}: {error}); the file may be truncated "
                "or corrupt: download or save it again"
            ) from None
        tokenizer = AutoTokenizer.from_pretrained(src) if source.has_tokenizer else None
        if tokenizer is None:
            step("SRC has no tokenizer files: OUT has no tokenizer either")
        sentence_transformers_files = _copy_sentence_transformers_files(src, source.local, staging)
        if sentence_transformers_files:
            step(f"Copied the sentence-transformers modules and settings ({', '.join(sentence_transformers_files)})")
        save_checkpoint(
            model,
            staging,
            tokenizer,
            step=step,
            name=push_to_hub or out.name,
            base_model=base_model or (None if source.local else src),
            source_name=Path(src).name,
            eval_results=results,
            sentence_transformers_files=sentence_transformers_files,
            **card_metadata,
        )
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty_folders(created)
        raise
    step(f"Wrote {out}")
    if push_to_hub:
        step(f"Uploading to the Hub as {push_to_hub}{' (private)' if private else ''}")
        step(f"Uploaded: {push(out, push_to_hub, private)}")
    return out
