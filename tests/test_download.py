"""Tests for utils/download.py against a local http.server (127.0.0.1, ephemeral port, own thread)."""
import hashlib
import http.server
import json
import threading

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from ppcls_ft.errors import WeightsError
from ppcls_ft.models._builder import load_pretrained
from ppcls_ft.models.base import ClassifierBase
from ppcls_ft.utils.download import default_cache_dir, download

SERVER_LIFETIME = 120  # seconds: the server shuts itself down even if a test hangs


class _Files:
    """What the server serves: path -> bytes, per-path hit counts and how many answers to cut short."""

    def __init__(self):
        self.data, self.hits, self.truncate = {}, {}, {}

    def add(self, name, payload, truncate=0):
        self.data["/" + name] = payload
        self.hits["/" + name] = 0
        self.truncate["/" + name] = truncate


class _Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):
        files = self.server.files
        if self.path not in files.data:
            self.send_error(404)
            return
        files.hits[self.path] += 1
        payload = files.data[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if files.truncate[self.path] > 0:  # announce the full length, send half, hang up
            files.truncate[self.path] -= 1
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True
            return
        self.wfile.write(payload)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files = _Files()
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME, httpd.shutdown)
    watchdog.daemon = True
    watchdog.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, httpd.files
    watchdog.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _payload(n=50_000, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


fast = dict(backoff=0.0, timeout=5, logger=lambda msg: None)


def test_download_then_cache_hit(server, tmp_path):
    base, files = server
    data = _payload()
    files.add("a.pdparams", data)
    first = download(f"{base}/a.pdparams", cache_dir=tmp_path, **fast)
    second = download(f"{base}/a.pdparams", cache_dir=tmp_path, **fast)
    assert first == second == tmp_path / "a.pdparams"
    assert first.read_bytes() == data
    assert files.hits["/a.pdparams"] == 1
    record = json.loads((tmp_path / "a.pdparams.json").read_text())
    assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()


def test_known_checksum_is_checked(server, tmp_path):
    base, files = server
    data = _payload()
    files.add("b.pdparams", data)
    good = hashlib.sha256(data).hexdigest()
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        download(f"{base}/b.pdparams", cache_dir=tmp_path, sha256="0" * 64, **fast)
    assert not (tmp_path / "b.pdparams").exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either
    path = download(f"{base}/b.pdparams", cache_dir=tmp_path, sha256=good, **fast)
    assert path.read_bytes() == data


def test_interrupted_download_is_retried(server, tmp_path):
    base, files = server
    data = _payload()
    files.add("c.pdparams", data, truncate=1)
    path = download(f"{base}/c.pdparams", cache_dir=tmp_path, retries=3, **fast)
    assert path.read_bytes() == data
    assert files.hits["/c.pdparams"] == 2


def test_every_attempt_failing_names_url_and_cache_path(server, tmp_path):
    base, files = server
    files.add("d.pdparams", _payload(), truncate=99)
    url = f"{base}/d.pdparams"
    with pytest.raises(WeightsError) as err:
        download(url, cache_dir=tmp_path, retries=2, **fast)
    assert url in str(err.value) and str(tmp_path / "d.pdparams") in str(err.value)
    assert "short read" in str(err.value)
    assert files.hits["/d.pdparams"] == 2
    assert not (tmp_path / "d.pdparams").exists()


def test_http_404_is_not_retried(server, tmp_path):
    base, files = server
    with pytest.raises(WeightsError, match="404"):
        download(f"{base}/missing.pdparams", cache_dir=tmp_path, retries=3, **fast)


def test_truncated_cached_file_is_refetched(server, tmp_path):
    base, files = server
    data = _payload()
    files.add("e.pdparams", data)
    path = download(f"{base}/e.pdparams", cache_dir=tmp_path, **fast)
    path.write_bytes(data[:1000])  # e.g. a crash or a full disk after the fact
    again = download(f"{base}/e.pdparams", cache_dir=tmp_path, **fast)
    assert again.read_bytes() == data
    assert files.hits["/e.pdparams"] == 2
    # same size but different bytes: caught by the recorded sha256
    corrupt = bytearray(data)
    corrupt[10] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    assert download(f"{base}/e.pdparams", cache_dir=tmp_path, **fast).read_bytes() == data
    assert files.hits["/e.pdparams"] == 3


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PPCLS_FT_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("PPCLS_FT_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "ppcls_ft", "weights")


class _Tiny(ClassifierBase):
    classifier_prefixes = ("fc.",)

    def __init__(self, class_num: int = 3):
        super().__init__()
        self.class_num = class_num
        self.conv = nn.Conv2D(3, 4, 3)
        self.fc = nn.Linear(4, class_num)

    def forward_features(self, x):
        return self.conv(x).mean(axis=[2, 3])

    def forward_head(self, x):
        return self.fc(x)

    def reset_classifier(self, class_num):
        self.class_num = class_num
        self.fc = nn.Linear(4, class_num)


def test_load_pretrained_from_url_end_to_end(server, tmp_path, monkeypatch):
    base, files = server
    monkeypatch.setenv("PPCLS_FT_CACHE", str(tmp_path / "cache"))
    src = _Tiny(class_num=3)
    paddle.save(src.state_dict(), str(tmp_path / "x.pdparams"))
    files.add("x.pdparams", (tmp_path / "x.pdparams").read_bytes())
    dst = _Tiny(class_num=6)
    report = load_pretrained(dst, f"{base}/x.pdparams", logger=None)
    assert report.path == str(tmp_path / "cache" / "x.pdparams")
    assert report.head_reinitialised == 6 and report.loaded == report.total - 2
    np.testing.assert_array_equal(dst.conv.weight.numpy(), src.conv.weight.numpy())
    assert files.hits["/x.pdparams"] == 1
