"""The table of supported architectures: stock ``model_type`` → :class:`Family`.

Each family file ends with its entry: the stock and Performer config classes and, one row per model
class, the Auto class that loads it, the stock class and the Performer class.
"""

from __future__ import annotations

from hf_performer.models import bert, gpt2, llama
from hf_performer.models.base import Family

FAMILIES: dict[str, Family] = {family.stock_model_type: family for family in (bert.FAMILY, gpt2.FAMILY, llama.FAMILY)}


def family_for(model_type: str) -> Family:
    """The family of a stock or Performer ``model_type``; a clear error for anything else."""
    for family in FAMILIES.values():
        if model_type in (family.stock_model_type, family.model_type):
            return family
    raise ValueError(
        f"FAVOR+ does not support model_type {model_type!r} yet; supported: {sorted(FAMILIES)} "
        f"(and their Performer types {sorted(f.model_type for f in FAMILIES.values())})."
    )
