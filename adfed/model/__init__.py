"""The pCVR model and its parameter decomposition (see DESIGN.md, "The model")."""

from adfed.model.groups import (
    get_dense,
    get_rows,
    group_bytes,
    group_names,
    make_optimizers,
    model_bytes,
    partition,
    set_dense_inplace,
    set_rows_inplace,
    sparse_tables,
    touched_rows,
    touched_rows_many,
)
from adfed.model.pcvr import Output, PCVRModel, build_model, ensure_finite, esmm_loss, remap_user
from adfed.model.predict import predict

__all__ = [
    "Output",
    "PCVRModel",
    "build_model",
    "ensure_finite",
    "esmm_loss",
    "get_dense",
    "get_rows",
    "group_bytes",
    "group_names",
    "make_optimizers",
    "model_bytes",
    "partition",
    "predict",
    "remap_user",
    "set_dense_inplace",
    "set_rows_inplace",
    "sparse_tables",
    "touched_rows",
    "touched_rows_many",
]
