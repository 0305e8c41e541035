"""HTTP service for an exported classifier: FastAPI + uvicorn around one ``Predictor``.

    python deploy/serve.py --model_dir ./inference [--host 127.0.0.1] [--port 8080]

Routes (docs/deploy.md §3 has the request and response layouts):

- ``POST /predict``: one or several images as multipart files or JSON base64; one result per
  image in the Predictor's layout (``class_ids``, ``scores``, ``label_names``);
- ``POST /image-classification``: PaddleX's serving layout (``image`` in, ``result.categories``
  of ``{id, name, score}`` out, ``errorCode``/``errorMsg``), so PaddleX clients work unchanged;
- ``GET /health`` and ``GET /model`` (name, classes, preprocessing, calibration, limits).

Concurrent requests are batched: every image goes to one ``Batcher`` thread, which gathers what
arrives within ``max_wait_ms`` (or until ``max_batch``) into one paddle-inference call. That
thread is the only one touching the predictor (paddle-inference predictors are not thread-safe);
decoding and preprocessing run in the request threads. Every bad request (not an image, too many
bytes or pixels, no image, bad base64) is a 4xx JSON error naming the image and the limit.

FastAPI, uvicorn and python-multipart are the optional extra ``pip install -e .[serve]``.
"""
import asyncio
import base64
import binascii
import io
import json
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass

import numpy as np

from .errors import ConfigError, DataError
from .inference_format import CERTIFICATE_FILE, UNKNOWN_ID, paddlex_model_name

SERVE_HINT = "pip install -e .[serve]  (fastapi, uvicorn, python-multipart)"


@dataclass
class Limits:
    """Per-request limits; each breach is a 413 naming the limit and the image."""

    max_bytes: int = 10 * 1024 * 1024     # per encoded image
    max_pixels: int = 40_000_000          # per image, width x height (a 12 MP photo is ~12e6)
    max_images: int = 32                  # per request


class ServiceError(Exception):
    """A request the service refuses: HTTP ``status`` and a message saying what to change."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = int(status)
        self.message = message


_STOP = object()


class Batcher:
    """Gather single images from many threads into batched ``run_batch`` calls on one thread.

    ``submit(chw)`` returns a ``Future`` of that image's output row. The worker takes the first
    waiting image, then whatever arrives within ``max_wait_ms`` up to ``max_batch``, and runs
    each group of equal shapes in one call (op lists without a crop give images of several sizes).
    It waits only while ``coming()`` (images being decoded, about to be submitted) is above zero:
    a lone request is not delayed for company that is not on its way.
    """

    def __init__(self, run_batch, max_batch=8, max_wait_ms=5.0, coming=lambda: 1):
        if int(max_batch) < 1:
            raise ConfigError("--max_batch", f"must be >= 1, got {max_batch}")
        if float(max_wait_ms) < 0:
            raise ConfigError("--max_wait_ms", f"must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.coming = coming
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.stats = {"batches": 0, "images": 0, "largest_batch": 0}
        self._queue = queue.Queue()
        self._thread = None

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ppcls-ft-batcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout=10.0):
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, chw):
        if self._thread is None:
            raise RuntimeError("Batcher.start() was not called")
        future = Future()
        self._queue.put((chw, future))
        return future

    def _gather(self):
        """Block for one item, then collect more until the batch is full or the wait is over.
        Returns (items, stop)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        items, deadline = [first], time.monotonic() + self.max_wait
        while len(items) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if remaining <= 0 or self.coming() <= 0:
                    break
                try:  # 1 ms steps, so a wait ends as soon as nothing more is coming
                    item = self._queue.get(timeout=min(remaining, 0.001))
                except queue.Empty:
                    continue
            if item is _STOP:
                return items, True
            items.append(item)
        return items, False

    def _loop(self):
        stop = False
        while not stop:
            items, stop = self._gather()
            # A request that went away (client disconnect) cancelled its future: skip its image.
            items = [(x, f) for x, f in items if f.set_running_or_notify_cancel()]
            groups = {}
            for x, f in items:
                groups.setdefault(x.shape, []).append((x, f))
            for group in groups.values():
                self._run(group)

    def _run(self, group):
        try:
            out = self.run_batch(np.stack([x for x, _ in group]))
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request, the loop lives on
            for _, f in group:
                f.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["images"] += len(group)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        for (_, f), row in zip(group, out):
            f.set_result(row)


# ------------------------------------------------------------------------------ request parsing


