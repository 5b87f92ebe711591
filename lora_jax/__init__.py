"""LoRA and friends for JAX and Equinox, as quax value types."""

import importlib.metadata

from . import _rules as _rules  # registers the shared dispatch rules
from ._base import AbstractAdapter as AbstractAdapter, is_adapter as is_adapter
from ._conv import LoraConvArray as LoraConvArray
from ._embedding import LoraEmbeddingArray as LoraEmbeddingArray
from ._filters import partition as partition, trainable_mask as trainable_mask
from ._lora import LoraArray as LoraArray
from ._loraify import (
    find_targets as find_targets,
    loraify as loraify,
    materialise as materialise,
    unloraify as unloraify,
)
from ._summary import (
    print_trainable_parameters as print_trainable_parameters,
    Summary as Summary,
    summary as summary,
)


__version__ = importlib.metadata.version("lora_jax")
