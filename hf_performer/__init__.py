"""hf-performer: Performer (FAVOR+) attention for Hugging Face Transformers.

``import hf_performer`` registers the ``"favor+"`` attention implementation, the ``performer_*``
model types and ``from_pretrained(..., attention="favor+")``::

    import hf_performer
    from transformers import AutoModel
    model = AutoModel.from_pretrained("bert-base-uncased", attention="favor+")
"""

from hf_performer.config import PerformerConfig, __version__
from hf_performer.favor.features import register_kernel
from hf_performer.integration.cache import FavorCache
from hf_performer.integration.loading import performer_config_from, to_performer
from hf_performer.integration.redraw import PerformerRedrawCallback, count_training_step
from hf_performer.integration.registration import register
from hf_performer.models.bert import PerformerBertConfig
from hf_performer.models.gpt2 import PerformerGPT2Config
from hf_performer.models.llama import PerformerLlamaConfig

register()

from hf_performer.export import convert  # noqa: E402  (uses the registered classes)

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
    "performer_config_from",
    "register",
    "register_kernel",
    "to_performer",
]
