"""Batched inference: pCTR and pCVR for a whole :class:`Examples` set."""

from __future__ import annotations

import logging

import numpy as np
import torch

from adfed.data.examples import Examples
from adfed.model.pcvr import PCVRModel

logger = logging.getLogger(__name__)


def predict(model: PCVRModel, examples: Examples, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Score every example, in order, without gradients and in eval mode.

    The model's train/eval mode is restored afterwards. A phone's model
    (``user_rows=1``) needs its examples' ``user_id`` mapped to 0 first.

    Returns
    -------
    pctr, pcvr : float32 [n] each.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size}")
    n = len(examples)
    pctr = np.empty(n, dtype=np.float32)
    pcvr = np.empty(n, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                out = model(examples.take(np.arange(start, stop)).to_batch())
                pctr[start:stop] = out.pctr.numpy()
                pcvr[start:stop] = out.pcvr.numpy()
    finally:
        model.train(was_training)
    return pctr, pcvr
