"""Zero-copy numpy -> Arrow conversion.

``pa.array(ndarray)`` imports pandas on its first call (to check for pandas objects),
which costs each worker process most of a second; building arrays from their buffers
does not, and copies nothing.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_NUMPY = {pa.int8(): np.int8, pa.int32(): np.int32, pa.int64(): np.int64,
          pa.float32(): np.float32, pa.float64(): np.float64}


def column(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A 1-D numpy array as an Arrow array of ``dtype`` (no nulls)."""
    values = np.asarray(values)
    if dtype == pa.bool_():
        bits = np.packbits(values.astype(bool, copy=False), bitorder="little")
        return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(bits)])
    arr = np.ascontiguousarray(values, dtype=_NUMPY[dtype])
    return pa.Array.from_buffers(dtype, len(arr), [None, pa.py_buffer(arr)])


def list_column(offsets: np.ndarray, values: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    """A ragged array (int offsets [n + 1], values [nnz]) as ``list<dtype>``."""
    return pa.ListArray.from_arrays(column(offsets, pa.int32()), column(values, dtype))


def table(columns: dict[str, pa.Array]) -> pa.Table:
    """A table from named Arrow arrays, in the given order."""
    return pa.Table.from_arrays(list(columns.values()), names=list(columns))
