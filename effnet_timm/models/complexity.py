"""Parameter and multiply-accumulate counts of a registered model, without allocating its weights."""

from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params_and_macs']


def count_params_and_macs(model_name: str, image_size: int) -> tuple[int, int]:
    """``(parameters, MACs)`` of ``model_name`` for one ``image_size`` x ``image_size`` RGB image.

    The model is built and run on the ``meta`` device, so even L2 (480 M parameters) costs no memory
    and only shape arithmetic. MACs are torch's FLOP count halved: it counts convolutions and matrix
    products (the classifier) at 2 FLOPs per multiply-accumulate and ignores element-wise ops, which
    is the convention of timm's and torchvision's published GMACs/GFLOPS.
    """
    with torch.device('meta'):
        model = timm.create_model(model_name, pretrained=False).eval()
        image = torch.empty(1, 3, image_size, image_size)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return params, counter.get_total_flops() // 2
