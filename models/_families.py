"""Imports every zoo family so that each registers its networks."""

from asgssd_zoo import (  # noqa: F401
    darts,
    densenet,
    llm,
    mobilenet_v2,
    ofa,
    regnet,
    resnet,
    stacked_unets,
    super_resnet,
    vit,
)
