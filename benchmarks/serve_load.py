"""Load test of the HTTP service: N concurrent clients against deploy/serve.py, beside the
in-process Predictor on the same images.

The server runs as its own process (as deployed: deploy/serve.py on 127.0.0.1, a free port); the
clients are threads here, each sending one image per request, back to back, for ``--seconds``.
Reported per client count: p50/p99 latency and images/s. The in-process line is
``Predictor.predict`` on encoded bytes (decode + preprocess + graph), batch 1 and ``--max_batch``.
Both sides share the machine's cores, as they would on a single host.

    python benchmarks/serve_load.py                       # MobileNetV2, random weights, 224 px
    python benchmarks/serve_load.py --model_dir ./inference --clients 1 4 16 --seconds 10

Writes a markdown table to stdout and to docs/benchmarks/serve_load.md. Loopback only.
"""
import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import ppcls_ft  # noqa: E402,F401  (before paddle: the CPU fast path env)

import numpy as np  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(n):
    """Real flower photos from ../shared when present, else synthetic JPEGs."""
    shared = Path(os.environ.get("PPCLS_FT_SHARED", REPO.parent / "shared"))
    photos = sorted((shared / "data" / "flowers5" / "images").rglob("*.jpg"))[:n]
    if photos:
        return [p.read_bytes() for p in photos], f"{len(photos)} flowers5 photos (227x227 JPEG)"
    import cv2
    rng = np.random.default_rng(0)
    imgs = [cv2.imencode(".jpg", rng.integers(0, 255, (227, 227, 3), dtype=np.uint8))[1].tobytes()
            for _ in range(n)]
    return imgs, f"{n} synthetic 227x227 JPEGs"


def default_model(workdir):
    from ppcls_ft import build_model
    from ppcls_ft.engine.export import export_dygraph

    model = build_model({"name": "MobileNetV2", "class_num": 5})
    ops = [{"DecodeImage": {"to_rgb": True, "channel_first": False}},
           {"ResizeImage": {"resize_short": 256}}, {"CropImage": {"size": 224}},
           {"NormalizeImage": {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                               "std": [0.229, 0.224, 0.225], "order": ""}}]
    return export_dygraph(model, Path(workdir) / "MobileNetV2", [3, 224, 224], ops,
                          model_name="MobileNetV2"), "MobileNetV2 (random weights), 224 px"


def start_server(model_dir, port, args):
    cmd = [sys.executable, str(REPO / "deploy" / "serve.py"), "--model_dir", str(model_dir),
           "--port", str(port), "--max_batch", str(args.max_batch),
           "--max_wait_ms", str(args.max_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx
    for _ in range(600):  # 60 s at most
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("server did not answer /health within 60 s")


def load(url, images, clients, seconds):
    """``clients`` threads posting one image per request for ``seconds``; latencies in s."""
    import httpx

    latencies, lock, errors = [], threading.Lock(), []
    stop_at = time.perf_counter() + seconds

    def client(k):
        with httpx.Client(base_url=url, timeout=60) as c:
            i = k
            while time.perf_counter() < stop_at:
                img = images[i % len(images)]
                t0 = time.perf_counter()
                r = c.post("/predict", files={"file": ("x.jpg", img, "image/jpeg")})
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(r.text)
                    return
                with lock:
                    latencies.append(dt)
                i += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"server answered an error: {errors[0][:500]}")
    lat = np.array(latencies) * 1000.0
    return {"requests": len(lat), "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "ips": len(lat) / wall}


def in_process(model_dir, images, batch, seconds):
    from ppcls_ft.predictor import Predictor

    p = Predictor(model_dir, batch_size=batch)
    p.predict(images[:batch])  # warm-up: the engines build their kernels on the first run
    n, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [images[(i + j) % len(images)] for j in range(batch)]
        p.predict(chunk)
        n, i = n + batch, i + batch
    return n / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_dir", default=None, help="default: export MobileNetV2 (random weights)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=8.0, help="per client count")
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--max_wait_ms", type=float, default=5.0)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "serve_load.md"))
    args = ap.parse_args(argv)

    import logging

    from ppcls_ft.utils.device import available_cores

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    images, image_note = sample_images(64)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir:
            model_dir, model_note = Path(args.model_dir), f"`{args.model_dir}`"
        else:
            model_dir, model_note = default_model(tmp)
        local = {b: in_process(model_dir, images, b, args.seconds) for b in (1, args.max_batch)}
        port = free_port()
        server = start_server(model_dir, port, args)
        try:
            url = f"http://127.0.0.1:{port}"
            import httpx
            info = httpx.get(url + "/model").json()
            model_note = (f"{info['model_name']} at {info['image_shape'][-1]} px "
                          f"(engine {info.get('engine', 'oneDNN')}, {model_note})")
            load(url, images, 1, 1.0)  # warm-up
            rows = []
            for n in args.clients:
                r = load(url, images, n, args.seconds)
                rows.append((n, r))
                print(f"{n} clients: {r['requests']} requests, p50 {r['p50']:.1f} ms, "
                      f"p99 {r['p99']:.1f} ms, {r['ips']:.1f} images/s", flush=True)
            stats = httpx.get(url + "/health").json()
        finally:
            server.terminate()
            server.wait(timeout=30)
    text = markdown(rows, local, stats, args, model_note, image_note, available_cores())
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")


def markdown(rows, local, stats, args, model_note, image_note, cores):
    cmd = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    lines = [
        "# HTTP service under load (CPU)", "",
        f"Generated by `{cmd.strip()}` on {time.strftime('%Y-%m-%d')}: {platform.machine()}, "
        f"{cores} cores shared by server and clients, {model_note}, {image_note}, one image per "
        f"request, multipart upload, `--max_batch {args.max_batch} --max_wait_ms {args.max_wait_ms:g}`, "
        f"{args.seconds:g} s per row. Latency is end to end (HTTP, decode, preprocess, batching "
        "wait, graph, JSON).", "",
        "| clients | requests | p50 latency (ms) | p99 latency (ms) | images/s |",
        "| ---: | ---: | ---: | ---: | ---: |"]
    for n, r in rows:
        lines.append(f"| {n} | {r['requests']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['ips']:.1f} |")
    lines += ["", "In-process `Predictor.predict` on the same encoded images (decode + preprocess + graph):", "",
              "| batch | images/s |", "| ---: | ---: |"]
    for b, ips in local.items():
        lines.append(f"| {b} | {ips:.1f} |")
    lines += ["", f"Server counters at the end: {stats['images']} images in {stats['batches']} "
              f"predictor calls, largest batch {stats['largest_batch']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
