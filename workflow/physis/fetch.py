"""Download GRAZPEDWRI-DX from figshare into the layout that ``dataset.format: grazpedwri`` reads.

The release (figshare article 14825193, DOI 10.6084/m9.figshare.14825193, CC BY 4.0) is a few
files: ``images_part1..4.zip``, ``folder_structure.zip`` and ``dataset.csv``. :func:`fetch` lists
them through figshare's public REST API, downloads each into ``ROOT/``, checks its MD5 against
the one figshare lists, and unpacks every ``NAME.zip`` into ``ROOT/NAME/``. The result is
``ROOT/dataset.csv``, ``ROOT/images_part1..4/*.png`` and ``ROOT/folder_structure/yolov5/labels/*.txt``.

How the zips are laid out inside is not documented, so both shapes are accepted: a zip whose
members all sit in one top-level folder named like the zip (``images_part1/x.png``) and a zip of
bare members (``x.png``) both end up as ``ROOT/images_part1/x.png``. Any other shape is unpacked
as it is, and the closing layout check names what is missing.

Reruns are cheap and safe. ``ROOT/.physis-fetch.json`` records each file that was verified and
each zip that was unpacked, with its MD5; a recorded file whose size still matches is neither
downloaded nor read again, and a recorded zip is not unpacked again. An interrupted download
resumes from its ``NAME.part`` with an HTTP Range request. A download whose MD5 differs is kept as
``NAME.bad-md5`` and never unpacked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import TypeVar

from tqdm import tqdm

from physis.cloud import RetryPolicy, Transient, call_with_retries, parse_retry_after
from physis.records import YOLO_LABEL_DIR

log = logging.getLogger(__name__)

T = TypeVar("T")

FIGSHARE_API = "https://api.figshare.com/v2"
GRAZPEDWRI_ARTICLE = 14825193
STATE_FILE = ".physis-fetch.json"
USER_AGENT = "physis-fetch (GRAZPEDWRI-DX download; Python urllib)"
CHUNK_BYTES = 1 << 20
#: Failures worth another try: no connection, a dropped one, a timeout, a short body.
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, HTTPException)
#: macOS Finder adds ``__MACOSX/`` resource forks to zips; they are not data and would hide a top-level folder.
JUNK_FOLDER = "__MACOSX"


class FetchError(ValueError):
    """A download, checksum or unpacking failure; the message names the URL or file."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a figshare article as the API lists it."""

    name: str
    size: int
    url: str
    md5: str


def _open(url: str, headers: dict[str, str], timeout_s: float):
    # urllib follows figshare's redirect from download_url to its object store and keeps the
    # Range header on the way (it drops only Content-Length/Content-Type from redirected requests).
    return urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers}),
                                  timeout=timeout_s)


def _transient(err: Exception) -> Transient | None:
    if isinstance(err, urllib.error.HTTPError):
        if err.code == 429 or err.code >= 500:
            return Transient(f"HTTP {err.code}", parse_retry_after(err.headers.get("Retry-After")))
        return None
    if isinstance(err, NETWORK_ERRORS):
        return Transient(f"connection failed ({err})")
    return None


def _with_retries(call: Callable[[], T], url: str, policy: RetryPolicy, sleep: Callable[[float], None]) -> T:
    """``call`` with back-off on network errors and 429/5xx; the final error names ``url``."""
    try:
        return call_with_retries(call, policy, _transient, f"GET {url}", sleep)
    except NETWORK_ERRORS as err:
        tries = f" after {policy.retries + 1} tries" if _transient(err) else ""
        raise FetchError(f"GET {url} failed{tries}: {err}") from err


