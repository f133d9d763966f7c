"""Per-client behaviour over a sliding window of each client's most recent requests.

For every request, the window is that client's last ``size`` requests in arrival order (the
request itself included). The same arithmetic serves a whole file and a stream: between batches
the state keeps each client's last ``size - 1`` requests, and those of the clients in the next
batch are put in front of it, so batch-by-batch results equal whole-file results exactly. The
other clients' requests are carried over as they are: a batch costs its own clients' requests,
not those of every client the state holds. All of it is numpy over a stable sort by client; no
per-record Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

STATE_KEY = "access_window"
#: Seconds reported as the gap before a client's first request.
FIRST_GAP = 3600.0
WINDOW_COLUMNS = ("win_requests", "win_rate", "win_error_share", "win_404_share",
                  "win_distinct_paths", "win_post_share", "win_gap")


def _codes(values: pa.Array) -> np.ndarray:
    return np.asarray(pc.dictionary_encode(values).indices.to_numpy(zero_copy_only=False),
                      dtype=np.int64)


def _lagged(sorted_vals: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Values ``k`` requests earlier of the same client, and where such a request exists."""
    idx = np.arange(len(sorted_vals)) - k
    valid = pos >= k
    return sorted_vals[np.where(valid, idx, 0)], valid


def window_features(client: pa.Array, ts: np.ndarray, path: pa.Array, status: np.ndarray,
                    method: pa.Array, state: dict[str, Any], size: int = 20,
                    max_clients: int = 200_000) -> dict[str, np.ndarray]:
    """Window features of a batch, in its row order; updates ``state`` for the next batch."""
    n_new = len(client)
    tail = state.get(STATE_KEY)
    cols = {
        # a record without a client address (a table given to Detector.score_batch) is one of
        # the unnamed client's: its null code was a negative count, numpy's ValueError
        "client": pc.fill_null(client, ""),
        "ts": pa.array(ts, pa.float64()),
        "path": pc.fill_null(path, ""),
        "status": pa.array(status, pa.int64()),
        "post": pc.fill_null(pc.equal(method, "POST"), False),
    }
    frame = pa.table(cols)
    whole = arrival = carried = None
    if tail is not None and tail.num_rows:
        # only the tail's requests of this batch's clients are in the windows: the rest (up to
        # max_clients clients') were sorted and windowed again at every batch, so a stream's
        # batch cost grew with every client it had seen (~0.6 s a batch of 100 at 200,000)
        frame = frame.cast(tail.schema)
        mine = pc.is_in(tail.column("client"), value_set=frame.column("client").combine_chunks())
        mine_np = mine.to_numpy(zero_copy_only=False).astype(bool)
        own = np.flatnonzero(mine_np)
        carried = np.flatnonzero(~mine_np)
        whole = pa.concat_tables([tail, frame])
        # each row's place in arrival order among the tail's and the batch's
        arrival = np.concatenate([own, tail.num_rows + np.arange(n_new)])
        frame = pa.concat_tables([tail.take(pa.array(own, pa.int64())), frame])
    n = frame.num_rows
    n_old = n - n_new
    client_code = _codes(frame.column("client").combine_chunks())
    order = np.argsort(client_code, kind="stable")
    sc = client_code[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sc[1:] != sc[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    pos = np.arange(n) - group_start

    t = frame.column("ts").to_numpy()[order]
    st = frame.column("status").to_numpy()[order]
    paths = _codes(frame.column("path").combine_chunks())[order]
    post = frame.column("post").to_numpy(zero_copy_only=False).astype(np.float64)[order]

    count = np.minimum(pos + 1, size).astype(np.float64)

    def window_sum(x: np.ndarray) -> np.ndarray:
        cs = np.concatenate([[0.0], np.cumsum(x)])
        i = np.arange(n)
        return cs[i + 1] - cs[i + 1 - count.astype(np.int64)]

    err = window_sum((st >= 400).astype(np.float64))
    nf = window_sum((st == 404).astype(np.float64))
    posts = window_sum(post)
    t_min, t_max = t.copy(), t.copy()
    distinct = np.ones(n)
    lagged_paths = [paths]
    for k in range(1, size):
        tk, valid = _lagged(t, pos, k)
        t_min = np.where(valid, np.minimum(t_min, tk), t_min)
        t_max = np.where(valid, np.maximum(t_max, tk), t_max)
        pk, _ = _lagged(paths, pos, k)
        new = valid.copy()
        for earlier in lagged_paths:
            new &= pk != earlier
        distinct += new
        lagged_paths.append(np.where(valid, pk, -1 - k))
    prev, has_prev = _lagged(t, pos, 1)
    gap = np.where(has_prev, np.abs(t - prev), FIRST_GAP)
    span = np.maximum(t_max - t_min, 1.0)
    feats_sorted = {
        "win_requests": count,
        "win_rate": count / span * 60.0,
        "win_error_share": err / count,
        "win_404_share": nf / count,
        "win_distinct_paths": distinct / count,
        "win_post_share": posts / count,
        "win_gap": gap,
    }
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    rows = inverse[n_old:]
    out = {k: v[rows] for k, v in feats_sorted.items()}

    # keep each client's last size-1 requests, in arrival order, for the next batch
    group_size = np.bincount(client_code)[sc]
    keep_sorted = pos >= group_size - (size - 1)
    keep = np.sort(order[keep_sorted])
    if whole is None or arrival is None or carried is None:
        new_tail = frame.take(pa.array(keep))
    else:
        new_tail = whole.take(pa.array(np.sort(np.concatenate([carried, arrival[keep]]))))
    if max_clients and new_tail.num_rows > max_clients * (size - 1):
        new_tail = new_tail.slice(new_tail.num_rows - max_clients * (size - 1))
    state[STATE_KEY] = new_tail.combine_chunks()
    return out
