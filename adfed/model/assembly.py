"""Building models from config and assembling them from the federated state.

Two assemblies, one rule (``local`` rows come from the phone, everything else from
the server):

- :func:`model_from_config`: a fresh model of the config's shape over a dataset's schema
  (``user_rows=1`` for a phone's model, which holds one user row: its own).
- :func:`assemble_phone_model` / :func:`assemble_global_inplace`: write the global
  ``dense_shared`` and ``sparse_shared`` tensors and the ``local`` rows kept on phones
  into a model, for one phone (the model a phone scores with, e.g. to re-rank) or for
  every phone at once (the evaluation model of a federated run).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adfed.config import Config
from adfed.data.schema import ParamGroup, Schema
from adfed.data.store import Dataset
from adfed.model.groups import group_names, parameters, set_dense_inplace
from adfed.model.layers import untouched_zeros
from adfed.model.pcvr import PCVRModel, build_model

Tensors = Mapping[str, torch.Tensor]


def model_from_config(cfg: Config, source: Dataset | Schema, *, user_rows: int | None = None,
                      local_zeros: bool = False) -> PCVRModel:
    """The model ``cfg.model`` describes over a dataset's schema (or ``source`` itself when
    it is a :class:`Schema`), its initial weights from ``cfg.seed`` (``local_zeros``: see
    :func:`~adfed.model.pcvr.build_model`)."""
    return build_model(
        source.schema if isinstance(source, Dataset) else source,
        variant=cfg.model.variant,
        embedding_dim=cfg.model.embedding_dim,
        tower=cfg.model.tower,
        user_rows=user_rows,
        seed=cfg.seed,
        bag_pooling=cfg.model.bag_pooling,
        share_vocab=cfg.model.share_vocab_tables,
        vocab_match=cfg.model.vocab_match,
        local_zeros=local_zeros,
    )


def _local_names(model: PCVRModel, local: Tensors | None) -> list[str]:
    names = group_names(model, ParamGroup.LOCAL)
    if local is not None:
        missing = [n for n in names if n not in local]
        if missing:
            raise ValueError(f"the phone's local state lacks {', '.join(missing)}; "
                             f"it must hold every local parameter of the model")
    return names


def assemble_phone_model(model: PCVRModel, dense: Tensors, tables: Tensors,
                         local: Tensors | None) -> PCVRModel:
    """Write one phone's view of the federated model into ``model`` (built with
    ``user_rows=1``) and return it: the global ``dense_shared`` tensors, the global
    ``sparse_shared`` tables, and the phone's own ``local`` group (``None``: the phone has
    none yet, its local group starts at zero, as in training).

    Raises ValueError when ``local`` lacks a local parameter or has another shape.
    """
    set_dense_inplace(model, dense)
    set_dense_inplace(model, tables)
    params = parameters(model)
    with torch.no_grad():
        for name in _local_names(model, local):
            if local is None:
                params[name].zero_()
                continue
            if tuple(local[name].shape) != tuple(params[name].shape):
                raise ValueError(f"the phone's local {name} has shape {tuple(local[name].shape)}; "
                                 f"the model's is {tuple(params[name].shape)}")
            params[name].copy_(local[name])
    return model


def assemble_global_inplace(model: PCVRModel, dense: Tensors, tables: Tensors,
                            local: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the global tensors and every phone's ``local`` rows into a full-size model
    (one user row per user id). ``local`` maps a ``local`` parameter to (user ids, their
    rows stacked; :meth:`adfed.fl.population.LocalStore.packed`); users not in it get zero rows."""
    set_dense_inplace(model, dense)
    set_dense_inplace(model, tables)
    params = parameters(model)
    with torch.no_grad():
        for name in group_names(model, ParamGroup.LOCAL):
            # fresh zeros rather than zero_(): a full-size user table's untouched pages stay unresident
            params[name].data = untouched_zeros(tuple(params[name].shape))
            if name in local:
                users, rows = local[name]
                params[name][users] = rows.reshape(len(users), *params[name].shape[1:])
