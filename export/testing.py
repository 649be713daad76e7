"""Stand-in export sources for tests and examples: plain torch modules that satisfy :class:`ExportSource`.

``timm_source("test_resnet")`` builds a randomly initialised timm model per task (never pretrained weights) whose
normalisation parameters and running statistics are randomised, because timm zero-initialises the last norm of
residual blocks and parity on such a model would prove little. The reference is the module itself, so exporting a
:class:`FakeSource` checks the exporter, not a learner; ``reference_offset`` makes the reference deliberately wrong.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Sequence

import torch
from torch import nn

from anpyc.structure import randomize_norms
from anpyc.task import InputSpec

__all__ = ["FakeSource", "timm_source", "mlp_source"]


def _randomized(module: nn.Module, seed: int) -> nn.Module:
    """``module`` with random norm parameters and statistics (timm zero-initialises some), in eval mode."""
    randomize_norms(module, torch.Generator().manual_seed(seed))
    return module.eval()


def _digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FakeSource:
    """An :class:`~anpyc.export.exporter.ExportSource` over one eval module per task."""

    def __init__(self, modules: dict[int, nn.Module], input_spec: InputSpec, *, backbone_name: str,
                 classes: dict[int, Sequence[str]], names: dict[int, str] | None = None,
                 reference_offset: float = 0.0):
        self.backbone_name = backbone_name
        self.input_spec = input_spec
        self._modules = {t: m.eval() for t, m in modules.items()}
        self._classes = {t: [str(c) for c in cs] for t, cs in classes.items()}
        self._names = names or {t: f"task{t}" for t in modules}
        self.reference_offset = float(reference_offset)

    def task_ids(self) -> list[int]:
        return sorted(self._modules)

    def task_info(self, task: int) -> dict:
        return {"id": task, "name": self._names[task], "classes": list(self._classes[task])}

    def subnetwork(self, task: int) -> nn.Module:
        return copy.deepcopy(self._modules[task]).eval()

    @torch.no_grad()
    def reference_forward(self, task: int, x: torch.Tensor) -> torch.Tensor:
        return self._modules[task](x) + self.reference_offset

    def mask_digest(self, task: int) -> str:
        return _digest(self._modules[task])

    def subnetwork_stats(self, task: int) -> dict:
        from torch.utils.flop_counter import FlopCounterMode

        m = self._modules[task]
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            m(torch.zeros(1, *self.input_spec.shape))
        return {"params": sum(p.numel() for p in m.parameters()), "flops": int(counter.get_total_flops())}


def timm_source(model_name: str, *, tasks: int = 1, num_classes: int = 3, img_size: int = 32, seed: int = 0,
                reference_offset: float = 0.0, **spec_overrides) -> FakeSource:
    """One random-init timm ``model_name`` per task (``pretrained=False``), norms randomised, input ``img_size``."""
    import timm

    modules, classes = {}, {}
    for t in range(tasks):
        torch.manual_seed(seed + t)
        kw = {"img_size": img_size} if model_name.startswith(("test_vit", "vit_", "deit_")) else {}
        m = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kw)
        modules[t] = _randomized(m, seed + t)
        classes[t] = [f"t{t}c{i}" for i in range(num_classes)]
    cfg = modules[0].pretrained_cfg
    spec = dict(kind="image", shape=(3, img_size, img_size), mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                std=tuple(cfg.get("std", (0.229, 0.224, 0.225))), interpolation=cfg.get("interpolation", "bilinear"),
                crop_pct=1.0, color_mode="RGB")
    spec.update(spec_overrides)
    return FakeSource(modules, InputSpec(**spec), backbone_name=model_name, classes=classes,
                      reference_offset=reference_offset)


def mlp_source(*, in_features: int = 20, hidden: int = 32, num_classes: int = 4, tasks: int = 1, seed: int = 0,
               reference_offset: float = 0.0) -> FakeSource:
    """A vector-input MLP (Linear-LayerNorm-ReLU-Linear) per task."""
    modules, classes = {}, {}
    for t in range(tasks):
        torch.manual_seed(seed + t)
        m = nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                          nn.Linear(hidden, num_classes))
        modules[t] = _randomized(m, seed + t)
        classes[t] = [f"class-{t}-{i}" for i in range(num_classes)]
    spec = InputSpec(kind="vector", shape=(in_features,), mean=(), std=(), interpolation="bilinear", crop_pct=1.0,
                     color_mode="RGB")
    return FakeSource(modules, spec, backbone_name="mlp", classes=classes, reference_offset=reference_offset)
