"""Serve an exported classifier over HTTP (FastAPI + uvicorn; pip install -e .[serve]).

    python deploy/serve.py --model_dir ./inference [--host 127.0.0.1] [--port 8080]

POST /predict (multipart files or JSON base64), POST /image-classification (PaddleX layout),
GET /health, GET /model. All logic lives in ppcls_ft/service.py; docs/deploy.md §3.
"""
import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if (_ROOT / "ppcls_ft").is_dir():  # in a checkout: its own library, not another installed copy
    sys.path.insert(0, str(_ROOT))

from ppcls_ft.engine.cli import exit_on_user_error  # noqa: E402
from ppcls_ft.runtimes import ENGINE_CHOICES  # noqa: E402
from ppcls_ft.service import Limits  # noqa: E402


def parse_args(argv=None):
    d = Limits()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="folder written by tools/export_model.py")
    # Loopback by default: exposing the service is a decision (--host 0.0.0.0), not an accident.
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max_batch", type=int, default=8, help="images per predictor call")
    p.add_argument("--max_wait_ms", type=float, default=5.0,
                   help="how long the first image of a batch waits for others")
    p.add_argument("--max_bytes", type=int, default=d.max_bytes, help="per encoded image")
    p.add_argument("--max_pixels", type=int, default=d.max_pixels, help="per image, width x height")
    p.add_argument("--max_images", type=int, default=d.max_images, help="per request")
    p.add_argument("--reject_threshold", type=float, default=None,
                   help="answer 'unknown' (class id -1) below this top score; default: inference.yml's")
    p.add_argument("--cpu_threads", type=int, default=None, help="default: every core this process may use")
    p.add_argument("--engine", default=None, choices=ENGINE_CHOICES,
                   help="CPU engine; default auto: the export's fastest certified one (docs/deploy.md)")
    return p.parse_args(argv)


def main(argv=None):
    from ppcls_ft.service import serve

    a = parse_args(argv)
    limits = Limits(max_bytes=a.max_bytes, max_pixels=a.max_pixels, max_images=a.max_images)
    exit_on_user_error(lambda: serve(a.model_dir, a.host, a.port, max_batch=a.max_batch,
                                     max_wait_ms=a.max_wait_ms, limits=limits,
                                     reject_threshold=a.reject_threshold, cpu_threads=a.cpu_threads,
                                     engine=a.engine))


if __name__ == "__main__":
    main()
