"""The threads a large scoring runs on (`tfemde.serving.similarity`): one pool of worker threads per process, and
the BLAS library held to one thread while each worker runs its own matrix products."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from typing import Callable

import numpy as np

_pool = None
_pool_pid = None
_controller = None
_blas_lock = threading.Lock()
_blas_limit = None
_blas_users = 0


def thread_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool of worker threads, made with `threads` threads at its first use (and again in a forked
    child, which cannot use its parent's threads)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tfemde-similarity")
        _pool_pid = os.getpid()
    return _pool


def run_in_parts(fn: Callable[[int, int], None], n_rows: int, parts: int, threads: int) -> None:
    """Run `fn(r0, r1)` over `[0, n_rows)` cut into `parts` ranges, on the pool (in the caller when one part)."""
    if parts <= 1:
        fn(0, n_rows)
        return
    pool = thread_pool(threads)
    bounds = np.linspace(0, n_rows, parts + 1).astype(int)
    futures = [pool.submit(fn, int(r0), int(r1)) for r0, r1 in zip(bounds[:-1], bounds[1:])]
    for future in futures:
        future.result()


@contextlib.contextmanager
def one_blas_thread():
    """Limit the BLAS library to one thread while the workers (one per core) each run their own products.

    With BLAS on every core and the element-wise part in a thread per core, BLAS's threads spin-wait after each
    product and take a core from the element-wise threads (which then ran no faster on two threads than on one);
    one BLAS thread per worker keeps every core on its own rows from product to scores. `threadpoolctl` sets the
    process's BLAS thread count; scorings running at once in several threads share one limit, lifted when the
    last of them ends (other BLAS calls of the process meanwhile run on one thread too).
    """
    global _controller, _blas_limit, _blas_users
    from threadpoolctl import ThreadpoolController

    with _blas_lock:
        if _blas_users == 0:
            if _controller is None:
                _controller = ThreadpoolController()
            _blas_limit = _controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limit.restore_original_limits()
                _blas_limit = None
