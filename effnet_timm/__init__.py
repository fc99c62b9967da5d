"""effnet_timm: the official TensorFlow EfficientNet (V1) models in timm's registry.

Importing this package registers `effnet_v1_b0` … `effnet_v1_b8`, `effnet_v1_l2`, `effnet_v1` and the other
official V1 families (`effnet_v1_lite0` … `lite4`, `effnet_v1_edgetpu_{s,m,l}`, `effnet_v1_condconv_b0_*`)
with timm, so `timm.create_model('effnet_v1_b0', ...)` works afterwards.

Layout (one concern per folder; dependencies run downwards only):
    models/    the network (architecture table, TF-exact layers, blocks, EffNetV1, memory-lean training, fusion)
    weights/   where weights come from (tag table, first-use cache, downloads, integrity records)
    effnet_v1  timm's registry entries, binding the network to its weights
    data/      images in (TF-exact eval preprocessing, ImageNet-val layouts)
    commands/  what the effnet-timm commands do, as library functions
"""

from .effnet_v1 import create_effnet_v1
from .errors import InputError, PretrainedWeightsError
from .models.config import (
    ALL_VARIANTS,
    FAMILY_VARIANTS,
    VARIANTS,
    BlockConfig,
    block_table,
    round_filters,
    round_repeats,
)
from .models.efficientnet import EffNetV1
from .models.fusion import fuse
from .weights.tags import HUB_ORG, TAGS

__all__ = [
    'ALL_VARIANTS',
    'FAMILY_VARIANTS',
    'HUB_ORG',
    'TAGS',
    'VARIANTS',
    'BlockConfig',
    'EffNetV1',
    'InputError',
    'PretrainedWeightsError',
    'block_table',
    'create_effnet_v1',
    'fuse',
    'round_filters',
    'round_repeats',
]
__version__ = '0.1.0'
