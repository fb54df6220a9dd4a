"""The client update pipeline: ordered transforms between local training and upload.

A phone trains, then passes its :class:`~adfed.fl.types.Update` through the transforms of
``fl.update_pipeline`` in order (clipping, quantization, sparsification, noise shares and
masking are the transforms to come; ``identity`` is the only one now). Each transform is
a pure function of the update, its settings, an RNG derived from (seed, round, client)
and optional per-phone state that lives in the phone's local store beside its ``local``
group (for example error-feedback residuals), under keys ``pipeline/<transform>/<key>``.
The server undoes what can be undone (:meth:`Pipeline.invert`, in reverse order) after
decoding an upload and before aggregating it; the payload's codec names the pipeline so
that the server refuses an upload made by another one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import torch

from adfed.config import Config
from adfed.errors import ConfigError
from adfed.fl.types import ClientSettings, Update
from adfed.fl.wirespec import register_codec

State = dict[str, torch.Tensor]
STATE_PREFIX = "pipeline/"


class UpdateTransform(Protocol):
    """One step of the pipeline.

    ``forward(update, rng, state) -> (update, state)`` runs on the phone; ``state`` is
    this transform's per-phone state from the previous round (None: none yet) and the
    returned state is kept on the phone (None: nothing to keep). ``inverse(update)`` runs
    on the server after decoding (the identity where a transform has no inverse, e.g.
    clipping).
    """

    @property
    def name(self) -> str: ...

    def forward(self, update: Update, rng: np.random.Generator, state: State | None,
                settings: ClientSettings) -> tuple[Update, State | None]: ...

    def inverse(self, update: Update) -> Update: ...


@dataclasses.dataclass(frozen=True)
class Identity:
    """Sends the update as trained."""

    name: str = "identity"

    def forward(self, update: Update, rng: np.random.Generator, state: State | None,
                settings: ClientSettings) -> tuple[Update, State | None]:
        return update, state

    def inverse(self, update: Update) -> Update:
        return update


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The transforms of ``fl.update_pipeline``, in order."""

    transforms: tuple[UpdateTransform, ...]

    @property
    def codec(self) -> str:
        """The payload's codec: the transform names joined by ``+``."""
        return "+".join(t.name for t in self.transforms)

    @property
    def plain(self) -> bool:
        """True when every transform is :class:`Identity`: :meth:`apply` would return the
        update as it is (so the caller need not derive an RNG for it)."""
        return all(isinstance(t, Identity) for t in self.transforms)

    def apply(self, update: Update, rng: np.random.Generator, phone: Mapping[str, torch.Tensor] | None,
              settings: ClientSettings) -> tuple[Update, State]:
        """Run every transform on the phone with the round's ``settings`` (e.g. the clip
        norm); returns the update to encode and the pipeline's new per-phone state
        (``pipeline/<name>/<key>`` entries only)."""
        kept: State = {}
        for t in self.transforms:
            prefix = f"{STATE_PREFIX}{t.name}/"
            mine = {k[len(prefix):]: v for k, v in (phone or {}).items() if k.startswith(prefix)}
            update, new = t.forward(update, rng, mine or None, settings)
            if new:
                kept.update({prefix + k: v for k, v in new.items()})
        return update, kept

    def invert(self, update: Update) -> Update:
        """The server side: every transform's inverse, last first."""
        for t in reversed(self.transforms):
            update = t.inverse(update)
        return update


#: ``factory(cfg) -> UpdateTransform``
Factory = Callable[[Config], UpdateTransform]
_REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: Factory, *, force: bool = False) -> None:
    """Register an update transform factory under ``name`` (``fl.update_pipeline``)."""
    if name in _REGISTRY and not force:
        raise ValueError(f"update transform {name!r} is already registered (pass force=True to replace)")
    register_codec(name)
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def transform_names(cfg: Config) -> list[str]:
    """The transforms a phone runs: with ``privacy.dp``, ``clip`` first (the update's norm is
    bounded before anything else touches it) and, for distributed noise, ``skellam`` last
    (quantize and add this phone's noise share); ``fl.update_pipeline`` in between."""
    names = list(cfg.fl.update_pipeline)
    if cfg.privacy.dp:
        names = ["clip", *[n for n in names if n != "clip"]]
        if cfg.privacy.noise == "distributed":
            names = [*[n for n in names if n != "skellam"], "skellam"]
    return names


def build(cfg: Config) -> Pipeline:
    """The pipeline of :func:`transform_names`; an unknown name is a ConfigError (the
    privacy transforms are registered by :mod:`adfed.privacy`)."""
    out = []
    for name in transform_names(cfg):
        if name not in _REGISTRY:
            raise ConfigError(f"fl.update_pipeline lists {name!r}; known transforms: {names()}")
        out.append(_REGISTRY[name](cfg))
    if len({t.name for t in out}) != len(out):
        raise ConfigError(f"fl.update_pipeline lists a transform twice: {transform_names(cfg)}")
    return Pipeline(tuple(out))


register("identity", lambda cfg: Identity())
