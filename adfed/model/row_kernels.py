"""Compiled row kernels: table gradients by id, lazy Adam, multi-hot count matrices,
bag-to-id match counts.

A training step of the default model (batch 1024, 2 threads) spent about a third of its
time where torch offers only many small operations for a few thousand rows, each a few
microseconds of dispatch: the sparse gradient of a bag table (sort the ids, find the
runs, sum each run), a small dense table's gradient (``index_add_``, which this torch
build runs as a ``scatter_add_`` over an index expanded to every element), the lazy Adam
step (gather each parameter's rows and moments, six element-wise operations, scatter
them back) and the count matrix of :func:`~adfed.model.pooling.multi_hot_mean`; later,
:class:`~adfed.model.layers.VocabMatch`'s counts. The loops in ``_rows.c`` do each in
one pass.

They are *bitwise* the torch code they replace (:func:`adfed.model.pooling.sum_rows_by_id`,
:func:`~adfed.model.pooling.multi_hot_mean` and :class:`adfed.model.sparse_adam.RowSparseAdam`'s
torch path): the same float32 operations in the same order, compiled without
floating-point contraction, with ``fmaf`` where torch's CPU ``lerp`` fuses (and, for the
one operation torch does not round correctly, float32 ``sqrt``, the torch path rounds
the float64 root instead); ``tests/unit/model/test_row_kernels.py`` compares both ways on
random inputs and whole training steps. So results do not depend on whether the kernels
are used, which keeps runs reproducible on any machine.

The source is compiled on first use with the system C compiler (``$CC``, else ``cc``)
into a cache folder (``$ADFED_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/adfed`` or
``~/.cache/adfed``), once per source version (about a second). Where no compiler works,
one warning is logged and :func:`available` is False; with ``ADFED_ROW_KERNELS=0`` it is
False without one. The callers then keep their torch path (same results, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_rows.c")
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]
_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def _cache_dir() -> Path:
    if os.environ.get("ADFED_KERNEL_CACHE"):
        return Path(os.environ["ADFED_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adfed"


def _compile(compiler: str, target: Path) -> None:
    """Build the library at ``target``, atomically (concurrent processes may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("ADFED_ROW_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or "cc"
    try:
        if shutil.which(compiler) is None:
            raise OSError(f"no C compiler {compiler!r} on PATH")
        digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"rows-{digest}.so"
        if not target.exists():
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        logger.warning("compiled row kernels unavailable (%s); using torch's operations (same results, slower)",
                       str(detail).strip().splitlines()[-1] if str(detail).strip() else type(exc).__name__)
        return None
    lib.adfed_sum_rows.restype = _I64
    lib.adfed_sum_rows.argtypes = [_I64, _PTR, _PTR, _PTR, _I64, _I64]
    lib.adfed_take_rows.restype = None
    lib.adfed_take_rows.argtypes = [_PTR, _PTR]
    lib.adfed_sparse_adam.restype = ctypes.c_int
    lib.adfed_sparse_adam.argtypes = [_I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR,
                                      _F32, _F32, _F32, _F32, ctypes.c_int]
    lib.adfed_index_add.restype = _I64
    lib.adfed_index_add.argtypes = [_I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR]
    lib.adfed_bag_counts.restype = _I64
    lib.adfed_bag_counts.argtypes = [_I64, _I64, _PTR, _PTR, _I64, _PTR]
    lib.adfed_bag_matches.restype = _I64
    lib.adfed_bag_matches.argtypes = [_I64, _I64, _PTR, _PTR, _PTR, _PTR]
    return lib


def available() -> bool:
    """True when the compiled kernels are loaded (compiling them on first call)."""
    return _library() is not None


def _fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()


def _raise_out_of_range(ids: torch.Tensor, num_rows: int) -> None:
    low, high = torch.aminmax(ids)
    raise IndexError(f"row ids must lie in [0, {num_rows}); got [{int(low)}, {int(high)}]")


def _fits_reads(ids: torch.Tensor, source: torch.Tensor | None, src: torch.Tensor) -> bool:
    """The arguments of :func:`sum_rows` / :func:`index_add` fit the C loops.

    Raises
    ------
    ValueError, IndexError : the C loops would read outside ``src`` (the torch path
        raises on the same input): ``ids`` not 1-d, ``source`` not shaped like ``ids`` or
        naming a row outside ``src``, or, without ``source``, fewer rows of ``src`` than ids.
    """
    if not (src.dim() == 2 and _fits(ids, torch.int64) and _fits(src, torch.float32)
            and (source is None or _fits(source, torch.int64))):
        return False
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-d; got shape {tuple(ids.shape)}")
    n, m = ids.shape[0], src.shape[0]
    if source is None:
        if m < n:
            raise ValueError(f"src has {m} rows for {n} ids")
    elif source.shape != ids.shape:
        raise ValueError(f"source must be shaped like ids {tuple(ids.shape)}; got {tuple(source.shape)}")
    elif n:
        low, high = torch.aminmax(source)
        if int(low) < 0 or int(high) >= m:
            raise IndexError(f"source rows must lie in [0, {m}); got [{int(low)}, {int(high)}]")
    return True


def sum_rows(
    ids: torch.Tensor, source: torch.Tensor | None, src: torch.Tensor, num_rows: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row sums of ``src`` by id, as :func:`~adfed.model.pooling.sum_rows_by_id` (sparse).

    Parameters
    ----------
    ids : int64 [n], each in ``[0, num_rows)``.
    source : int64 [n], the row of ``src`` that position j adds; None: row j.
    src : float32 [m, w], contiguous.

    Returns
    -------
    (present int64 [k] increasing, sums float32 [k, w]): each present id's rows summed
    from zero in position order. None when the kernels are unavailable or the tensors
    are not contiguous CPU int64 / float32 (the caller then uses torch).

    Raises
    ------
    IndexError : an id outside ``[0, num_rows)``.
    """
    lib = _library()
    if lib is None or not _fits_reads(ids, source, src):
        return None
    k = lib.adfed_sum_rows(ids.shape[0], ids.data_ptr(), None if source is None else source.data_ptr(),
                           src.data_ptr(), src.shape[1], num_rows)
    if k == -2:
        _raise_out_of_range(ids, num_rows)
    if k < 0:
        raise MemoryError("adfed_sum_rows: out of memory")
    out_ids = torch.empty(k, dtype=torch.int64)
    out_rows = torch.empty((k, src.shape[1]), dtype=torch.float32)
    lib.adfed_take_rows(out_ids.data_ptr(), out_rows.data_ptr())
    return out_ids, out_rows


def index_add(ids: torch.Tensor, source: torch.Tensor | None, src: torch.Tensor, num_rows: int) -> torch.Tensor | None:
    """A dense table's gradient, as :func:`~adfed.model.pooling.sum_rows_by_id` (dense).

    Parameters
    ----------
    ids : int64 [n], the row each position adds to.
    source : int64 [n], the row of ``src`` that position j adds; None: row j.
    src : float32 [m, w], contiguous.

    Returns
    -------
    float32 [num_rows, w]: row v sums ``src[source[j]]`` over the positions j with
    ``ids[j] == v``, from zero in position order (``index_add_``'s order on a CPU). None
    when the kernels are unavailable or the tensors do not fit.

    Raises
    ------
    IndexError : an id outside ``[0, num_rows)``.
    """
    lib = _library()
    if lib is None or not _fits_reads(ids, source, src):
        return None
    out = torch.empty((num_rows, src.shape[1]), dtype=torch.float32)
    bad = lib.adfed_index_add(ids.shape[0], ids.data_ptr(), None if source is None else source.data_ptr(),
                              src.data_ptr(), src.shape[1], num_rows, out.data_ptr())
    if bad >= 0:
        raise IndexError(f"index {int(ids[bad])} is out of bounds for a table of {num_rows} rows")
    return out


def sparse_adam(
    rows: torch.Tensor,
    values: torch.Tensor,
    param: torch.Tensor,
    moments: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    maximize: bool,
) -> bool:
    """One lazy Adam step on the rows a sparse gradient names, in place.

    Parameters
    ----------
    rows : int64 [n], each stored entry's row (repeats allowed, any order).
    values : float32 [n, r], the entries (summed per row in stored order first).
    param : float32 [R, r], the parameter viewed as rows.
    moments : float32 [2, R, r], ``exp_avg`` then ``exp_avg_sq``.
    beta1, beta2, eps, step_size : as in RowSparseAdam's torch path (which see).

    Returns
    -------
    True when done; False when the kernels are unavailable or a tensor does not fit
    (then nothing was changed and the caller uses torch).

    Raises
    ------
    IndexError : a row outside ``[0, R)`` (nothing is changed).
    """
    lib = _library()
    if (lib is None or not _fits(rows, torch.int64) or not _fits(values, torch.float32)
            or not _fits(param, torch.float32) or not _fits(moments, torch.float32)):
        return False
    if rows.dim() != 1 or values.dim() != 2 or param.dim() != 2 or rows.shape[0] != values.shape[0] \
            or values.shape[1] != param.shape[1] or moments.shape != (2, *param.shape):
        raise ValueError(f"sparse_adam needs rows [n], values [n, r], param [R, r], moments [2, R, r]; got "
                         f"{tuple(rows.shape)}, {tuple(values.shape)}, {tuple(param.shape)}, {tuple(moments.shape)}")
    n, width = values.shape[0], param.shape[1]
    exp_avg, exp_avg_sq = moments[0], moments[1]
    status = lib.adfed_sparse_adam(n, rows.data_ptr(), values.data_ptr(), width, param.shape[0], param.data_ptr(),
                                   exp_avg.data_ptr(), exp_avg_sq.data_ptr(), 1 - beta1, 1 - beta2, eps,
                                   -step_size, int(maximize))
    if status == -2:
        _raise_out_of_range(rows, param.shape[0])
    if status:
        raise MemoryError("adfed_sparse_adam: out of memory")
    return True


def bag_counts(values: torch.Tensor, lengths: torch.Tensor, num_rows: int) -> torch.Tensor | None:
    """The row-normalised count matrix of :func:`~adfed.model.pooling.multi_hot_mean`.

    Parameters
    ----------
    values : int64 [nnz], the ids of all bags back to back.
    lengths : int64 [B], each bag's length (summing to nnz).
    num_rows : V.

    Returns
    -------
    float32 [B, V]: row b counts each id of bag b, divided by max(length, 1). None when
    the kernels are unavailable or the tensors do not fit (the caller then uses torch).

    Raises
    ------
    IndexError : an id outside ``[0, V)``.
    ValueError : lengths that are negative or do not add up to nnz.
    """
    lib = _library()
    if lib is None or not _fits(values, torch.int64) or not _fits(lengths, torch.int64):
        return None
    out = torch.empty((lengths.shape[0], num_rows), dtype=torch.float32)
    status = lib.adfed_bag_counts(lengths.shape[0], values.shape[0], values.data_ptr(), lengths.data_ptr(),
                                  num_rows, out.data_ptr())
    if status == -2:
        raise ValueError(f"bag lengths must be >= 0 and add up to the {values.shape[0]} ids")
    if status >= 0:
        low, high = torch.aminmax(values)
        raise IndexError(f"embedding ids must lie in [0, {num_rows}); got [{int(low)}, {int(high)}]")
    return out


def bag_matches(values: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
    """:class:`~adfed.model.layers.VocabMatch`'s counts: how many ids of bag b equal ``ids[b]``.

    Parameters
    ----------
    values : int64 [nnz], the ids of all bags back to back.
    lengths : int64 [B], each bag's length (summing to nnz).
    ids : int64 [B], the id each bag is compared with.

    Returns
    -------
    float32 [B] (exact integers). None when the kernels are unavailable or the tensors do
    not fit (the caller then uses torch).

    Raises
    ------
    ValueError : lengths that are negative or do not add up to nnz.
    """
    lib = _library()
    if lib is None or not all(_fits(t, torch.int64) for t in (values, lengths, ids)):
        return None
    if ids.shape != lengths.shape:
        raise ValueError(f"bag_matches needs one id per bag; got {ids.shape[0]} ids for {lengths.shape[0]} bags")
    out = torch.empty(lengths.shape[0], dtype=torch.float32)
    status = lib.adfed_bag_matches(lengths.shape[0], values.shape[0], values.data_ptr(), lengths.data_ptr(),
                                   ids.data_ptr(), out.data_ptr())
    if status == -2:
        raise ValueError(f"bag lengths must be >= 0 and add up to the {values.shape[0]} ids")
    return out
