"""Segmentation models, built by name from a registry.

>>> from omniseg.models import build_model
>>> model = build_model("omniseg", num_tissues=6, width=16)
"""

import omniseg.models.deeplab  # noqa: F401 - registers "deeplabv3"
import omniseg.models.multiclass  # noqa: F401 - registers "multiclass"
import omniseg.models.multihead  # noqa: F401 - registers "multihead"
import omniseg.models.unet  # noqa: F401 - registers "unet"
from omniseg.models.omniseg import OmniSeg
from omniseg.models.registry import (
    SegmentationModel,
    available_models,
    build_model,
    count_parameters,
    register_model,
)

__all__ = [
    "OmniSeg",
    "SegmentationModel",
    "available_models",
    "build_model",
    "count_parameters",
    "register_model",
]
