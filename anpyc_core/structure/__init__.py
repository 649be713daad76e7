"""The structure walk: coupled unit groups of any nn.Module, found by tracing and verified by parity."""

from .build import build_structure
from .explain import Break, explain_rejected, locate_break
from .layers import norm_kind, resync, slices_for
from .slicing import kept_positions, slice_trunk
from .trace import RawGroup, RawItem, trace_groups
from .units import AttentionSite, NormSite, Rejected, Structure, TensorSlice, UnitGroup
from .walk import ParityReport, feature_count, parity, randomize_norms, verify_groups, walk

Touch = TensorSlice  # the name the layer rules' slices had before there was one slice type

__all__ = [
    "walk", "Structure", "UnitGroup", "TensorSlice", "NormSite", "AttentionSite", "Rejected",
    "build_structure", "trace_groups", "RawGroup", "RawItem", "slice_trunk", "kept_positions", "parity",
    "verify_groups", "randomize_norms", "feature_count", "ParityReport", "Touch", "norm_kind", "resync",
    "slices_for", "Break", "locate_break", "explain_rejected",
]
