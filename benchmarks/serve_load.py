"""Serving under load: `anpyc serve` against 2,000 requests from 32 concurrent clients, valid, malformed and
adversarial mixed.

    python benchmarks/serve_load.py [--requests 2000] [--concurrency 32] [--write]

Builds a small export (a timm model trained briefly on two digits tasks), starts the real server in a
subprocess (`python -m anpyc.cli serve`), and fires a shuffled mix of requests: image uploads and JSON tensors
(valid), oversized bodies, wrong content types, garbage bytes, garbage JSON, wrong shapes, NaN inputs and
unknown tasks (malformed), and adversarial ones: images that decode (or would resize) to gigabytes (a 1 KB
1,000,000 x 1 PNG, a 450 KB 12,000 x 12,000 PNG), a 12,000 x 12,000 JPEG (valid: decoded at reduced scale), a
16-megapixel RGBA PNG (valid, at the pixel limit), JSON nested 100,000 deep, a 6,000-digit number, task ids
like '²' and made-up HTTP methods. Checks: every valid request answered 200 with predictions, every malformed
one a 4xx, the server still healthy at the end, its resident memory stable after warm-up and its peak (VmHWM)
under 1 GB. Latency percentiles of valid requests go to BENCHMARKS.md (with --write).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_export(out: Path) -> Path:
    """Train test_resnet briefly on two digits tasks and export both (parity-checked)."""
    import torch

    import anpyc
    from anpyc.adapters.data import make_stream
    from anpyc.configure import method_config
    from anpyc.export.exporter import export_all

    torch.set_num_threads(2)
    stream = make_stream("digits-split", img_size=32).take(2)
    cfg = method_config("anpyc", **{"optim.epochs": 2, "optim.batch_size": 32, "prune.mode": "schedule",
                                    "prune.first_ratio": 0.5, "prune.step": 0.5, "prune.retrain_epochs": 1})
    learner = anpyc.ContinualLearner("test_resnet", input_spec=stream.input_spec, config=cfg)
    learner.fit(stream)
    export_all(learner, out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _png(rng: random.Random, size: int = 8) -> bytes:
    from PIL import Image

    arr = np.array([[rng.randrange(256) for _ in range(size)] for _ in range(size)], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _encoded(img, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def adversarial_images() -> dict[str, bytes]:
    """Small files that decode (or would resize) to gigabytes, and large ones within the limits."""
    from PIL import Image

    return {"wide_png": _encoded(Image.new("L", (1_000_000, 1), 7)),
            "huge_png": _encoded(Image.new("RGB", (12_000, 12_000), (1, 2, 3))),
            "huge_jpeg": _encoded(Image.new("RGB", (12_000, 12_000), (1, 2, 3)), "JPEG", quality=30),
            "rgba_16mp": _encoded(Image.new("RGBA", (4000, 4000), (1, 2, 3, 4)))}


VALID = ("upload", "tensor", "huge_jpeg", "rgba_16mp")


HEAVY = ("huge_jpeg", "rgba_16mp", "huge_png", "wide_png", "oversized", "deep_json")  # the largest allocations


def make_requests(n: int, shape: tuple[int, ...], tasks: list[int], seed: int = 0) -> list[dict]:
    """A shuffled mix: ~60% valid (uploads and tensors), ~30% malformed of seven kinds, ~10% adversarial of nine."""
    rng = random.Random(seed)
    sample = np.random.default_rng(seed).standard_normal(shape).round(3).tolist()
    kinds = (["upload"] * 30 + ["tensor"] * 30 + ["oversized"] * 2 + ["content_type"] * 6 + ["garbage_image"] * 6
             + ["garbage_json"] * 4 + ["wrong_shape"] * 4 + ["nan"] * 4 + ["unknown_task"] * 4
             + ["wide_png", "huge_png", "huge_jpeg", "rgba_16mp", "deep_json", "digits_json", "odd_task",
                "odd_method"])
    images = adversarial_images()
    reqs = []
    for i in range(n):
        kind = rng.choice(kinds)
        t = rng.choice(tasks)
        r = {"kind": kind, "valid": kind in VALID, "path": f"/tasks/{t}/predict"}
        if kind in images:
            r["files"] = [("file", (f"{kind}.img", images[kind], "image/png"))]
        elif kind == "deep_json":
            r["content"] = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            r["headers"] = {"content-type": "application/json"}
        elif kind == "digits_json":
            r["content"] = b'{"inputs": [' + b"9" * 6000 + b"]}"
            r["headers"] = {"content-type": "application/json"}
        elif kind == "odd_task":
            r["path"] = "/tasks/²/predict"
            r["json"] = {"inputs": [sample]}
        elif kind == "odd_method":
            r["method"] = f"FOO{i}"
            r["json"] = {"inputs": [sample]}
        elif kind == "upload":
            r["files"] = [("file", (f"d{i}.png", _png(rng), "image/png"))]
        elif kind == "tensor":
            r["json"] = {"inputs": [sample]}
        elif kind == "oversized":
            r["content"] = b"0" * (9 * 1024 * 1024)
            r["headers"] = {"content-type": "application/json"}
        elif kind == "content_type":
            r["content"] = b"hello"
            r["headers"] = {"content-type": "text/plain"}
        elif kind == "garbage_image":
            r["files"] = [("file", ("x.png", os.urandom(200), "image/png"))]
        elif kind == "garbage_json":
            r["content"] = b"{not json" + os.urandom(20)
            r["headers"] = {"content-type": "application/json"}
        elif kind == "wrong_shape":
            r["json"] = {"inputs": [[1.0, 2.0, 3.0]]}
        elif kind == "nan":
            r["content"] = json.dumps({"inputs": [sample]}).replace("0.", "NaN", 1).encode()
            r["headers"] = {"content-type": "application/json"}
        elif kind == "unknown_task":
            r["path"] = "/tasks/999/predict"
            r["json"] = {"inputs": [sample]}
        reqs.append(r)
    return reqs


async def _fire(base: str, reqs: list[dict], concurrency: int) -> list[dict]:
    import httpx

    results: list[dict] = [None] * len(reqs)  # type: ignore[list-item]
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(reqs)):
        queue.put_nowait(i)

    async def worker(client):
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = reqs[i]
            t0 = time.perf_counter()
            try:
                resp = await asyncio.wait_for(client.request(r.get("method", "POST"), base + r["path"],
                                                             files=r.get("files"), json=r.get("json"),
                                                             content=r.get("content"), headers=r.get("headers")), 30)
                status, body = resp.status_code, resp.content
            except asyncio.TimeoutError:
                status, body = -2, b"client gave up after 30 s"
            except httpx.HTTPError as e:
                status, body = -1, f"{type(e).__name__}: {e}".encode()
            results[i] = {"kind": r["kind"], "valid": r["valid"], "status": status,
                          "ms": (time.perf_counter() - t0) * 1000, "body": body[:300]}

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


# glibc's allocator settings for a leak check: without them, a large buffer freed by one thread raises the mmap
# threshold and the next ones of that size stay in that thread's arena, so the resident size steps up by tens of
# megabytes depending on which thread first meets a 16-megapixel image after warm-up (a step, not a leak)
STEADY_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}


def run_load(export_dir: Path, *, requests: int = 2000, concurrency: int = 32, seed: int = 0,
             steady_malloc: bool = False) -> dict:
    """Start the server on ``export_dir``, send the mix, stop the server; returns the measurements.

    ``steady_malloc`` runs the server with :data:`STEADY_MALLOC`, so its resident size after warm-up moves only
    with what it keeps (the leak check); the benchmark's table uses the allocator's defaults, as a user's server
    does."""
    import httpx

    sidecar = json.loads(next(Path(export_dir).glob("task-*.json")).read_text())
    shape = tuple(sidecar["input_spec"]["shape"])
    tasks = [json.loads(p.read_text())["task"] for p in sorted(Path(export_dir).glob("task-*.json"))]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(STEADY_MALLOC if steady_malloc else {})}
    log = tempfile.TemporaryFile()  # not a pipe: an unread pipe fills up with access-log lines and blocks the server
    server = subprocess.Popen([sys.executable, "-m", "anpyc.cli", "serve", str(export_dir), "--port", str(port),
                               "--threads", "1"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"server did not start: {log.read().decode()[-2000:]}")
            time.sleep(0.2)
        reqs = make_requests(requests, shape, tasks, seed)
        # the warm-up reaches the server's working set: the heaviest requests of the mix come first (decoding a
        # 16-megapixel image at the concurrency limit), so growth after it is a leak, not a first large allocation
        heavy = [i for i, r in enumerate(reqs) if r["kind"] in HEAVY][: 2 * concurrency]
        reqs = [reqs[i] for i in heavy] + [r for i, r in enumerate(reqs) if i not in set(heavy)]
        warm = max(min(200, requests // 10), len(heavy))
        t0 = time.perf_counter()
        first = asyncio.run(_fire(base, reqs[:warm], concurrency))
        rss_warm = _rss_kb(server.pid)
        rest = asyncio.run(_fire(base, reqs[warm:], concurrency))
        wall = time.perf_counter() - t0
        rss_end = _rss_kb(server.pid)
        rss_peak = _rss_kb(server.pid, "VmHWM")
        health = httpx.get(base + "/health", timeout=5.0).status_code
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.seek(0)
        err = log.read()
        log.close()
    results = first + rest
    valid = [r for r in results if r["valid"]]
    bad = [r for r in results if not r["valid"]]
    failed_valid = [r for r in valid if r["status"] != 200 or b"predictions" not in r["body"]]
    not_4xx = [r for r in bad if not 400 <= r["status"] < 500]
    lat = np.array([r["ms"] for r in valid]) if valid else np.zeros(1)
    by_kind: dict[str, dict] = {}
    for r in results:
        k = by_kind.setdefault(r["kind"], {"n": 0, "statuses": {}})
        k["n"] += 1
        k["statuses"][str(r["status"])] = k["statuses"].get(str(r["status"]), 0) + 1
    err_text = err.decode(errors="replace")
    return {
        "requests": len(results), "concurrency": concurrency, "valid": len(valid), "malformed": len(bad),
        "failed_valid": len(failed_valid), "malformed_not_4xx": len(not_4xx),
        "server_alive": alive and health == 200, "server_500s": sum(r["status"] >= 500 for r in results),
        "tracebacks_logged": err_text.count("Traceback"),
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "throughput_rps": len(results) / wall, "wall_s": wall,
        "rss_warm_mb": rss_warm / 1024, "rss_end_mb": rss_end / 1024, "rss_peak_mb": rss_peak / 1024,
        "by_kind": by_kind,
        "examples_not_4xx": [{k: str(v) for k, v in r.items()} for r in not_4xx[:3]],
        "examples_failed_valid": [{k: str(v) for k, v in r.items()} for r in failed_valid[:3]],
    }


def write_section(res: dict, command: str) -> None:
    rows = "\n".join(f"| {k} | {v['n']} | {', '.join(f'{s}: {c}' for s, c in sorted(v['statuses'].items()))} |"
                     for k, v in sorted(res["by_kind"].items()))
    text = f"""<!-- serve:begin -->
