"""``physis fetch grazpedwri`` against a local emulator of figshare's public API.

This machine cannot reach figshare, so the emulator serves the API subset the command uses
(``GET /v2/articles/{id}`` with ``files``; downloads with Range) on 127.0.0.1, carrying a small
phantom zipped the way the release is, and injects the faults a long download meets.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from physis import phantom
from physis.cli import main
from physis.cloud import RetryPolicy
from physis.fetch import STATE_FILE, FetchError, fetch
from physis.records import ImageRecord
from physis.sources import grazpedwri

ARTICLE = 14825193
FOLDERS = ("images_part1", "images_part2", "images_part3", "images_part4", "folder_structure")
POLICY = RetryPolicy(retries=3)


def no_wait(seconds: float) -> None:
    """Back-off without the waiting."""


def no_retry(seconds: float) -> None:
    pytest.fail(f"unexpected retry (back-off {seconds} s)")


class Figshare:
    """The figshare API subset ``physis.fetch`` uses, with fault injection.

    ``faults[key]`` is a list of actions for the next requests of ``key`` (a file name, or
    ``"article"`` for the listing): an HTTP status (sent with ``Retry-After: 0``), ``"cut"``
    (half the body, then the connection closes) or ``"ignore-range"`` (a full 200 answer to a
    Range request). Names in ``corrupt`` are served with one byte flipped. ``requests`` logs
    every request as (path, lower-cased headers).
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.faults: dict[str, list] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                emulator.answer(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.api = f"{self.base}/v2"
        # a short poll interval: shutdown() waits for the serving loop to look up
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> Figshare:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def downloads(self, name: str) -> list[dict[str, str]]:
        """Headers of each download request for ``name``."""
        path = f"/files/{list(self.files).index(name)}"
        return [headers for got, headers in self.requests if got == path]

    def article(self) -> dict:
        return {"id": ARTICLE, "title": "GRAZPEDWRI-DX", "download_disabled": False, "files": [
            {"id": index, "name": name, "size": len(data), "is_link_only": False, "mimetype": "",
             "download_url": f"{self.base}/files/{index}", "supplied_md5": "",
             "computed_md5": hashlib.md5(data).hexdigest()}
            for index, (name, data) in enumerate(self.files.items())]}

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        self.requests.append((request.path, {k.lower(): v for k, v in request.headers.items()}))
        if request.path == f"/v2/articles/{ARTICLE}":
            key, body = "article", json.dumps(self.article()).encode()
        elif match := re.fullmatch(r"/files/(\d+)", request.path):
            key = list(self.files)[int(match[1])]
            body = bytearray(self.files[key])
            if key in self.corrupt:
                body[len(body) // 2] ^= 0xFF
        else:
            request.send_error(404)
            return
        action = self.faults.get(key, []).pop(0) if self.faults.get(key) else None
        if isinstance(action, int):
            request.send_response(action)
            request.send_header("Retry-After", "0")
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        status = 200
        if (wanted := re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))) and action != "ignore-range":
            start = int(wanted[1])
            status, body = 206, body[start:]
            content_range = f"bytes {start}-{len(self.files[key]) - 1}/{len(self.files[key])}"
        request.send_response(status)
        if status == 206:
            request.send_header("Content-Range", content_range)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body[: len(body) // 2] if action == "cut" else body)
        request.close_connection = True


def _zip(folder: Path, wrapped: bool) -> bytes:
    """``folder`` zipped with a top-level ``folder.name/`` (and directory entries) or as bare members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.rglob("*")):
            if wrapped or path.is_file():
                zipped.write(path, path.relative_to(folder.parent if wrapped else folder).as_posix())
        if wrapped:
            zipped.writestr(f"__MACOSX/{folder.name}/._resource-fork", b"Finder junk")
    return buffer.getvalue()


def _tree(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[dict[str, bytes], dict[str, bytes], dict]:
    """A 4-patient phantom's data files, the files that carry them as the release does, its summary.

    Images and folder_structure zips alternate between a top-level folder and bare members:
    the real zips' inner layout is not documented, and fetch must unpack both the same way.
    """
    root = tmp_path_factory.mktemp("phantom")
    summary = phantom.generate(root, n_patients=4, size_scale=0.3)
    files = {f"{folder}.zip": _zip(root / folder, wrapped=index % 2 == 0) for index, folder in enumerate(FOLDERS)}
    files["dataset.csv"] = (root / "dataset.csv").read_bytes()
    expected = {name: data for name, data in _tree(root).items()
                if name == "dataset.csv" or name.split("/")[0] in FOLDERS}
    return expected, files, summary


def _data(root: Path) -> dict[str, bytes]:
    """The unpacked data set: everything but the downloaded zips and fetch's own state."""
    return {name: data for name, data in _tree(root).items() if not name.endswith(".zip") and name != STATE_FILE}


def test_download_unpacks_the_release_byte_for_byte_and_it_converts(release, tmp_path):
    expected, files, summary = release
    dest = tmp_path / "data"
    with Figshare(files) as server:
        done = fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)
    assert done == {"downloaded": list(files), "unpacked": [f"{folder}.zip" for folder in FOLDERS]}
    assert _data(dest) == expected
    assert not list(dest.glob(".*.unpacking-*")) and not list(dest.glob("*.part"))
    records = [item for item in grazpedwri.read(dest, {}, tmp_path / "work") if isinstance(item, ImageRecord)]
    assert len(records) == summary["images"]


