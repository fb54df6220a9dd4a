"""What a training run returns, whatever its mode (:class:`TrainResult`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from adfed.model.pcvr import PCVRModel


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    ``rows`` are per epoch (centralized, ``rows_name="epochs.csv"``) or per round
    (federated, ``rows_name="rounds.csv"``).
    """

    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    rows_name: str
    model: PCVRModel
    #: centralized: one row per training step (``steps.csv``; see ``trainer.fit_centralized``)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