def list_files(api: str, article: int, policy: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] = time.sleep,
               timeout_s: float = 60.0) -> list[RemoteFile]:
    """The article's files from ``GET {api}/articles/{article}``.

    Relied on (figshare API v2, schemas ArticleComplete and PublicFile): the answer is JSON
    whose ``files`` lists up to 10 files (the release has six), each with ``name``, ``size`` in
    bytes, ``download_url``, ``is_link_only`` (true: hosted elsewhere, not downloadable here),
    ``computed_md5`` (figshare's hash of the stored bytes) and ``supplied_md5`` (the uploader's,
    may be empty); ``download_disabled`` is true when the article blocks downloads.
    """
    url = f"{api.rstrip('/')}/articles/{article}"

    def get() -> dict:
        with _open(url, {"Accept": "application/json"}, timeout_s) as response:
            return json.load(response)

    try:
        answer = _with_retries(get, url, policy, sleep)
    except json.JSONDecodeError as err:
        raise FetchError(f"GET {url}: not JSON ({err})") from err
    if answer.get("download_disabled"):
        raise FetchError(f"{url}: figshare has downloads disabled for article {article}")
    files = []
    for item in answer.get("files", []):
        if not {"name", "size", "download_url"} <= item.keys():
            raise FetchError(f"{url}: a file entry lacks name, size or download_url: {item}")
        name = item["name"]
        # names come from the network and become paths under ROOT: accept plain file names only
        if PurePosixPath(name).name != name or name.startswith(".") or "\\" in name:
            raise FetchError(f"{url}: file name {name!r} is not a plain file name")
        if item.get("is_link_only"):
            raise FetchError(f"{url}: {name} is only a link to another site; download it by hand")
        md5 = item.get("computed_md5") or item.get("supplied_md5")
        if not md5:
            raise FetchError(f"{url}: {name} has no MD5 to verify it against")
        files.append(RemoteFile(name, int(item["size"]), item["download_url"], md5.lower()))
    if not files:
        raise FetchError(f"{url}: article {article} lists no files")
    return files