def test_an_interrupted_download_resumes_with_a_range_request(release, tmp_path):
    expected, files, _ = release
    dest = tmp_path / "data"
    with Figshare(files) as server:
        server.faults["images_part2.zip"] = ["cut"]
        fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_wait)
    first, second = server.downloads("images_part2.zip")
    assert "range" not in first
    assert second["range"] == f"bytes={len(files['images_part2.zip']) // 2}-"
    assert (dest / "images_part2.zip").read_bytes() == files["images_part2.zip"]
    assert _data(dest) == expected


def test_a_server_that_ignores_range_restarts_the_file_cleanly(release, tmp_path):
    expected, files, _ = release
    dest = tmp_path / "data"
    with Figshare(files) as server:
        server.faults["images_part1.zip"] = ["cut", "ignore-range"]
        fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_wait)
    assert "range" in server.downloads("images_part1.zip")[1]
    assert (dest / "images_part1.zip").read_bytes() == files["images_part1.zip"]
    assert _data(dest) == expected


def test_a_bad_checksum_keeps_the_file_aside_and_unpacks_nothing_from_it(release, tmp_path):
    expected, files, _ = release
    dest = tmp_path / "data"
    good = files["images_part3.zip"]
    with Figshare(files) as server:
        server.corrupt.add("images_part3.zip")
        with pytest.raises(FetchError) as failure:
            fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)
        bad = dest / "images_part3.zip.bad-md5"
        message = str(failure.value)
        assert "images_part3.zip" in message and hashlib.md5(good).hexdigest() in message
        assert hashlib.md5(bad.read_bytes()).hexdigest() in message and bad.read_bytes() != good
        assert not (dest / "images_part3.zip").exists() and not (dest / "images_part3").exists()
        assert not list(dest.glob("*.part"))

        server.corrupt.clear()  # figshare fixed: a rerun fetches the rest and keeps what was verified
        done = fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)
    assert done["downloaded"] == ["images_part3.zip", "images_part4.zip", "folder_structure.zip", "dataset.csv"]
    assert _data(dest) == {**expected, "images_part3.zip.bad-md5": bad.read_bytes()}


def test_503_and_429_are_retried_as_retry_after_says(release, tmp_path):
    expected, files, _ = release
    waits: list[float] = []
    with Figshare(files) as server:
        server.faults = {"article": [503], "dataset.csv": [503, 429]}
        fetch(tmp_path / "data", api=server.api, article=ARTICLE, policy=POLICY, sleep=waits.append)
    assert waits == [0.0, 0.0, 0.0]
    assert len(server.downloads("dataset.csv")) == 3
    assert _data(tmp_path / "data") == expected


