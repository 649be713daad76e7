"""The quickstart application: learn 5 tasks of real digits offline, export each to ONNX, predict PNGs with
onnxruntime.

The recipe and its stages, as calls into the libraries (the learner, the exporter, the runtime); ``anpyc
quickstart`` (:mod:`anpyc.cli.commands.quickstart`) runs them in order and prints between them. A small timm
model (random init) learns 5 two-class tasks of scikit-learn's digits in about 2 minutes on 2 cores.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

__all__ = ["QUICKSTART_MODEL", "QUICKSTART_STREAM", "QUICKSTART_IMG_SIZE", "QUICKSTART_CONFIG", "QUICKSTART_THREADS",
           "IMAGES_PER_CLASS", "digits_stream", "make_learner", "train", "export", "write_test_images",
           "predict_images"]

# The recipe, chosen by measurement on 2 CPU cores (see the README): scikit-learn's 8x8 digits upsampled to 32x32,
# split into 5 two-class tasks ({0,1}, {2,3}, ...); a mobilenetv3 at half width from random initialisation.
QUICKSTART_MODEL = "mobilenetv3_small_050"
QUICKSTART_STREAM = "digits-split"
QUICKSTART_IMG_SIZE = 32
QUICKSTART_CONFIG: dict[str, Any] = {
    "optim.epochs": 8,
    "optim.batch_size": 32,
    "prune.steps.step": 0.2,
    "prune.steps.min_step": 0.05,
    "prune.retrain_epochs": 2,
    # val sets hold ~72 images per task: 0.05 allows 3 of them to flip, so noise alone does not veto every step
    "prune.tolerance": 0.05,
}
IMAGES_PER_CLASS = 1
# One torch thread: this model at 32x32 gains little from intra-op parallelism, and on a busy machine OpenMP threads
# spin-waiting for each other made 2 threads several times slower than 1 (measured on a shared 2-core machine).
QUICKSTART_THREADS = 1


def digits_stream():
    """The quickstart's task stream: 5 two-class tasks of scikit-learn's digits at 32x32."""
    from anpyc.adapters.data import make_stream

    return make_stream(QUICKSTART_STREAM, img_size=QUICKSTART_IMG_SIZE)


def make_learner(run: Path, model: str, stream, threads: int):
    """A learner for ``stream`` writing its run to ``run``, with the quickstart's settings."""
    from anpyc.configure import method_config
    from anpyc.learner import ContinualLearner

    overrides = {**QUICKSTART_CONFIG, "threads": threads}
    return ContinualLearner(model, input_spec=stream.input_spec, out_dir=run,
                            config=method_config("anpyc", **overrides))


def train(learner, stream, display: AbstractContextManager | None = None) -> dict:
    """Learn every task of ``stream``; the run's lock is released on the way out (the export only reads the learner).

    ``display`` (progress bars) is entered inside the learner's context and left before it.
    """
    with learner, (display if display is not None else nullcontext()):
        return learner.fit(stream)


def export(learner, export_dir: Path, threads: int) -> list[dict]:
    """One ONNX model per task (each parity-checked against the masked model); their sidecars."""
    from anpyc.export.exporter import export_all

    return export_all(learner, export_dir, threads=threads)


def write_test_images(out: Path, stream) -> list[tuple[Path, int, str]]:
    """A few digits from the test split (never trained on) as PNG files: ``(path, task id, true class name)``."""
    from PIL import Image

    from anpyc.adapters.data import digits_arrays
    from anpyc.adapters.data.offline import digits_source

    images, labels = digits_arrays()
    rows = digits_source(0).splits["test"]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in stream:
        for cls in task.classes:
            picked = [int(r) for r in rows if str(int(labels[r])) == cls][:IMAGES_PER_CLASS]
            for r in picked:
                path = out / f"task{task.id}-digit{cls}-{r}.png"
                Image.fromarray(images[r]).save(path)
                written.append((path, task.id, cls))
    return written


def predict_images(export_dir: Path, images: list[tuple[Path, int, str]], threads: int
                   ) -> list[tuple[str, int, str, str, float, bool]]:
    """Each image through its task's exported model with onnxruntime (no torch): ``(file name, task, true class,
    predicted class, score, correct)``."""
    from anpyc.export.runtime import load_export

    models = load_export(export_dir, threads=threads)
    rows = []
    for path, task, cls in images:
        best = models.predict(task, [str(path)])[0][0]
        rows.append((path.name, task, cls, best["label"], best["score"], best["label"] == cls))
    return rows
