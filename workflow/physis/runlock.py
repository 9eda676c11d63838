"""Recover from a Snakemake run that was killed: clear its stale lock, never a live run's.

Snakemake locks the working directory while it runs (``.snakemake/locks/``); a run killed with
``kill -9``, an out-of-memory kill or a lost login node leaves the lock behind, and every later run
fails with a ``LockException`` until someone runs ``snakemake --unlock``. The Snakefile calls
:func:`clear_stale_lock` while it parses, in the main Snakemake process only: it removes the lock
when no Snakemake process is alive in the folder (any process whose command line names snakemake
and whose working directory is this folder, which includes a killed run's orphaned jobs), and
leaves it with an explanation otherwise. The lock records no owner, so every main run records its
host and process id in ``.snakemake/physis-owner.json``: a lock taken on another host (a second
login node) is never cleared from here.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

OWNER_FILE = "physis-owner.json"


def _same_folder(pid: str, folder: Path) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve() == folder
    except OSError:  # gone, or another user's process
        return False


def live_snakemake(folder: str | Path) -> list[str]:
    """Command lines of the other Snakemake processes (not this one or its ancestors) running in ``folder``."""
    folder = Path(folder).resolve()
    ours, pid = set(), os.getpid()
    while pid > 1:  # this process and its ancestors (a wrapper shell, make)
        ours.add(str(pid))
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name in ours:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "snakemake" in command and _same_folder(entry.name, folder):
            found.append(f"pid {entry.name}: {command[:120]}")
    return found


def clear_stale_lock(folder: str | Path = ".", persistence: str = ".snakemake") -> str | None:
    """Remove a dead run's lock in ``folder``; return a line for the log (None when there was nothing to do)."""
    folder = Path(folder)
    state = folder / persistence
    locks = sorted((state / "locks").glob("*.lock")) if (state / "locks").is_dir() else []
    others = live_snakemake(folder)
    if others:
        return (f"physis: {state / 'locks'} is in use by a running Snakemake ({others[0]}); wait for it to finish "
                "or stop it, then run the same command again") if locks else None
    owner = _read_owner(state / OWNER_FILE)
    if locks and owner.get("host", socket.gethostname()) != socket.gethostname():
        return (f"physis: {state / 'locks'} was taken by Snakemake pid {owner.get('pid')} on host {owner['host']}; "
                "if that run is no longer alive there, run `snakemake --unlock` once")
    for lock in locks:
        lock.unlink(missing_ok=True)
    state.mkdir(exist_ok=True)
    (state / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")
    if locks:
        return (f"physis: removed a stale Snakemake lock ({len(locks)} file(s) in {state / 'locks'}) left by a run "
                f"that is no longer alive (pid {owner.get('pid', 'unknown')})")
    return None


def _read_owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