@pytest.mark.parametrize(("status", "tries"), [(503, 3), (404, 1)])
def test_tries_are_bounded_and_the_error_names_the_url(release, tmp_path, status, tries):
    _, files, _ = release
    with Figshare(files) as server:
        server.faults["dataset.csv"] = [status] * 5
        url = f"{server.base}/files/{list(files).index('dataset.csv')}"
        with pytest.raises(FetchError, match=re.escape(f"GET {url} failed") + f".*HTTP Error {status}"):
            fetch(tmp_path / "data", api=server.api, article=ARTICLE, policy=RetryPolicy(retries=2),
                  sleep=no_wait)
    assert len(server.downloads("dataset.csv")) == tries


def test_a_second_run_downloads_nothing_even_without_the_zips(release, tmp_path):
    expected, files, _ = release
    dest = tmp_path / "data"
    with Figshare(files) as server:
        fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)
        server.requests.clear()
        assert fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry) == {
            "downloaded": [], "unpacked": []}
        for archive in dest.glob("*.zip"):  # unpacked zips may be deleted to save space
            archive.unlink()
        assert fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry) == {
            "downloaded": [], "unpacked": []}
    assert [path for path, _ in server.requests] == [f"/v2/articles/{ARTICLE}"] * 2
    assert _data(dest) == expected


def test_files_downloaded_by_hand_are_verified_and_used(release, tmp_path):
    expected, files, _ = release
    dest = tmp_path / "data"
    dest.mkdir()
    for name in ("images_part1.zip", "dataset.csv"):
        (dest / name).write_bytes(files[name])
    with Figshare(files) as server:
        done = fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)
    assert done["downloaded"] == ["images_part2.zip", "images_part3.zip", "images_part4.zip", "folder_structure.zip"]
    assert _data(dest) == expected

    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.csv").write_bytes(b"not the release")
    with Figshare(files) as server:
        with pytest.raises(FetchError, match="dataset.csv exists but is not figshare's dataset.csv"):
            fetch(other, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)
    assert (other / "dataset.csv").read_bytes() == b"not the release"


def test_a_bot_challenge_instead_of_the_file_is_an_error(release, tmp_path):
    _, files, _ = release
    with Figshare(files) as server:
        server.faults["dataset.csv"] = [202]  # figshare's web firewall answers scripts 202 with no body
        with pytest.raises(FetchError, match="HTTP 202 instead of the file"):
            fetch(tmp_path / "data", api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)


def test_unpacking_refuses_zip_slip_and_foreign_folders(release, tmp_path):
    _, files, _ = release
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zipped:
        zipped.writestr("images_part1/ok.png", b"fine")
        zipped.writestr("../escape.txt", b"outside")
    dest = tmp_path / "data"
    with Figshare({**files, "images_part1.zip": evil.getvalue()}) as server:
        with pytest.raises(FetchError, match="'../escape.txt' is not a path inside the data folder"):
            fetch(dest, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)
    assert not (tmp_path / "escape.txt").exists() and not (dest / "images_part1").exists()
    assert not list(dest.glob(".*.unpacking-*"))

    mine = tmp_path / "mine"
    (mine / "images_part1").mkdir(parents=True)
    (mine / "images_part1" / "keep.png").write_bytes(b"user data")
    with Figshare(files) as server:
        with pytest.raises(FetchError, match="images_part1 exists but was not unpacked"):
            fetch(mine, api=server.api, article=ARTICLE, policy=POLICY, sleep=no_retry)
    assert _tree(mine / "images_part1") == {"keep.png": b"user data"}


def test_cli_prints_the_config_and_fails_in_one_line(release, tmp_path, capsys):
    _, files, _ = release
    dest = tmp_path / "data"
    with Figshare(files) as server:
        assert main(["fetch", "grazpedwri", str(dest), "--api", server.api]) == 0
        config = yaml.safe_load(capsys.readouterr().out.split("config/config.yaml:")[1])
        assert config == {"dataset": {"format": "grazpedwri", "root": str(dest), "phantom": {"enabled": False}}}

        server.faults["article"] = [404]
        assert main(["fetch", "grazpedwri", str(tmp_path / "other"), "--api", server.api]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"physis: error: GET {server.api}/articles/{ARTICLE} failed: HTTP Error 404: Not Found"
