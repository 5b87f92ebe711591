"""LoRA and friends for JAX and Equinox, as quax value types."""

import importlib.metadata

from . import _rules as _rules  # registers the shared dispatch rules
from ._base import AbstractAdapter as AbstractAdapter, is_adapter as is_adapter
from ._conv import LoraConvArray as LoraConvArray
from ._dora import DoraArray as DoraArray
from ._dora_conv import DoraConvArray as DoraConvArray
from ._dropout import with_dropout_keys as with_dropout_keys
from ._embedding import LoraEmbeddingArray as LoraEmbeddingArray
from ._filters import partition as partition, trainable_mask as trainable_mask
from ._io import load_adapter as load_adapter, save_adapter as save_adapter
from ._loha import LohaArray as LohaArray
from ._loha_conv import LohaConvArray as LohaConvArray
from ._lokr import LokrArray as LokrArray
from ._lokr_conv import LokrConvArray as LokrConvArray
from ._lora import LoraArray as LoraArray
from ._loraify import (
    find_targets as find_targets,
    loraify as loraify,
    materialise as materialise,
    unloraify as unloraify,
)
from ._multi import (
    MultiLoraArray as MultiLoraArray,
    adapter_names as adapter_names,
    add_adapter as add_adapter,
    combine_adapters as combine_adapters,
    delete_adapter as delete_adapter,
    set_adapter as set_adapter,
    stack_adapters as stack_adapters,
)
from ._peft import load_peft as load_peft, save_peft as save_peft
from ._quant import (
    Int8Array as Int8Array,
    NF4Array as NF4Array,
    quantise as quantise,
)
from ._remat import remat_policy as remat_policy
from ._sharding import (
    fsdp as fsdp,
    partition_specs as partition_specs,
    shard_model as shard_model,
    tensor_parallel as tensor_parallel,
    trainable_partition_specs as trainable_partition_specs,
)
from ._summary import (
    Summary as Summary,
    print_trainable_parameters as print_trainable_parameters,
    summary as summary,
)


try:
    __version__ = importlib.metadata.version("lora_jax")
except importlib.metadata.PackageNotFoundError:  # a source checkout, not installed
    __version__ = "0+unknown"
