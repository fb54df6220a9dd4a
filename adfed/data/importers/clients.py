"""Which raw users become which clients: dropping or grouping users with few rows.

Real logs are heavy-tailed: most users have one or two rows, too few to be a federated
client on their own. :func:`plan_clients` decides, from the row count of every raw user
(in raw-key order), the client each user's rows go to:

- users with at least ``min_rows`` rows are clients of their own;
- ``small="drop"`` removes the others;
- ``small="group"`` walks the small users in raw-key order and packs consecutive ones
  into *pseudo-clients*: a pseudo-client is closed as soon as it holds at least
  ``max(group_size, min_rows)`` rows, so it ends up with about that many (at most
  ``min_rows - 1`` more). A last, unfinished pseudo-client with fewer than ``min_rows``
  rows is merged into the previous pseudo-client when there is one.

Client ids are dense and ordered by each client's first member raw key, so the result
does not depend on anything but the counts.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

SmallClients = Literal["drop", "group"]


def _validate(min_rows: int, small: str, group_size: int) -> None:
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"min_rows must be an int >= 1; got {min_rows!r}")
    if small not in ("drop", "group"):
        raise ValueError(f"small_clients must be 'drop' or 'group'; got {small!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1; got {group_size!r}")


def plan_clients(
    counts: np.ndarray, *, min_rows: int, small: SmallClients, group_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Assign every raw user to a client (or to none).

    Parameters
    ----------
    counts : int [U_raw], rows of each raw user, in ascending raw-key order.
    min_rows : users with fewer rows are "small".
    small : ``"drop"`` or ``"group"`` (see the module docstring).
    group_size : target rows of a pseudo-client (``max(group_size, min_rows)`` is used).

    Returns
    -------
    client_of_user : int64 [U_raw], the client id of each raw user, -1 where dropped.
        Client ids are ``0 .. C-1`` in order of first appearance.
    grouped_from : int32 [C], how many raw users each client merges (1 for a user kept
        on its own).

    Raises
    ------
    ValueError
        For a bad ``min_rows``, ``small`` or ``group_size``.
    """
    _validate(min_rows, small, group_size)
    counts = np.asarray(counts, dtype=np.int64)
    is_small = counts < min_rows
    if small == "drop" or not is_small.any():
        client_of_user = np.full(len(counts), -1, dtype=np.int64)
        client_of_user[~is_small] = np.arange(int((~is_small).sum()), dtype=np.int64)
        return client_of_user, np.ones(int((~is_small).sum()), dtype=np.int32)
    # Pseudo-client label of every small user: a label closes once it reaches target.
    target = max(group_size, min_rows)
    small_idx = np.flatnonzero(is_small)
    label = np.empty(len(small_idx), dtype=np.int64)
    current, rows = 0, 0
    for k, c in enumerate(counts[small_idx].tolist()):
        label[k] = current
        rows += c
        if rows >= target:
            current, rows = current + 1, 0
    if 0 < rows < min_rows and current > 0:
        label[label == current] = current - 1  # fold a too-small tail into its predecessor
    # Number clients by first member: a big user or the first member of a label.
    first_of_label = np.zeros(len(small_idx), dtype=bool)
    first_of_label[np.unique(label, return_index=True)[1]] = True
    opens = ~is_small
    opens[small_idx[first_of_label]] = True
    client_at_open = np.cumsum(opens) - 1
    client_of_user = np.empty(len(counts), dtype=np.int64)
    client_of_user[~is_small] = client_at_open[~is_small]
    label_client = client_at_open[small_idx[first_of_label]]  # label -> client id
    client_of_user[small_idx] = label_client[label]
    grouped_from = np.bincount(client_of_user, minlength=int(opens.sum())).astype(np.int32)
    return client_of_user, grouped_from
