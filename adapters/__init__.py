"""Adapters: backbones by name (timm and small torch models) and data sources (``anpyc.adapters.data``)."""

from .backbones import BACKBONES, MLP, SimpleCNN, create_backbone, list_backbones

__all__ = ["BACKBONES", "MLP", "SimpleCNN", "create_backbone", "list_backbones"]