def check_image(data, limits, name):
    """Refuse what must not reach the decoder: empty, too many bytes, not an image, too many
    pixels. The pixel count comes from the header (PIL reads it without decoding), so a small
    file that would decode to gigabytes is refused before any allocation."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ServiceError(400, f"{name}: empty; send the image file's bytes")
    if len(data) > limits.max_bytes:
        raise ServiceError(413, f"{name}: {len(data)} bytes is more than the limit of "
                                f"{limits.max_bytes} bytes per image (--max_bytes); send a smaller file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise ServiceError(413, f"{name}: more pixels than the limit of {limits.max_pixels} "
                                "(--max_pixels); resize the image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ServiceError(415, f"{name}: not an image (JPEG, PNG, BMP, WebP or TIFF expected)") from None
    if width * height > limits.max_pixels:
        raise ServiceError(413, f"{name}: {width}x{height} = {width * height} pixels is more than the "
                                f"limit of {limits.max_pixels} (--max_pixels); resize the image")


def decode_base64(text, name):
    """Base64 (optionally a ``data:image/...;base64,`` URL) -> bytes; an http(s) URL is refused
    because this service does not fetch from the network on a client's behalf."""
    if not isinstance(text, str) or not text:
        raise ServiceError(400, f"{name}: expected a non-empty base64 string")
    if text.startswith(("http://", "https://")):
        raise ServiceError(400, f"{name}: image URLs are not fetched by this service; send the "
                                "file's content as base64")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, f"{name}: not valid base64 (standard alphabet, padded)") from None


def parse_topk(value, class_num, name="topk"):
    if value is None:
        return None
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ServiceError(400, f"{name}: expected a positive integer, got {value!r}") from None
    if isinstance(value, bool) or k < 1 or (isinstance(value, float) and value != k):
        raise ServiceError(400, f"{name}: expected a positive integer, got {value!r}")
    return min(k, class_num) if class_num else k


# ------------------------------------------------------------------------------ the service


class ClassifierService:
    """Pre-process, batch, post-process: the logic behind the routes, usable without HTTP."""

    def __init__(self, predictor, limits=None, max_batch=8, max_wait_ms=5.0):
        self.predictor = predictor
        self.limits = limits or Limits()
        self._coming, self._lock = 0, threading.Lock()
        self.batcher = Batcher(predictor.run_graph, max_batch, max_wait_ms, lambda: self._coming)
        self.class_num = predictor.spec.class_num

    def _count_coming(self, n):
        with self._lock:
            self._coming += n

    def preprocess(self, data, name):
        check_image(data, self.limits, name)
        try:
            return self.predictor.preprocess(data)
        except DataError as exc:
            raise ServiceError(415, f"{name}: {exc}") from None

    async def classify(self, images, topk=None):
        """``images``: [(name for errors, bytes, file_name or None)] -> one result dict per image,
        in order (with ``file_name`` where one was given)."""
        from starlette.concurrency import run_in_threadpool

        if not images:
            raise ServiceError(400, "no image in the request; send multipart files (field 'file') "
                                    "or JSON {\"images\": [<base64>, ...]}")
        if len(images) > self.limits.max_images:
            raise ServiceError(413, f"{len(images)} images is more than the limit of "
                                    f"{self.limits.max_images} per request (--max_images); split the request")
        self._count_coming(len(images))
        try:
            arrays = [await run_in_threadpool(self.preprocess, data, name) for name, data, _ in images]
            futures = [asyncio.wrap_future(self.batcher.submit(a)) for a in arrays]
        finally:
            self._count_coming(-len(images))
        rows = await asyncio.gather(*futures)
        return self.predictor.postprocess(np.stack(rows), [f for _, _, f in images], topk=topk)

    def model_info(self):
        spec, post = self.predictor.spec, self.predictor.postprocess
        info = {"model_name": spec.model_name, "paddlex_model_name": paddlex_model_name(spec.model_name),
                "class_num": spec.class_num,
                "label_names": post.label_names, "image_shape": spec.image_shape,
                "preprocessing": self.predictor.preprocess.ops, "topk": post.topk,
                "temperature": post.temperature, "calibration": spec.calibration,
                "reject_threshold": post.reject_threshold, "unknown_class_id": UNKNOWN_ID,
                "schema_version": spec.schema_version, "model_file": self.predictor.model_file.name,
                "engine": self.predictor.engine,
                "batching": {"max_batch": self.batcher.max_batch,
                             "max_wait_ms": self.batcher.max_wait * 1000.0},
                "limits": asdict(self.limits)}
        cert = self.predictor.model_dir / CERTIFICATE_FILE
        if cert.is_file():
            info["certificate"] = json.loads(cert.read_text(encoding="utf-8"))
        return info


