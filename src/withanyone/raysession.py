"""A local Ray started by one of our commands dies with it, however it ends (``kill -9`` included).

Ray fate-shares its GCS server and raylet with the driver on Linux, but the raylet's agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) notice the raylet's death and then wait about a minute
trying to report it to the dead GCS before they exit, and on other systems nothing is fate-shared at all.
:func:`start_local_ray` therefore starts, beside Ray, a small reaper process in its own session that keeps
a list of this process's Ray descendants and, the moment this process is gone (its end of a pipe closes),
terminates them (SIGTERM, then SIGKILL after a few seconds). :func:`shutdown_ray` shuts Ray down and tells
the reaper to leave quietly. A Ray cluster given by address is never touched.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)

#: The reaper, run as ``python -c REAPER DRIVER_PID SESSION_DIR`` with the driver's pipe on stdin.
REAPER = r"""
import os, sys, threading, time
import psutil

driver, session, me = int(sys.argv[1]), sys.argv[2], os.getpid()
seen = {}

def is_ray(p):
    if p.pid == me:
        return False
    cmd = " ".join(p.cmdline())
    return cmd.startswith("ray::") or (session and session in cmd) or "/ray/" in cmd

def snapshot():
    try:
        kids = psutil.Process(driver).children(recursive=True)
    except psutil.Error:
        return
    for k in kids:
        try:
            if is_ray(k):
                seen[k.pid] = k.create_time()
        except psutil.Error:
            pass

def watch():
    while True:
        snapshot()
        time.sleep(0.5)

threading.Thread(target=watch, daemon=True).start()
try:
    msg = sys.stdin.readline()
except Exception:
    msg = ""
if msg.strip() == "stop":
    sys.exit(0)
procs = []
for pid, created in list(seen.items()):
    try:
        p = psutil.Process(pid)
        if p.create_time() == created:
            procs.append(p)
            procs += [c for c in p.children(recursive=True) if is_ray(c)]
    except psutil.Error:
        pass
raylets = {str(pid) for pid in seen}
for p in psutil.process_iter():  # workers started after the last look: their raylet is one we saw
    try:
        if p.pid != me and p.environ().get("RAY_RAYLET_PID") in raylets:
            procs.append(p)
    except psutil.Error:
        pass
procs = list({p.pid: p for p in procs}.values())
for p in procs:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(procs, timeout=3)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
"""

_reaper: subprocess.Popen | None = None


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init(**init_kwargs)`` for a local Ray, plus the reaper that ends its processes with this one."""
    import ray

    ray.init(**init_kwargs)
    try:
        _start_reaper()
    except Exception as exc:  # no psutil or no process: Ray still runs, only without the guarantee
        log.warning("Ray reaper not started (%s): a killed run may leave Ray processes behind", exc)


def _start_reaper() -> None:
    global _reaper
    import os

    import psutil  # noqa: F401 — fail here (and warn) rather than in the reaper

    try:
        import ray

        session = str(ray._private.worker.global_worker.node._session_dir)  # private: best effort
    except Exception:
        session = ""
    _stop_reaper()
    _reaper = subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpid()), session], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               close_fds=True)


def _stop_reaper() -> None:
    global _reaper
    if _reaper is None:
        return
    try:
        _reaper.stdin.write(b"stop\n")
        _reaper.stdin.close()
        _reaper.wait(timeout=5)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        _reaper.kill()
    _reaper = None


def shutdown_ray() -> None:
    """``ray.shutdown()`` and a quiet exit of the reaper (nothing is left to end)."""
    import ray

    try:
        ray.shutdown()
    finally:
        _stop_reaper()
