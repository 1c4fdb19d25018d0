"""hf-performer: Performer (FAVOR+) attention for Hugging Face Transformers.

``import hf_performer`` applies :func:`patch`: it registers the ``"favor+"`` attention implementation,
the ``performer_*`` model types and ``from_pretrained(..., attention="favor+")`` (the full list of
what changes in transformers: :mod:`hf_performer.patching`); :func:`unpatch` undoes it::

    import hf_performer
    from transformers import AutoModel
    model = AutoModel.from_pretrained("bert-base-uncased", attention="favor+")
    stock = hf_performer.to_stock(model)  # the same weights with softmax attention
"""

from hf_performer.config import PerformerConfig, __version__
from hf_performer.favor.features import register_kernel
from hf_performer.integration.cache import FavorCache
from hf_performer.integration.redraw import PerformerRedrawCallback, count_training_step
from hf_performer.model_conversion import performer_config_from, to_performer, to_stock
from hf_performer.models.bert import PerformerBertConfig
from hf_performer.models.gpt2 import PerformerGPT2Config
from hf_performer.models.llama import PerformerLlamaConfig
from hf_performer.patching import patch, unpatch

patch()

from hf_performer.export import convert  # noqa: E402  (loads through the patched from_pretrained)

__all__ = [
    "FavorCache",
    "PerformerBertConfig",
    "PerformerConfig",
    "PerformerGPT2Config",
    "PerformerLlamaConfig",
    "PerformerRedrawCallback",
    "__version__",
    "convert",
    "count_training_step",
    "patch",
    "performer_config_from",
    "register_kernel",
    "to_performer",
    "to_stock",
    "unpatch",
]
