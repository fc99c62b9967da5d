"""effnet_timm: the official TensorFlow EfficientNet (V1) models in timm's registry.

Importing this package registers `effnet_v1_b0` … `effnet_v1_b8`, `effnet_v1_l2` and `effnet_v1`
with timm, so `timm.create_model('effnet_v1_b0', ...)` works afterwards.
"""
from .config import VARIANTS, BlockConfig, block_table, round_filters, round_repeats
from .effnet_v1 import create_effnet_v1
from .errors import InputError, PretrainedWeightsError
from .fusion import fuse
from .model import EffNetV1
from .pretrained import HUB_ORG, TAGS

__version__ = '0.1.0'
