"""Orders: the cloud's, the phone's re-ranking of what the cloud sends, and the oracle's.

1. The cloud scores every candidate with its ``cloud_only`` model (no private field)
   and ranks by eCPM = bid x pCTR x pCVR; it sends its top ``top_n``.
2. The phone re-scores what it received with its own model (the global model, its
   ``local`` rows, its private fields) and orders by its objective's value:
   ``"conversions"``: pCTCVR; ``"revenue"``: bid x pCTCVR. ``blend`` mixes in the cloud's
   estimate of the same value geometrically: score = device^blend x cloud^(1 - blend)
   (1: the device alone; 0: the cloud's own estimate of the objective).
3. The oracle orders the same sent candidates by the true value of the objective.

:func:`rerank_one` is the phone's step for one live request (what serving calls).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from adfed.rerank.metrics import order_by

Objective = Literal["conversions", "revenue"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RerankSettings:
    """How the cloud and the phone rank (see the module docstring).

    top_n : candidates the cloud sends (0: all of a request's candidates).
    objective : what the phone's order maximises.
    blend : weight of the device's score against the cloud's, in [0, 1].
    k : the cut-off of the headline figures (``*_at_5``).
    ks : the cut-offs of the table and the plot.
    bootstrap : resamples of requests for each interval.
    seed : seed of the bootstrap's generator.
    """

    top_n: int = 0
    objective: Objective = "conversions"
    blend: float = 1.0
    k: int = 5
    ks: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.top_n < 0:
            raise ValueError(f"--top-n must be an int >= 0 (0 = every candidate); got {self.top_n}")
        if self.objective not in ("conversions", "revenue"):
            raise ValueError(f"--objective must be 'conversions' or 'revenue'; got {self.objective!r}")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"--blend must be in [0, 1]; got {self.blend}")
        if self.k < 1 or any(k < 1 for k in self.ks):
            raise ValueError(f"--k and every cut-off must be ints >= 1; got {self.k} and {list(self.ks)}")
        if self.bootstrap < 1:
            raise ValueError(f"--bootstrap must be an int >= 1; got {self.bootstrap}")
        if self.seed < 0:  # numpy's generators take no negative seed
            raise ValueError(f"--seed must be an int >= 0; got {self.seed}")


def ecpm(bid: np.ndarray, pctr: np.ndarray, pcvr: np.ndarray) -> np.ndarray:
    """bid x pCTR x pCVR (the cloud's ranking score), float64, any shape."""
    return np.asarray(bid, dtype=np.float64) * pctr * pcvr


def objective_value(objective: Objective, bid: np.ndarray, pctcvr: np.ndarray) -> np.ndarray:
    """The worth of showing each candidate under ``objective`` (float64, any shape)."""
    value = np.asarray(pctcvr, dtype=np.float64)
    return value * bid if objective == "revenue" else value


def cloud_sends(bid: np.ndarray, cloud_pctr: np.ndarray, cloud_pcvr: np.ndarray, top_n: int) -> np.ndarray:
    """The candidates the cloud sends, in its eCPM order: int64 [R, M] column indices
    into the request's candidates, M = ``top_n`` (or N when 0 or larger)."""
    order = order_by(ecpm(bid, cloud_pctr, cloud_pcvr))
    return order if top_n == 0 else order[:, :top_n]


def device_scores(settings: RerankSettings, bid: np.ndarray, device_pctcvr: np.ndarray,
                  cloud_pctcvr: np.ndarray) -> np.ndarray:
    """The phone's score of each candidate (float64, the inputs' shape): the objective's
    value from the device model, blended with the cloud's (see the module docstring)."""
    device = objective_value(settings.objective, bid, device_pctcvr)
    if settings.blend == 1.0:
        return device
    cloud = objective_value(settings.objective, bid, cloud_pctcvr)
    tiny = np.finfo(np.float64).tiny
    return np.exp(settings.blend * np.log(np.maximum(device, tiny))
                  + (1.0 - settings.blend) * np.log(np.maximum(cloud, tiny)))


def rerank_one(settings: RerankSettings, bid: np.ndarray, device_pctcvr: np.ndarray,
               cloud_pctcvr: np.ndarray | None = None) -> np.ndarray:
    """The phone's order of one request's received candidates: int64 [M] positions into
    them, best first. ``cloud_pctcvr`` (the cloud's estimates, when it sends them) is
    needed only for ``blend < 1``.

    Raises
    ------
    ValueError : arrays of different lengths, or ``blend < 1`` without cloud scores.
    """
    bid, device = np.asarray(bid), np.asarray(device_pctcvr)
    if bid.shape != device.shape or bid.ndim != 1:
        raise ValueError(f"bid and device scores must be [M] arrays of one length; got {bid.shape} and {device.shape}")
    if cloud_pctcvr is None:
        if settings.blend < 1.0:
            raise ValueError(f"blend {settings.blend} < 1 needs the cloud's scores of the candidates")
        cloud_pctcvr = device
    scores = device_scores(settings, bid[None, :], device[None, :], np.asarray(cloud_pctcvr)[None, :])
    return order_by(scores)[0]
