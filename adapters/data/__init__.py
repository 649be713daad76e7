"""Data sources for anpyc: benchmark streams by name, your own image folders, and the input transforms.

Public surface::

    make_stream(name, **kw) -> TaskStream       list_streams(pattern=None)      describe_stream(name)
    folder_stream(root, ...) -> TaskStream      manifest_stream(path, ...) -> TaskStream
    eval_transform(spec)  train_transform(spec, augment=False)  input_spec_for(model, img_size, color_mode="RGB")
"""

from __future__ import annotations

from ._datasets import ImageArrayDataset, LazyDataset, MemoryDataset, stratified_split
from .download import default_root, load_cifar10, load_cifar100, load_mnist
from .folder import ImageFileDataset, folder_stream, manifest_stream
from .offline import digits_arrays, mnist5k_arrays
from .streams import STREAMS, describe_stream, list_streams, make_stream, permutation, rotation_angles
from .synthetic import synthetic_stream
from .transforms import eval_transform, input_spec_for, train_transform

__all__ = [
    # streams
    "STREAMS",
    "make_stream",
    "list_streams",
    "describe_stream",
    "permutation",
    "rotation_angles",
    "synthetic_stream",
    # your own data
    "folder_stream",
    "manifest_stream",
    # transforms
    "eval_transform",
    "train_transform",
    "input_spec_for",
    # raw arrays and downloads
    "digits_arrays",
    "mnist5k_arrays",
    "load_mnist",
    "load_cifar10",
    "load_cifar100",
    "default_root",
    # datasets
    "MemoryDataset",
    "ImageArrayDataset",
    "LazyDataset",
    "ImageFileDataset",
    "stratified_split",
]
