"""The HTTP service (ppcls_ft/service.py, deploy/serve.py) through a real client and server.

A real uvicorn server on 127.0.0.1 and a free port, in a thread, stopped by the fixture; requests
go through httpx. The served answers are compared with the in-process Predictor on the same bytes.
Images are made here, so these tests never skip for want of ../shared.
"""
import base64
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import paddle
import pytest
import uvicorn

from ppcls_ft.engine.export import export_dygraph
from ppcls_ft.predictor import Predictor
from ppcls_ft.service import Batcher, ClassifierService, Limits, create_app
from test_export import EVAL_OPS, LABELS, SHAPE

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_bytes=60_000, max_pixels=500 * 500, max_images=4)


class ColourNet(paddle.nn.Layer):
    """Logits from the mean colour. Randomly initialised zoo models answer nearly the same for
    every synthetic image, which would let a server that mixes up answers pass; this one does not."""

    class_num = 3

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(3, 3)
        with paddle.no_grad():
            self.fc.weight.set_value(np.array([[1, -.5, -.5], [-.5, 1, -.5], [-.5, -.5, 1]], np.float32))
            self.fc.bias.set_value(np.zeros(3, np.float32))

    def forward(self, x):
        return self.fc(x.mean(axis=[2, 3]))


def jpeg(seed, size=(90, 80)):
    """A JPEG of one random dominant colour plus noise, different per seed."""
    rng = np.random.default_rng(seed)
    img = np.empty((size[1], size[0], 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


IMAGES = [jpeg(s) for s in range(6)]


class LiveServer:
    """uvicorn in a thread on 127.0.0.1:<free port>; ``stop()`` ends it (bounded waits)."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def start(self):
        self.thread.start()
        for _ in range(200):  # 10 s at most
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start within 10 s")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop within 10 s"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_dygraph(ColourNet(), tmp_path_factory.mktemp("served"), SHAPE, EVAL_OPS, LABELS,
                          model_name="ColourNet", topk=2)


@pytest.fixture(scope="module")
def reference(model_dir):
    """What the in-process Predictor answers for IMAGES: distinct per image."""
    ref = Predictor(model_dir, cpu_threads=1).predict(IMAGES)
    assert len({r["class_ids"][0] for r in ref}) == 3, "test images must cover every class"
    assert len({round(r["scores"][0], 4) for r in ref}) == len(IMAGES)
    return ref


@pytest.fixture(scope="module")
def server(model_dir):
    predictor = Predictor(model_dir, batch_size=8, cpu_threads=1)
    # 30 ms: long enough that requests fired together on a loaded 2-core machine meet in a batch.
    service = ClassifierService(predictor, LIMITS, max_batch=8, max_wait_ms=30)
    live = LiveServer(create_app(service)).start()
    yield live
    live.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def assert_same(result, expected):
    assert result["class_ids"] == expected["class_ids"]
    assert result["label_names"] == expected["label_names"]
    np.testing.assert_allclose(result["scores"], expected["scores"], atol=1e-5)


def test_health_and_model_describe_the_service(client):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/model").json()
    assert (info["model_name"], info["class_num"], info["label_names"]) == ("ColourNet", 3, LABELS)
    assert info["image_shape"] == SHAPE and info["topk"] == 2 and info["schema_version"] == 2
    assert [next(iter(op)) for op in info["preprocessing"]] == ["DecodeImage", "ResizeImage",
                                                                "CropImage", "NormalizeImage", "ToCHWImage"]
    assert info["limits"] == {"max_bytes": 60_000, "max_pixels": 250_000, "max_images": 4}
    assert info["certificate"]["passed"] is True and info["certificate"]["samples"] == 4


def test_multipart_files_answer_like_the_predictor(client, reference):
    one = client.post("/predict", files={"file": ("a.jpg", IMAGES[0], "image/jpeg")})
    assert one.status_code == 200, one.text
    (res,) = one.json()["results"]
    assert_same(res, reference[0])
    assert res["file_name"] == "a.jpg"
    files = [("files", (f"{i}.jpg", IMAGES[i], "image/jpeg")) for i in range(3)]
    many = client.post("/predict", files=files).json()["results"]
    assert [r["file_name"] for r in many] == ["0.jpg", "1.jpg", "2.jpg"]
    for res, ref in zip(many, reference[:3]):
        assert_same(res, ref)


def test_json_base64_answers_like_the_predictor(client, reference):
    b64 = [base64.b64encode(img).decode() for img in IMAGES[:3]]
    res = client.post("/predict", json={"images": b64}).json()["results"]
    for r, ref in zip(res, reference[:3]):
        assert_same(r, ref)
    data_url = "data:image/jpeg;base64," + b64[1]
    (single,) = client.post("/predict?topk=1", json={"image": data_url}).json()["results"]
    assert single["class_ids"] == reference[1]["class_ids"][:1] and len(single["scores"]) == 1


def test_paddlex_layout(client, reference):
    body = {"image": base64.b64encode(IMAGES[2]).decode(), "inferenceParams": {"topK": 3}}
    out = client.post("/image-classification", json=body)
    assert out.status_code == 200
    out = out.json()
    assert (out["errorCode"], out["errorMsg"]) == (0, "Success")
    cats = out["result"]["categories"]
    assert [c["id"] for c in cats][:2] == reference[2]["class_ids"] and len(cats) == 3
    assert cats[0]["name"] == reference[2]["label_names"][0]
    assert cats[0]["score"] == pytest.approx(reference[2]["scores"][0], abs=1e-5)
    bad = client.post("/image-classification", json={"image": "https://example.com/a.jpg"})
    assert bad.status_code == 400 and bad.json()["errorCode"] == 400
    assert "not fetched" in bad.json()["errorMsg"]


def test_concurrent_requests_are_answered_correctly_and_batched(server, reference):
    before = httpx.get(server.url + "/health").json()
    n = 16
    barrier = threading.Barrier(n, timeout=30)

    def one(i):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait()  # fire together, so the batcher sees them within its wait
            r = c.post("/predict", files={"file": (f"{i}.jpg", IMAGES[i % 6], "image/jpeg")})
            return i, r.status_code, r.json()

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(one, range(n)))
    for i, status, body in answers:
        assert status == 200, body
        assert_same(body["results"][0], reference[i % 6])  # each answer is its own image's
    after = httpx.get(server.url + "/health").json()
    assert after["images"] - before["images"] == n
    assert after["batches"] - before["batches"] < n, "no two requests shared a predictor call"
    assert after["largest_batch"] > 1


def tall_png(width, height):
    return cv2.imencode(".png", np.zeros((height, width, 3), np.uint8))[1].tobytes()


BAD_REQUESTS = [
    ("not an image", dict(files={"file": ("a.jpg", b"hello, not a picture", "image/jpeg")}), 415, "not an image"),
    ("too many bytes", dict(files={"file": ("big.bmp", cv2.imencode(".bmp", np.zeros((200, 200, 3), np.uint8))[1].tobytes(), "image/bmp")}), 413, "--max_bytes"),
    ("too many pixels", dict(files={"file": ("wide.png", tall_png(1000, 400), "image/png")}), 413, "--max_pixels"),
    ("too many images", dict(files=[("files", (f"{i}.jpg", IMAGES[0], "image/jpeg")) for i in range(5)]), 413, "--max_images"),
    ("no file", dict(data={"note": "forgot the file"}, files={"x": ("", b"", "text/plain")}), 400, "no image"),
    ("empty file", dict(files={"file": ("a.jpg", b"", "image/jpeg")}), 400, "empty"),
    ("no image field", dict(json={"pictures": []}), 400, "images"),
    ("empty image list", dict(json={"images": []}), 400, "no image"),
    ("bad base64", dict(json={"images": ["@@@not base64@@@"]}), 400, "not valid base64"),
    ("base64 of text", dict(json={"images": [base64.b64encode(b"plain text").decode()]}), 415, "not an image"),
    ("not JSON", dict(content=b"{oops", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    ("JSON list", dict(json=[1, 2]), 400, "must be an object"),
    ("wrong content type", dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "multipart/form-data"),
    ("bad topk", dict(json={"images": [base64.b64encode(IMAGES[0]).decode()], "topk": 0}), 400, "topk"),
]


@pytest.mark.parametrize("kwargs,status,message", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(client, reference, kwargs,
                                                                       status, message):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and message in err["message"]
    ok = client.post("/predict", files={"file": ("a.jpg", IMAGES[0], "image/jpeg")})
    assert ok.status_code == 200
    assert_same(ok.json()["results"][0], reference[0])


def test_unknown_route_and_a_body_without_length_are_json_errors(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["status"] == 404
    chunks = iter([b'{"images": []}'])  # a generator body is sent chunked, without Content-Length
    r = client.post("/predict", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 411 and "Content-Length" in r.json()["error"]["message"]


def test_reject_threshold_is_served_as_unknown(model_dir, reference):
    predictor = Predictor(model_dir, cpu_threads=1, reject_threshold=1.0)  # rejects everything < 1
    live = LiveServer(create_app(ClassifierService(predictor, LIMITS))).start()
    try:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            (res,) = c.post("/predict", files={"file": ("a.jpg", IMAGES[0], "image/jpeg")}).json()["results"]
            assert c.get("/model").json()["reject_threshold"] == 1.0
            px = c.post("/image-classification", json={"image": base64.b64encode(IMAGES[0]).decode()}).json()
    finally:
        live.stop()
    assert res["rejected"] is True and res["class_ids"] == [-1] and res["label_names"] == ["unknown"]
    assert res["candidates"]["class_ids"] == reference[0]["class_ids"]
    assert px["result"]["categories"][0] == {"id": -1, "name": "unknown",
                                             "score": pytest.approx(reference[0]["scores"][0], abs=1e-5)}


def test_batcher_groups_requests_keeps_order_and_survives_a_failing_batch():
    calls = []

    def run(batch):
        calls.append(len(batch))
        time.sleep(0.01)
        if (batch < 0).any():
            raise ValueError("boom")
        return batch * 10

    b = Batcher(run, max_batch=4, max_wait_ms=50).start()
    try:
        futures = [b.submit(np.full((2,), i, np.float32)) for i in range(10)]
        out = [f.result(timeout=10) for f in futures]
        assert [float(o[0]) for o in out] == [10.0 * i for i in range(10)]
        assert max(calls) == 4 and sum(calls) == 10  # full batches, none above max_batch
        bad = b.submit(np.full((2,), -1, np.float32))
        with pytest.raises(ValueError, match="boom"):
            bad.result(timeout=10)
        assert float(b.submit(np.ones(2, np.float32)).result(timeout=10)[0]) == 10.0
        # Images of different shapes are never stacked together.
        mixed = [b.submit(np.ones(s, np.float32)) for s in ((2,), (3,), (2,))]
        assert [m.result(timeout=10).shape for m in mixed] == [(2,), (3,), (2,)]
    finally:
        b.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_script_starts_answers_and_stops(model_dir, reference, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, str(REPO / "deploy" / "serve.py"), "--model_dir",
                             str(model_dir), "--port", str(port), "--cpu_threads", "1"],
                            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # 60 s at most: paddle imports slowly on a loaded machine
            if proc.poll() is not None:
                break
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
        r = httpx.post(url + "/predict", files={"file": ("a.jpg", IMAGES[0], "image/jpeg")}, timeout=30)
        assert_same(r.json()["results"][0], reference[0])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, str(REPO / "deploy" / "serve.py"), "--model_dir",
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: Global.inference_model_dir")


def test_a_lone_request_does_not_wait_for_company():
    b = Batcher(lambda x: x, max_batch=8, max_wait_ms=2000, coming=lambda: 0).start()
    try:
        t0 = time.perf_counter()
        b.submit(np.ones(2, np.float32)).result(timeout=10)
        assert time.perf_counter() - t0 < 1.0  # not the 2 s max_wait: nothing else was coming
    finally:
        b.stop()
