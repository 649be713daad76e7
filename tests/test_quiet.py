"""Library chatter goes to export.log, anpyc's own output stays clean; --verbose shows the chatter."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest
import torch
from typer.testing import CliRunner

from anpyc.cli.app import app
from anpyc.quiet import library_output

SPLIT_LINE = "Skipping constant folding for op Split with multiple outputs"


def test_every_channel_goes_to_the_file(tmp_path, capfd):
    log = tmp_path / "export.log"
    before = (logging.lastResort, list(logging.getLogger().handlers), sys.stdout, sys.stderr, warnings.showwarning)
    with library_output(log, title="unit") as cap:
        logging.getLogger("onnxscript.optimizer").warning("a logging warning %d", 1)
        warnings.warn("a python warning", UserWarning)
        print("a print")
        print("to stderr", file=sys.stderr)
        os.write(1, b"fd one\n")
        os.write(2, b"fd two\n")
        print("anpyc's own line", file=cap.stdout)
    print("after the block")
    out, err = capfd.readouterr()
    text = log.read_text()
    for line in ("a logging warning 1", "a python warning", "a print", "to stderr", "fd one", "fd two"):
        assert line in text and line not in out + err, line
    assert "anpyc's own line" in out and "after the block" in out
    assert "anpyc's own line" not in text and text.startswith("--- ") and "unit" in text.splitlines()[0]
    # everything is restored
    assert (logging.lastResort, list(logging.getLogger().handlers), sys.stdout, sys.stderr,
            warnings.showwarning) == before
    os.write(2, b"fd two again\n")
    assert "fd two again" in capfd.readouterr().err and "again" not in log.read_text()


def test_verbose_leaves_the_output_alone(tmp_path, capfd, caplog):
    log = tmp_path / "export.log"
    with library_output(log, verbose=True):
        logging.getLogger("onnxscript.optimizer").warning("shown %s", "warning")
        print("shown print")
    out, err = capfd.readouterr()
    # the record reaches the handlers already on the root logger (here pytest's; in the CLI, the terminal)
    assert "shown warning" in caplog.text and "shown print" in out
    assert "shown warning" in log.read_text(), "logging records are still kept in the log"


class SplitsItsWeights(torch.nn.Module):
    """A CNN whose per-channel scale is built from torch.split of a parameter: onnxscript's optimiser warns once
    per Split node that it cannot fold it."""

    def __init__(self, input_spec=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.scale = torch.nn.Parameter(torch.ones(16))
        self.num_features = 16

    def forward(self, x):
        a, b = torch.split(self.scale, 8)
        return torch.relu(self.bn(self.conv(x))).mean((2, 3)) * torch.cat([b, a]).flip(0)


@pytest.fixture
def split_model(monkeypatch):
    from anpyc.backbones import BACKBONES

    monkeypatch.setitem(BACKBONES._items, "test_splits", SplitsItsWeights)


def _check(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["check", "test_splits", "--tasks", "1", "--steps", "1", "--threads", "1", "--min-prunable", "0",
              *[str(a) for a in args]])


def test_check_keeps_the_exporters_lines_in_the_log(split_model, tmp_path, capfd):
    r = _check("--out", tmp_path / "quiet")
    fd_out, fd_err = capfd.readouterr()
    assert r.exit_code == 0, r.output
    assert "OK: test_splits" in r.stdout
    log = (tmp_path / "quiet" / "export.log").read_text()
    assert SPLIT_LINE in log, "the exporter's optimiser did warn"
    assert SPLIT_LINE not in r.output and SPLIT_LINE not in fd_out + fd_err
    assert f"library messages: {tmp_path / 'quiet' / 'export.log'}" in " ".join(r.stdout.split())
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) <= 16, "anpyc's own report only"

    r = _check("--out", tmp_path / "loud", "--verbose")
    fd_out, fd_err = capfd.readouterr()
    assert r.exit_code == 0, r.output
    assert SPLIT_LINE in r.output + fd_out + fd_err


def test_export_keeps_the_exporters_lines_in_the_log(split_model, tmp_path, capfd):
    runner = CliRunner(env={"COLUMNS": "200"})
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--model", "test_splits", "--data", "synthetic", "--data-opt",
                            "samples_per_class=8", "--data-opt", "img_size=16", "--tasks", "1", "--out", str(run),
                            "--epochs", "1", "--batch-size", "16", "--set", "importance.max_batches=1",
                            "--set", "prune.mode=schedule", "--set", "prune.retrain_epochs=1", "--no-progress",
                            "--no-plots", "--threads", "1"])
    assert r.exit_code == 0, r.output
    capfd.readouterr()
    r = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "exp")])
    fd_out, fd_err = capfd.readouterr()
    assert r.exit_code == 0, r.output
    assert SPLIT_LINE in (run / "export.log").read_text()
    assert not (tmp_path / "exp" / "export.log").exists()  # the export folder holds only what is deployed
    assert SPLIT_LINE not in r.output + fd_out + fd_err
    assert r.stdout.splitlines()[0].startswith("task 0 ") and "parity=" in r.stdout
    assert r.stdout.splitlines()[-1] == f"library messages: {run / 'export.log'}"
