"""Backbones by name, as seen from the adapters layer: every timm model, plus anpyc's small torch models.

The registry itself and the name -> trunk factory live in the core (:mod:`anpyc.backbones`), because a run
directory must be re-openable from its files without loading code a file names; this module is the adapters'
entry point to them (register your own backbones on :data:`BACKBONES`).
"""

from __future__ import annotations

from anpyc.backbones import BACKBONES, MLP, SimpleCNN, create_backbone, is_known, list_backbones

__all__ = ["BACKBONES", "create_backbone", "list_backbones", "MLP", "SimpleCNN", "is_known"]
