"""Models of finished runs: the full-size model a run saved, and one phone's model of it."""

from __future__ import annotations

from pathlib import Path

import torch

from adfed import config as config_mod
from adfed.config import Config
from adfed.data.schema import ParamGroup
from adfed.data.store import Dataset
from adfed.errors import ConfigError
from adfed.model.assembly import assemble_phone_model, model_from_config
from adfed.model.groups import get_dense
from adfed.model.pcvr import PCVRModel
from adfed.rundir import read_model_tensors


def load_run(run: Path, dataset: Dataset) -> tuple[Config, PCVRModel]:
    """The config and the trained model of run directory ``run`` (``adfed train
    --out``) over ``dataset``, in eval mode. A federated run's model holds every phone's
    ``local`` rows (one per user), a centralized run's its per-user rows.

    Raises
    ------
    ConfigError : ``run`` has no config.toml or model.safetensors, or its model does not
        fit ``dataset`` (another world, or another model shape).
    """
    path = run / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {run} a run directory (adfed train --out)?")
    cfg = config_mod.load(path)
    tensors = read_model_tensors(run)
    model = model_from_config(cfg, dataset)
    own = dict(model.named_parameters())
    if set(tensors) != set(own):
        raise ConfigError(f"{run}: its model has parameters {sorted(set(tensors) ^ set(own))} that a "
                          f"{cfg.model.variant} model over {dataset.path} does not (or the reverse); "
                          f"was it trained on another dataset?")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ConfigError(f"{run}: parameter {name} has shape {tuple(value.shape)}, a model over "
                              f"{dataset.path} {tuple(own[name].shape)}; was it trained on another dataset?")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)
    return cfg, model.eval()


def phone_model(cfg: Config, dataset: Dataset, full: PCVRModel, user_id: int) -> PCVRModel:
    """The model phone ``user_id`` scores with (``user_rows=1``): ``full``'s global
    ``dense_shared`` and ``sparse_shared`` tensors and that user's ``local`` rows
    (:func:`~adfed.model.assembly.assemble_phone_model`), in eval mode."""
    local = {name: t[user_id : user_id + 1] for name, t in get_dense(full, ParamGroup.LOCAL).items()}
    phone = model_from_config(cfg, dataset, user_rows=1)
    return assemble_phone_model(phone, get_dense(full, ParamGroup.DENSE_SHARED),
                                get_dense(full, ParamGroup.SPARSE_SHARED), local or None).eval()
