"""The fuzz suite's worker: mutates every file format anpyc reads, and requests to every HTTP endpoint, and feeds
each case to the code that reads it, in one process under a memory limit (tests/test_fuzz.py starts it).

    python tests/fuzz_worker.py --fixtures DIR --work DIR --out report.json --examples 200 [--formats run,state,...]

``DIR`` holds ``run/`` (a trained run with data.json) and ``export/`` (its export). For each format, hypothesis
draws mutations of the pristine file (types, sizes, ranges, missing and extra keys, truncation, huge declared
shapes, deep nesting, paths that leave the folder); each case is written into a fresh copy of the folder (a
mutated state file gets a matching sha256 in run.json, as a crafted run would have) and read by what reads it:
``anpyc inspect`` and ``ContinualLearner.load`` (+ every task's subnetwork, the export path), ``load_export`` with
every session made + predictions, ``anpyc predict --format csv``, ``anpyc train --config``, ``anpyc eval`` (data.json),
and the FastAPI app. A case passes when it ends in a valid answer or a one-line AnpycError (exit 2 for the CLI,
a 4xx or 503 JSON error over HTTP) within 30 s, having opened no file outside its folder (an audit hook watches
every open). The memory limit (RLIMIT_AS, set after the imports) turns a memory bomb into a recorded failure
instead of a machine brought down. The report lists counts per outcome and every failure with its traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# values that are wrong in every way a file can be wrong
OUTSIDE = ["/etc/passwd", "/dev/zero", "../outside/secret.txt", "../../outside/secret.txt", "..", ".", "", "/",
           "state/../../outside/secret.txt", "a/b.safetensors", "task-000.onnx\x00", "~/x", "C:\\x", " ",
           ".hidden", "trunk.safetensors/", "\x1b[31mred\x1b[0m"]
TEXTS = ["²", "٣", "1" * 5000, "-1", "0x10", "1e3", "nan", "NaN", "Infinity", "x" * 70000, "\u202e", "None",
         "true", "anpyc", "nonexistent", "RGB", "unit", "image", "vector", "done", "train", "uint8", "int16"]
NUMBERS = [0, -1, 1, 2, 3, 255, 256, 32767, 32768, 2 ** 31, 2 ** 53 + 1, 10 ** 18, 10 ** 100, -(10 ** 100),
           0.0, -0.0, 0.5, 1e-300, 1e300, 1.5, -2.5]
SHAPES = [[1, 100000, 100000], [3, 0, 16], [3, -16, 16], [3, 16], [10 ** 9], [2 ** 31, 2 ** 31], [], [3, 16, 16, 16],
          [4, 4096, 4096], [1, 1, 1]]


# ------------------------------------------------------------------------------------------------ strategies

def strategies():
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(), st.booleans(), st.sampled_from(NUMBERS), st.integers(-(2 ** 70), 2 ** 70),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(OUTSIDE + TEXTS),
        st.sampled_from(SHAPES))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=6)
    return st, scalars, values


def pick_path(data, doc) -> tuple:
    """A path into ``doc`` drawn level by level (every key of a level equally likely, a quarter of the time
    stopping at an inner node, one time in twenty the root), so the last keys of a long document are as likely as
    its first. The choices come from a random generator hypothesis seeds (its own integers favour small values)."""
    from hypothesis import strategies as st

    rnd = data.draw(st.randoms(use_true_random=True), label="path")  # seeded by hypothesis
    path, node = (), doc
    if rnd.random() < 0.05:
        return path
    while isinstance(node, (dict, list)) and node:
        if path and rnd.random() < 0.25:
            break
        keys = list(node) if isinstance(node, dict) else list(range(min(len(node), 8)))
        key = rnd.choice(keys)
        path, node = path + (key,), node[key]
    return path


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def mutate_json(data, doc, label):
    """A mutated copy of ``doc`` as text, with a description: 1-3 structural mutations, or a textual one."""
    import copy

    st, scalars, values = strategies()
    kind = data.draw(st.sampled_from(["tree"] * 8 + ["text"] * 2), label=f"{label} kind")
    doc = copy.deepcopy(doc)
    if kind == "text":
        text = json.dumps(doc, indent=1)
        how = data.draw(st.sampled_from(["truncate", "bytes", "empty", "deep", "nan", "notjson"]), label="text")
        if how == "truncate":
            cut = data.draw(st.integers(0, max(0, len(text) - 1)), label="cut")
            return text[:cut].encode(), f"truncated at {cut}"
        if how == "bytes":
            pos = data.draw(st.integers(0, max(0, len(text) - 1)), label="pos")
            junk = data.draw(st.binary(min_size=1, max_size=16), label="junk")
            return text[:pos].encode() + junk + text[pos:].encode(), f"bytes at {pos}"
        if how == "empty":
            return b"", "empty file"
        if how == "deep":
            return ("[" * 200000 + "]" * 200000).encode(), "nested 200,000 deep"
        if how == "nan":
            return text.replace("0", "NaN", 1).encode(), "a NaN"
        return b"\xff\xfe not json", "not JSON"
    descs = []
    for _ in range(data.draw(st.integers(1, 3), label="count")):
        path = pick_path(data, doc)
        try:
            node = _get(doc, path)
        except (KeyError, IndexError, TypeError):
            continue
        op = data.draw(st.sampled_from(["replace", "replace", "delete", "add", "number", "list", "wrap",
                                        "deep", "shape", "outside"]), label="op")
        value = copy.deepcopy(data.draw(values, label="value"))  # SHAPES' lists are shared: never mutate them
        parent = _get(doc, path[:-1]) if path else None
        if op == "delete" and path:
            del parent[path[-1]]
        elif op == "add" and isinstance(node, dict):
            node[data.draw(st.text(max_size=10), label="key")] = value
        elif op == "number" and isinstance(node, (int, float)) and not isinstance(node, bool) and path:
            parent[path[-1]] = data.draw(st.sampled_from([-node, node * 1000 + 7, 0, -1, node + 1, 2 ** 63,
                                                          float(node) + 0.5, 10 ** 30]), label="num")
        elif op == "list" and isinstance(node, list) and path:
            n = data.draw(st.sampled_from([0, 1, 2, 1000, 100000]), label="len")
            parent[path[-1]] = (node * (n // max(1, len(node)) + 1))[:n] if node else [value] * n
        elif op == "wrap" and path:
            parent[path[-1]] = copy.deepcopy(data.draw(st.sampled_from([[node], {"v": node}, str(node), None]),
                                                       label="wrap"))
        elif op == "deep" and path:
            parent[path[-1]] = "__DEEP__"
        elif op == "shape" and path:
            parent[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(SHAPES), label="shape"))
        elif op == "outside" and path:
            parent[path[-1]] = data.draw(st.sampled_from(OUTSIDE), label="outside")
        elif path:
            parent[path[-1]] = value
        else:
            doc = value
        descs.append(f"{op} {'/'.join(map(str, path)) or '<root>'}")
    text = json.dumps(doc, allow_nan=True).replace('"__DEEP__"', "[" * 5000 + "]" * 5000)
    return text.encode(), "; ".join(descs) or "unchanged"


# ------------------------------------------------------------------------------------------------ safetensors

def split_safetensors(raw: bytes):
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    if "schema" in meta:
        meta["schema"] = json.loads(meta["schema"])
    return {"header": header, "metadata": meta, "data": list(raw[8 + n:])}


def join_safetensors(doc) -> bytes:
    if not isinstance(doc, dict):
        return json.dumps(doc).encode()
    header = dict(doc.get("header") or {}) if isinstance(doc.get("header"), dict) else {"x": doc.get("header")}
    meta = doc.get("metadata")
    if isinstance(meta, dict):
        meta = {k: (json.dumps(v, allow_nan=True) if k == "schema" else v) for k, v in meta.items()}
    header["__metadata__"] = meta
    head = json.dumps(header, allow_nan=True).replace('"__DEEP__"', "[" * 5000 + "]" * 5000).encode()
    data = doc.get("data")
    body = bytes(int(v) % 256 for v in data if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and abs(v) < 1e18) if isinstance(data, list) else b""
    return len(head).to_bytes(8, "little") + head + body


# ------------------------------------------------------------------------------------------------ the cases

class Case:
    """One format: its file, how a mutation is written, and what reads it."""

    def __init__(self, name, fixtures: Path, work: Path):
        self.name, self.fixtures, self.work = name, fixtures, work
        run = fixtures / "run"
        gen = json.loads((run / "run.json").read_text())["generation"]
        self.state_rel = Path("state") / f"{gen:06d}"
        self.folder = "export" if name in ("sidecar", "manifest", "http") else "run"
        self.rel = {"run": Path("run.json"), "state": self.state_rel / "state.json",
                    "masks": self.state_rel / "masks.safetensors", "sidecar": Path("task-000.json"),
                    "manifest": Path("manifest.json"), "data": Path("data.json"),
                    "config": Path("config.json"), "http": None}[name]
        src = fixtures / self.folder / self.rel if self.rel else None
        if name == "masks":
            self.doc = split_safetensors(src.read_bytes())
        elif name == "config":
            self.doc = {"model": {"name": "cnn", "width": 4},
                        **{k: v for k, v in json.loads((run / "config.json").read_text()).items()
                           if k not in ("device", "threads", "workers")}}
        elif src is not None:
            self.doc = json.loads(src.read_text())

    def _fresh(self) -> tuple[Path, Path]:
        case = self.work / "case"
        if case.exists():
            shutil.rmtree(case)
        case.mkdir(parents=True)
        dst = case / self.folder
        shutil.copytree(self.fixtures / self.folder, dst, symlinks=True)
        (dst / "run.lock").unlink(missing_ok=True)
        return case, dst

    def pristine(self) -> Path:
        """A fresh copy of the folder, unmutated (the config file written as it is)."""
        case, _ = self._fresh()
        if self.name == "config":
            (case / "config.toml.json").write_text(json.dumps(self.doc))
        return case

    def prepare(self, data):
        """A fresh copy of the folder with one drawn mutation; returns (case folder, description)."""
        case, dst = self._fresh()
        if self.name == "masks":
            from hypothesis import strategies as st

            if data.draw(st.booleans(), label="raw"):
                raw = (self.fixtures / "run" / self.rel).read_bytes()
                how = data.draw(st.sampled_from(["truncate", "flip", "owners"]), label="raw how")
                if how == "truncate":
                    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
                    blob, desc = raw[:cut], f"truncated at {cut}"
                elif how == "flip":
                    pos = data.draw(st.integers(0, len(raw) - 1), label="pos")
                    blob, desc = raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1:], f"byte {pos} flipped"
                else:
                    owners = data.draw(st.sampled_from([0, 1, 255, 2, 5, 200, 254, 7]), label="owner")
                    blob, desc = raw[:-1] + bytes([owners]), f"last owner {owners}"
            else:
                text, desc = mutate_json(data, self.doc, "masks")
                try:
                    blob = join_safetensors(json.loads(text))
                except (ValueError, RecursionError):
                    blob = text
        elif self.name == "config":
            text, desc = mutate_json(data, self.doc, "config")
            blob = text
        else:
            blob, desc = mutate_json(data, self.doc, self.name)
        target = case / "config.toml.json" if self.name == "config" else dst / self.rel
        target.write_bytes(blob)
        if self.name in ("state", "masks"):  # a crafted run carries the matching hash
            import hashlib

            manifest = json.loads((dst / "run.json").read_text())
            manifest["files"][self.rel.name] = hashlib.sha256(blob).hexdigest()
            (dst / "run.json").write_text(json.dumps(manifest))
        return case, desc


# ------------------------------------------------------------------------------------------------ readers

def _cli(*args) -> tuple[str, str]:
    """('ok' | 'error', detail): exit 0, or exit 2 with one line 'error: ... (...)'; anything else raises."""
    from typer.testing import CliRunner

    from anpyc.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception.with_traceback(r.exc_info[2])
    if r.exit_code == 0:
        return "ok", ""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    if r.exit_code == 2 and "Traceback" not in r.output:
        if len(lines) == 1 and lines[0].startswith("error: ") and "(" in lines[0]:
            _note(lines[0])
            return "error", lines[0]
        if "Usage:" in r.output:  # typer's own usage error (a bad flag value)
            return "error", " ".join(r.output.split())[:200]
    raise AssertionError(f"exit {r.exit_code}: {r.output[-500:]}")


ERRORS: list[str] = []  # a sample of the one-line errors seen (reported)


def _note(line: str) -> None:
    if len(ERRORS) < 400:
        ERRORS.append(line[:220])


def _api(fn, *args, **kwargs):
    from anpyc.errors import AnpycError

    try:
        return "ok", fn(*args, **kwargs)
    except AnpycError as e:
        line = e.one_line
        if "\n" in line or not e.fix:
            raise AssertionError(f"an error of more than one line or without a fix: {line!r}") from None
        _note(line)
        return "error", line


def read_run(case: Path) -> list[str]:
    import anpyc

    run = case / "run"
    outcomes = [_cli("inspect", run)[0]]
    status, learner = _api(anpyc.ContinualLearner.load, run)
    outcomes.append(status)
    if status == "ok":
        learner.metrics()
        for t in learner.task_ids():
            learner.subnetwork(t)
            learner.task_info(t)
    return outcomes


def read_export(case: Path, png: bytes) -> list[str]:
    from anpyc.export.runtime import load_export

    exp = case / "export"
    status, models = _api(load_export, exp, preload=True)
    outcomes = [status]
    if status == "ok":
        for t in models.task_ids:
            spec = models.input_spec(t)
            outcomes.append(_api(models.predict, t, [png] if spec.kind == "image" else
                                 [np.zeros(spec.shape, np.float32)], top_k=3)[0])
        outcomes.append(_api(models.route, [np.zeros(models.input_spec(models.task_ids[0]).shape, np.float32)])[0])
        (case / "x.png").write_bytes(png)
        outcomes.append(_cli("predict", exp, case / "x.png", "--task", str(models.task_ids[0]), "--format", "csv")[0])
    return outcomes


def read_config(case: Path) -> list[str]:
    return [_cli("train", "--config", case / "config.toml.json", "--data", case / "no-such-data", "--out",
                 case / "new-run", "--no-progress", "--no-plots")[0]]


def read_data(case: Path) -> list[str]:
    return [_cli("eval", case / "run", "--task", "0", "--json")[0]]


# ------------------------------------------------------------------------------------------------ HTTP

def http_cases(export: Path, images: dict[str, bytes]):
    """The app (with and without a token) and a function that draws and sends one mutated request."""
    from urllib.parse import quote

    from starlette.testclient import TestClient

    from anpyc.export.server import create_app

    open_client = TestClient(create_app(export), raise_server_exceptions=False)
    token_client = TestClient(create_app(export, token="tok", max_body_bytes=256 * 1024),
                              raise_server_exceptions=False)
    shape = json.loads((export / "task-000.json").read_text())["input_spec"]["shape"]
    sample = np.zeros(shape).round(2).tolist()
    st = strategies()[0]
    ids = ["0", "0", "0", "1", "1", "7", "²", "1" * 5000, "-1", "+0", " 0", "0x1", "%00", "..", "%2e%2e", "\u202e",
           "00", "1e0"]

    def one(data):
        client = data.draw(st.sampled_from([open_client, token_client]), label="client")
        route, method = data.draw(st.sampled_from(
            [("/health", "GET"), ("/health", "HEAD"), ("/tasks", "GET"), ("/tasks/{id}", "GET"),
             ("/tasks/{id}/predict", "POST"), ("/tasks/{id}/predict", "POST"), ("/tasks/{id}/predict", "POST"),
             ("/predict", "POST"), ("/predict", "POST"), ("/metrics", "GET"), ("/{junk}", "GET"),
             ("/tasks/{id}/{junk}", "POST")]), label="route")
        if data.draw(st.integers(0, 3), label="other method") == 0:
            method = data.draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "FOO",
                                                "GETX", "M" * 40]), label="method")
        path = route.replace("{id}", quote(data.draw(st.sampled_from(ids), label="id"), safe="%+")).replace(
            "{junk}", quote(data.draw(st.text(max_size=10), label="junk"), safe=""))
        params = {}
        if data.draw(st.booleans(), label="query"):
            params["top_k"] = data.draw(st.sampled_from(["0", "1", "3", "-1", "1000", "1001", "²", "1" * 5000,
                                                         "nan", "", "1e3", "2"]), label="top_k")
        headers = {}
        if client is token_client:
            headers["authorization"] = data.draw(st.sampled_from(["Bearer tok"] * 6 + ["Bearer x", "tok", "Basic tok",
                                                                                        "Bearer " + "t" * 5000]),
                                                 label="auth")
        body = data.draw(st.sampled_from(["none", "json", "json-mutated", "deep", "digits", "bytes", "multipart",
                                          "multipart-many", "multipart-garbage", "form"]), label="body")
        kw = {}
        if body == "json":
            kw["json"] = {"inputs": [sample] * data.draw(st.integers(1, 3), label="batch")}
        elif body == "json-mutated":
            text, _ = mutate_json(data, {"inputs": [sample]}, "request")
            kw["content"], headers["content-type"] = text, "application/json"
        elif body == "deep":
            kw["content"], headers["content-type"] = b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", \
                "application/json"
        elif body == "digits":
            kw["content"], headers["content-type"] = b'{"inputs": [' + b"9" * 6000 + b"]}", "application/json"
        elif body == "bytes":
            kw["content"] = data.draw(st.binary(max_size=64), label="bytes")
            headers["content-type"] = data.draw(st.sampled_from(["application/json", "multipart/form-data",
                                                                 "text/plain", "image/png", "", "x" * 300,
                                                                 "multipart/form-data; boundary=zz"]), label="ctype")
        elif body in ("multipart", "multipart-many"):
            n = 1 if body == "multipart" else data.draw(st.sampled_from([2, 20, 300]), label="files")
            img = data.draw(st.sampled_from(sorted(images)), label="image")
            name = data.draw(st.sampled_from(["a.png", "\x1b[31m.png", "x" * 2000, "", "../../etc/passwd"]),
                             label="filename")
            kw["files"] = [("f", (name, images[img], "image/png"))] * n
        elif body == "multipart-garbage":
            kw["content"] = b"--zz\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\n" + \
                data.draw(st.binary(max_size=64), label="part")
            headers["content-type"] = "multipart/form-data; boundary=zz"
        elif body == "form":
            kw["data"] = {"a": "b"}
        response = client.request(method, path, params=params, headers=headers, **kw)
        desc = f"{method} {path[:60]} {params} body={body}"
        status = response.status_code
        if status >= 500 and not (status == 503 and response.json().get("error") == "Busy"):
            raise AssertionError(f"HTTP {status}: {response.text[:300]}")
        STATUSES[status] = STATUSES.get(status, 0) + 1
        if method == "HEAD":
            return desc, "ok" if status < 400 else "error"
        payload = json.loads(response.content, parse_constant=_no_constant) \
            if response.headers.get("content-type", "").startswith("application/json") else None
        if status >= 400:
            one_line = isinstance(payload, dict) and set(payload) == {"error", "detail"} and \
                "\n" not in payload["detail"]
            if not one_line:
                raise AssertionError(f"HTTP {status} without a one-line JSON error: {response.text[:300]}")
            return desc, "error"
        return desc, "ok"

    def series() -> int:
        text = open_client.get("/metrics").text
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    return one, series


STATUSES: dict[int, int] = {}  # HTTP statuses seen (reported)


def _no_constant(name):
    raise AssertionError(f"the answer holds {name}, which is not JSON")


def hostile_images() -> dict[str, bytes]:
    from PIL import Image

    def enc(img, fmt="PNG", **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    png = enc(Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)))
    return {"valid": png, "wide": enc(Image.new("L", (1_000_000, 1), 7)),
            "tall": enc(Image.new("RGB", (1, 40_000), (1, 2, 3))),
            "big-png": enc(Image.new("RGB", (12_000, 12_000), (1, 2, 3))),
            "big-jpeg": enc(Image.new("RGB", (8_000, 8_000), (1, 2, 3)), "JPEG", quality=30),
            "rgba": enc(Image.new("RGBA", (64, 48), (1, 2, 3, 4))), "gray16": enc(Image.new("I;16", (40, 40))),
            "gif": enc(Image.new("P", (40, 40)), "GIF"), "truncated": png[: len(png) // 2],
            "garbage": b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "empty": b""}


# ------------------------------------------------------------------------------------------------ main

class Opens:
    """An audit hook recording every file opened outside the allowed folders."""

    def __init__(self):
        self.allowed: list[str] = []
        self.outside: list[str] = []
        self.active = False
        fixed = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(ROOT), "/usr", "/lib", "/proc", "/sys",
                 "/dev/null", "/dev/urandom", "/opt", "/etc/localtime", "/etc/ld.so.cache"}
        fixed |= {p for p in sys.path if p}
        self.fixed = sorted({os.path.realpath(p) for p in fixed})
        sys.addaudithook(self)

    def __call__(self, event, args):
        if not self.active or event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        try:
            path = os.path.realpath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if not any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.fixed + self.allowed):
            self.outside.append(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--formats", default="run,state,masks,sidecar,manifest,config,data,http")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--budget-mb", type=int, default=3072)
    args = ap.parse_args()

    import torch

    import anpyc
    from anpyc.export.runtime import load_export

    torch.set_num_threads(1)
    if os.environ.get("ANPYC_FUZZ_SABOTAGE") == "1":
        sabotage()
    images = hostile_images()
    fixtures = args.fixtures.resolve()
    work = args.work.resolve()
    # warm up every reader on the pristine folders (lazy imports, caches), then limit the address space
    anpyc.ContinualLearner.load(fixtures / "run")
    load_export(fixtures / "export", preload=True)
    cases = {name: Case(name, fixtures, work) for name in args.formats.split(",") if name != "http"}
    http = http_cases(fixtures / "export", images) if "http" in args.formats.split(",") else None
    for name in ("run", "sidecar", "config", "data"):
        if name in cases:
            outcomes = _read(name, cases[name].pristine(), images["valid"])
            expected = ["error"] if name == "config" else ["ok"] * len(outcomes)  # config: --data names nothing
            if outcomes != expected:
                raise SystemExit(f"the pristine {name} case gives {outcomes}, not {expected}")
    vm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize:")))
    limit = vm * 1024 + args.budget_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    opens = Opens()
    report = {"formats": {}, "budget_mb": args.budget_mb, "vm_before_mb": vm // 1024,
              "rss_before_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}

    def alarm(signum, frame):
        raise TimeoutError("the case ran for more than 30 s")

    signal.signal(signal.SIGALRM, alarm)
    for name in args.formats.split(","):
        run_format(name, args, report, cases, http, opens, fixtures, images)
    if http is not None:
        report["metrics_series"] = http[1]()
        report["http_statuses"] = {str(k): v for k, v in sorted(STATUSES.items())}
    report["error_sample"] = ERRORS[::max(1, len(ERRORS) // 40)]
    report["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    args.out.write_text(json.dumps(report, indent=1))


def run_format(name, args, report, cases, http, opens, fixtures, images) -> None:
    """Draw ``args.examples`` cases of format ``name`` and record each outcome in ``report``."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st

    result = {"cases": 0, "ok": 0, "error": 0, "failures": [], "outside": []}
    report["formats"][name] = result
    t0 = time.time()

    def run_one(data):
        desc = "?"
        case = None
        signal.alarm(30)
        try:
            if name == "http":
                opens.allowed = [str(fixtures / "export")]
                opens.active = True
                desc, outcome = http[0](data)
                outcomes = [outcome]
            else:
                case, desc = cases[name].prepare(data)
                opens.allowed = [str(case)]
                if name == "data":  # data.json names where the data lives: reading there is its job
                    source = _source_of(case / "run" / "data.json")
                    if source:
                        opens.allowed.append(os.path.realpath(source))
                opens.active = True
                outcomes = _read(name, case, images["valid"])
            result["ok" if all(o == "ok" for o in outcomes) else "error"] += 1
            result["cases"] += 1
        except BaseException as e:  # noqa: BLE001 - every escape is a finding
            if isinstance(e, KeyboardInterrupt) or type(e).__module__.startswith("hypothesis"):
                raise  # hypothesis' own control flow (a draw past the end of its buffer), not a finding
            result["cases"] += 1
            result["failures"].append({"case": desc, "error": f"{type(e).__name__}: {str(e)[:300]}",
                                       "traceback": traceback.format_exc()[-3000:]})
        finally:
            signal.alarm(0)
            opens.active = False
            if opens.outside:
                result["outside"].append({"case": desc, "paths": sorted(set(opens.outside))[:5]})
                opens.outside.clear()

    test = settings(max_examples=args.examples, deadline=None, database=None, derandomize=args.seed is None,
                    suppress_health_check=list(HealthCheck), phases=["generate"])(given(st.data())(run_one))
    if args.seed is not None:
        test = seed(args.seed)(test)
    test()
    result["seconds"] = round(time.time() - t0, 1)


def sabotage() -> None:
    """Undo four of the defences, so the suite can show that it notices (tests/test_fuzz.py, 'has teeth'): run.json
    unchecked, its backbone built without the dry run, task ids read with int() (which takes '²'), input specs of
    any size."""
    import anpyc.checkpoint as checkpoint
    import anpyc.export.runtime as runtime
    import anpyc.rundir as rundir
    import anpyc.task as task

    rundir.check_manifest = lambda doc, where: doc
    checkpoint._dry_build = lambda *args: None
    runtime.parse_task_id = lambda t: int(t) if isinstance(t, (int, str)) else None
    task.MAX_INPUT_ELEMENTS = 1 << 62


def _source_of(path: Path):
    try:
        doc = json.loads(path.read_text())
        return doc.get("source") if isinstance(doc, dict) and isinstance(doc.get("source"), str) else None
    except (ValueError, OSError, RecursionError):
        return None


def _read(name: str, case: Path, png: bytes) -> list[str]:
    if name in ("run", "state", "masks"):
        return read_run(case)
    if name in ("sidecar", "manifest"):
        return read_export(case, png)
    if name == "config":
        return read_config(case)
    return read_data(case)


if __name__ == "__main__":
    main()