def _require_fastapi():
    import importlib.util

    # python-multipart parses form uploads; it installs the module python_multipart.
    for module in ("fastapi", "uvicorn", "python_multipart"):
        if importlib.util.find_spec(module) is None:
            raise ConfigError("serve", f"the HTTP service needs {module.replace('_', '-')}, which is "
                                       f"not installed: run `{SERVE_HINT}`")


def create_app(service):
    """The FastAPI app around a ``ClassifierService``; its batcher runs while the app does."""
    _require_fastapi()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        try:
            yield
        finally:
            service.batcher.stop()

    app = FastAPI(title="ppcls_ft classifier", lifespan=lifespan)

    def error(status, message):
        return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):  # unknown route, wrong method: same JSON layout
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(_request, exc):
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    def check_length(request):
        """Refuse a body above the request limit before reading it (Content-Length)."""
        limit = service.limits.max_images * service.limits.max_bytes * 4 // 3 + 65536  # base64 +1/3
        length = request.headers.get("content-length")
        if length is None:
            raise ServiceError(411, "send a Content-Length header (chunked uploads are not accepted)")
        if not length.isdigit() or int(length) > limit:
            raise ServiceError(413, f"request body of {length} bytes is more than the limit of "
                                    f"{limit} (--max_images x --max_bytes); split the request")

    async def images_from_request(request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=service.limits.max_images + 1, max_fields=16)
            except StarletteHTTPException as exc:
                raise ServiceError(400, f"bad multipart body: {exc.detail}") from None
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            images = [(f"file {i} ({v.filename})", await v.read(), v.filename or None)
                      for i, v in enumerate(uploads)]
            return images, form.get("topk")
        if ctype.startswith("application/json"):
            body = await json_body(request)
            if "images" in body:
                items = body["images"]
                if not isinstance(items, list):
                    raise ServiceError(400, "images: expected a list of base64 strings")
            elif "image" in body:
                items = [body["image"]]
            else:
                raise ServiceError(400, "JSON body needs \"images\": [<base64>, ...] (or \"image\": <base64>)")
            images = [(f"images[{i}]", decode_base64(t, f"images[{i}]"), None) for i, t in enumerate(items)]
            return images, body.get("topk")
        raise ServiceError(415, f"Content-Type {ctype or 'missing'}: send multipart/form-data (field "
                                "'file') or application/json {\"images\": [<base64>, ...]}")

    async def json_body(request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ServiceError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ServiceError(400, "the JSON body must be an object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", **service.batcher.stats}

    @app.get("/model")
    async def model():
        return service.model_info()

    @app.post("/predict")
    async def predict(request: Request):
        try:
            check_length(request)
            images, topk = await images_from_request(request)
            topk = parse_topk(request.query_params.get("topk", topk), service.class_num)
            return {"results": await service.classify(images, topk)}
        except ServiceError as exc:
            return error(exc.status, exc.message)

    @app.post("/image-classification")
    async def paddlex_infer(request: Request):
        """PaddleX's image-classification serving operation (``infer``)."""
        try:
            check_length(request)
            body = await json_body(request)
            if "image" not in body:
                raise ServiceError(400, "image: required (base64 of the image file)")
            params = body.get("inferenceParams") or {}
            if not isinstance(params, dict):
                raise ServiceError(400, "inferenceParams: expected an object such as {\"topK\": 5}")
            topk = parse_topk(params.get("topK"), service.class_num, "inferenceParams.topK")
            res, = await service.classify([("image", decode_base64(body["image"], "image"), None)], topk)
        except ServiceError as exc:
            return JSONResponse({"errorCode": exc.status, "errorMsg": exc.message}, status_code=exc.status)
        names = res["label_names"] or [str(c) for c in res["class_ids"]]
        categories = [{"id": c, "name": n, "score": s}
                      for c, n, s in zip(res["class_ids"], names, res["scores"])]
        return {"errorCode": 0, "errorMsg": "Success", "result": {"categories": categories}}

    return app


def serve(model_dir, host="127.0.0.1", port=8080, *, max_batch=8, max_wait_ms=5.0, limits=None,
          reject_threshold=None, cpu_threads=None, log_level="info", engine=None):
    """Load ``model_dir`` and serve it until interrupted (one process, one predictor)."""
    _require_fastapi()
    import uvicorn

    from .predictor import Predictor

    predictor = Predictor(model_dir, batch_size=max_batch, cpu_threads=cpu_threads,
                          reject_threshold=reject_threshold, engine=engine)
    app = create_app(ClassifierService(predictor, limits, max_batch, max_wait_ms))
    uvicorn.run(app, host=host, port=int(port), log_level=log_level)
