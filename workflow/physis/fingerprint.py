"""A cheap fingerprint of every file under the data set root, so that fixing the data reruns convert.

Snakemake reruns a job when an input is newer than its outputs, but convert's inputs are thousands of
images, label and annotation files. The Snakefile computes this fingerprint (relative path, size and
modification time of every file, hashed) while it parses and rewrites the fingerprint file only when
the fingerprint changed: adding, removing or changing any file makes the file newer than convert's
outputs, and nothing else touches it. Nothing is read but directory entries: 20,000 files take well
under a second on a local disk (``make bench``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from physis.io import atomic_path


def _entries(folder: str, prefix: str = ""):
    """(relative path, size, mtime in ns) of every regular file below ``folder``, in sorted order."""
    with os.scandir(folder) as scan:
        children = sorted(scan, key=lambda entry: entry.name)
    for entry in children:
        relative = f"{prefix}{entry.name}"
        if entry.is_dir(follow_symlinks=True):
            yield from _entries(entry.path, f"{relative}/")
        elif entry.is_file(follow_symlinks=True):
            info = entry.stat(follow_symlinks=True)
            yield relative, info.st_size, info.st_mtime_ns


def fingerprint(root: str | Path) -> dict:
    """Count, total size and a SHA-256 over (path, size, mtime) of every file under ``root``."""
    digest = hashlib.sha256()
    files = size = 0
    if Path(root).is_dir():
        for relative, nbytes, mtime in _entries(str(root)):
            digest.update(f"{relative}\0{nbytes}\0{mtime}\n".encode("utf-8", "surrogateescape"))
            files += 1
            size += nbytes
    return {"root": str(root), "files": files, "bytes": size, "sha256": digest.hexdigest()}


def update(root: str | Path, path: str | Path) -> bool:
    """Write ``root``'s fingerprint to ``path`` unless the file already holds it; True when written."""
    path = Path(path)
    current = fingerprint(root)
    try:
        if json.loads(path.read_text()) == current:
            return False
    except (OSError, ValueError):
        pass
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(current, indent=2) + "\n")
    return True
