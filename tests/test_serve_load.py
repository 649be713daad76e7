"""Serving under load: 2,000 requests, 32 concurrent clients, valid, malformed and adversarial mixed, over real
HTTP."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_server_survives_mixed_load(tmp_path):
    from anpyc.export.exporter import export_all
    from anpyc.export.testing import timm_source

    export = tmp_path / "export"
    export_all(timm_source("test_resnet", tasks=2, img_size=32), export)
    res = _bench().run_load(export, requests=2000, concurrency=32, steady_malloc=True)  # RSS moves with leaks only
    assert res["requests"] == 2000 and res["valid"] > 1000 and res["malformed"] > 600, res
    assert res["failed_valid"] == 0, res["examples_failed_valid"]
    assert res["malformed_not_4xx"] == 0, res["examples_not_4xx"]
    assert res["server_alive"] and res["server_500s"] == 0 and res["tracebacks_logged"] == 0
    statuses = {k: set(v["statuses"]) for k, v in res["by_kind"].items()}
    assert statuses["oversized"] == {"413"} and statuses["content_type"] == {"415"}
    assert statuses["unknown_task"] == {"404"} and statuses["wrong_shape"] == {"422"}
    # adversarial: refused in little memory, or (a huge JPEG, a 16-megapixel PNG) answered within the limits
    assert statuses["wide_png"] == statuses["huge_png"] == statuses["deep_json"] == statuses["digits_json"] == {"400"}
    assert statuses["odd_task"] == {"404"} and statuses["odd_method"] == {"405"}
    assert statuses["huge_jpeg"] == statuses["rgba_16mp"] == {"200"}
    assert res["rss_end_mb"] - res["rss_warm_mb"] < 50, (res["rss_warm_mb"], res["rss_end_mb"])
    assert res["rss_peak_mb"] < 1024, res["rss_peak_mb"]
