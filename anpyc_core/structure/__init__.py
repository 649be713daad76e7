"""The structure walk: coupled unit groups of any nn.Module, found by tracing and verified by parity."""

from .explain import Break, explain_rejected, locate_break
from .layers import Touch, norm_kind, resync, slices_for
from .slicing import kept_positions, slice_trunk
from .trace import RawGroup, RawItem, trace_groups
from .units import AttentionSite, NormSite, Rejected, Structure, TensorSlice, UnitGroup, build_structure
from .walk import ParityReport, feature_count, parity, randomize_norms, verify_groups, walk

__all__ = [
    "walk", "Structure", "UnitGroup", "TensorSlice", "NormSite", "AttentionSite", "Rejected",
    "build_structure", "trace_groups", "RawGroup", "RawItem", "slice_trunk", "kept_positions", "parity",
    "verify_groups", "randomize_norms", "feature_count", "ParityReport", "Touch", "norm_kind", "resync",
    "slices_for", "Break", "locate_break", "explain_rejected",
]