def file_md5(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


class _ByteProgress:
    """Bytes received: a tqdm bar on a terminal, else a log line every ``every_s`` seconds."""

    def __init__(self, name: str, total: int, done: int, every_s: float = 10.0):
        self.name, self.total, self.done, self.every_s = name, total, done, every_s
        self.last = time.monotonic()
        self.bar = (tqdm(total=total, initial=done, desc=name, unit="B", unit_scale=True, unit_divisor=1024)
                    if sys.stderr.isatty() else None)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            log.info("%s: %s of %s (%.0f%%)", self.name, tqdm.format_sizeof(self.done, "B", 1024),
                     tqdm.format_sizeof(self.total, "B", 1024), 100 * self.done / max(self.total, 1))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _download_attempt(remote: RemoteFile, part: Path, timeout_s: float) -> None:
    """Append the rest of ``remote`` to ``part``, or start it over if the server ignores Range."""
    offset = part.stat().st_size if part.exists() else 0
    if offset > remote.size:  # not a prefix of this file
        offset = 0
    if 0 < offset == remote.size:
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with _open(remote.url, headers, timeout_s) as response:
        resumed = offset > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise FetchError(f"GET {remote.url}: asked for bytes {offset}- and got "
                             f"{response.headers.get('Content-Range')!r}")
        if not resumed and response.status != 200:
            # e.g. 202: a bot challenge with an empty body instead of the file
            raise FetchError(f"GET {remote.url}: HTTP {response.status} instead of the file")
        if offset and not resumed:
            log.info("%s: the server ignored the Range request; downloading from the start", remote.name)
        progress = _ByteProgress(remote.name, remote.size, offset if resumed else 0)
        try:
            with part.open("ab" if resumed else "wb") as out:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    out.write(chunk)
                    progress.update(len(chunk))
        finally:
            progress.close()
    received = part.stat().st_size
    if received < remote.size:
        # http.client ends a body cut short by the server quietly; make it a retryable failure
        raise ConnectionError(f"connection closed after {received} of {remote.size} bytes")


def _download(remote: RemoteFile, root: Path, policy: RetryPolicy, sleep: Callable[[float], None],
              timeout_s: float) -> None:
    """Download ``remote`` into ``root/NAME``, resuming ``NAME.part``, and verify its MD5."""
    part = root / f"{remote.name}.part"
    log.info("%s: downloading %s", remote.name, tqdm.format_sizeof(remote.size, "B", 1024))
    _with_retries(lambda: _download_attempt(remote, part, timeout_s), remote.url, policy, sleep)
    got = file_md5(part)
    if got != remote.md5:
        bad = part.with_name(f"{remote.name}.bad-md5")
        part.replace(bad)
        raise FetchError(f"{remote.name}: MD5 {got} of the download does not match figshare's {remote.md5}; "
                         f"kept aside as {bad}, not unpacked; run again to download it afresh")
    part.replace(root / remote.name)


def _member_parts(name: str, archive: Path) -> tuple[str, ...]:
    """A zip member's path parts; a member that would land outside the target is an error (zip-slip)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise FetchError(f"{archive}: member {name!r} is not a path inside the data folder; refusing to unpack")
    return path.parts


def unpack(archive: Path, root: Path) -> Path:
    """Unpack ``NAME.zip`` into ``root/NAME/``, which must not exist yet; return that folder.

    The zip is extracted into a hidden temporary folder inside ``root`` and moved into place in
    one rename, so an interrupted run never leaves a half-filled ``root/NAME/`` (a killed run's
    temporary folder is removed by the next). A single top-level folder ``NAME/`` inside the zip
    is not repeated (``NAME/NAME/``).
    """
    target = root / archive.stem
    if target.exists():
        raise FetchError(f"{target} exists but was not unpacked from {archive.name} by physis fetch; "
                         "move it away and run again")
    prefix = f".{target.name}.unpacking-"
    for stale in root.glob(f"{prefix}*"):
        shutil.rmtree(stale)
    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.infolist() if not m.filename.startswith(f"{JUNK_FOLDER}/")]
        parts = [_member_parts(m.filename, archive) for m in members]
        wrapped = bool(members) and all(p[0] == target.name and (len(p) > 1 or m.is_dir())
                                        for m, p in zip(members, parts))
        with tempfile.TemporaryDirectory(dir=root, prefix=prefix) as tmp:
            staging = Path(tmp) / "content"
            staging.mkdir()
            zipped.extractall(staging, members)
            (staging / target.name if wrapped else staging).replace(target)
    return target


def _load_state(root: Path) -> dict[str, dict[str, str]]:
    path = root / STATE_FILE
    try:
        state = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError as err:
        raise FetchError(f"{path}: physis fetch's record is not readable JSON ({err})") from err
    return {"verified": state.get("verified", {}), "unpacked": state.get("unpacked", {})}


def _save_state(root: Path, state: dict) -> None:
    path = root / STATE_FILE
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic: a crash leaves the old state or the new one


def _have_verified(remote: RemoteFile, path: Path, state: dict) -> bool:
    """Whether ``path`` already holds ``remote``: recorded with its MD5 (cheap) or hashed now."""
    if not path.exists():
        return False
    if path.stat().st_size == remote.size:
        if state["verified"].get(remote.name) == remote.md5:
            return True
        if file_md5(path) == remote.md5:  # e.g. a state file lost after a completed download
            state["verified"][remote.name] = remote.md5
            return True
    raise FetchError(f"{path} exists but is not figshare's {remote.name} (size or MD5 differ); "
                     "move it away and run again")


def check_layout(root: Path) -> None:
    """Fail naming what is missing when ``root`` is not in the GRAZPEDWRI-DX layout."""
    missing = [what for what, present in (
        ("dataset.csv", (root / "dataset.csv").is_file()),
        ("images_part*/*.png", any(root.glob("images_part*/*.png"))),
        (f"{YOLO_LABEL_DIR}/", (root / YOLO_LABEL_DIR).is_dir()),
    ) if not present]
    if missing:
        raise FetchError(f"{root}: downloaded and unpacked, but {', '.join(missing)} missing; "
                         "the release's layout may have changed")


def fetch(root: str | Path, api: str = FIGSHARE_API, article: int = GRAZPEDWRI_ARTICLE,
          policy: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] = time.sleep,
          timeout_s: float = 60.0) -> dict[str, list[str]]:
    """Download, verify and unpack the article's files into ``root``; return what this run did.

    ``policy`` bounds the tries per request (back-off on network errors and 429/5xx, honouring
    ``Retry-After``); ``sleep`` is what waits between them (tests pass a no-op).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state = _load_state(root)
    files = list_files(api, article, policy, sleep, timeout_s)
    log.info("article %s: %d files, %s", article, len(files),
             tqdm.format_sizeof(sum(f.size for f in files), "B", 1024))
    done: dict[str, list[str]] = {"downloaded": [], "unpacked": []}
    for remote in files:
        archive = remote.name.endswith(".zip")
        target = root / remote.name.removesuffix(".zip")
        if archive and state["unpacked"].get(remote.name) == remote.md5 and target.is_dir():
            continue  # the zip itself may have been deleted to save space
        path = root / remote.name
        if not _have_verified(remote, path, state):
            _download(remote, root, policy, sleep, timeout_s)
            done["downloaded"].append(remote.name)
        state["verified"][remote.name] = remote.md5
        _save_state(root, state)
        if archive:
            log.info("%s: unpacking into %s", remote.name, target)
            unpack(path, root)
            state["unpacked"][remote.name] = remote.md5
            _save_state(root, state)
            done["unpacked"].append(remote.name)
    check_layout(root)
    return done