## Serving under load

`{command}`

{res['requests']} requests, {res['concurrency']} concurrent clients, one `anpyc serve` process (uvicorn, onnxruntime
1 intra-op thread, the default limits: 16 megapixels, aspect ratio 32, 4 predictions at once, 64 waiting, 8 MiB
bodies), test_resnet task models on 1x32x32 digits, on this shared 2-core CPU machine. The adversarial kinds:
`wide_png` (1 KB, 1,000,000 x 1), `huge_png` (450 KB, 12,000 x 12,000), `huge_jpeg` (12,000 x 12,000, valid:
decoded at 1/4 scale), `rgba_16mp` (4,000 x 4,000 RGBA, valid: at the limit), `deep_json` (nested 100,000 deep),
`digits_json` (a 6,000-digit number), `odd_task` (`/tasks/²/predict`), `odd_method` (`FOO<n>`, a new method each).
The latency of valid requests includes their wait for one of the 4 inference slots behind the valid adversarial
images, which cost up to ~0.3 s of CPU each to decode and preprocess (a 16-megapixel RGBA PNG), on two cores that
another job shares.

| measure | value |
|---|---|
| valid requests failed | {res['failed_valid']} of {res['valid']} |
| malformed requests not answered 4xx | {res['malformed_not_4xx']} of {res['malformed']} |
| server healthy at the end / 5xx answers | {res['server_alive']} / {res['server_500s']} |
| latency of valid requests, p50 / p99 | {res['p50_ms']:.1f} ms / {res['p99_ms']:.1f} ms |
| throughput (all requests) | {res['throughput_rps']:.0f} req/s |
| server RSS after warm-up / at the end | {res['rss_warm_mb']:.1f} MB / {res['rss_end_mb']:.1f} MB |
| server peak RSS (VmHWM) | {res['rss_peak_mb']:.1f} MB |

| request kind | count | status codes |
|---|---|---|
{rows}
<!-- serve:end -->"""
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if "<!-- serve:begin -->" in current:
        head, rest = current.split("<!-- serve:begin -->", 1)
        current = head + text + rest.split("<!-- serve:end -->", 1)[1]
    else:
        current = current.rstrip() + "\n\n" + text + "\n"
    from anpyc.fileio import atomic_write_bytes

    atomic_write_bytes(path, current.encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--export", type=Path, default=None, help="serve this export dir instead of building one")
    ap.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or build_export(Path(tmp) / "export")
        res = run_load(export, requests=args.requests, concurrency=args.concurrency)
    print(json.dumps(res, indent=2))
    if args.write:
        write_section(res, "python benchmarks/serve_load.py --requests "
                           f"{args.requests} --concurrency {args.concurrency} --write")
    ok = (res["failed_valid"] == 0 and res["malformed_not_4xx"] == 0 and res["server_alive"]
          and res["rss_peak_mb"] < 1024)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
