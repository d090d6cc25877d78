"""Sparse UNet execution: YODA sampling whose time falls with the update ratio.

:class:`SparseUNet` runs a yoda_sparse SR3 or SRDiff UNet for one sampling step on the
active tiles of that step's mask (every layer, every resolution level, attention included),
reusing cached activations elsewhere; :class:`CostModel` decides per level whether dense is
cheaper, measured on the device at first use. Modules, one idea each:

* ``plan``: per-level tile maps and execution plans from a step mask;
* ``norm``: group-norm statistics for sparse steps ("auto", "probed", "current" or "frozen");
* ``layers``: convolution, residual block and attention, dense or sparse;
* ``programs``: SR3's and SRDiff's forward passes over those layers;
* ``cost``: the dense-fallback cost model;
* ``engine``: the engine (cache, plans, the all-active shortcut).
"""
from .cost import CostModel, cost_cache_path
from .engine import SparseUNet
from .layers import UnsupportedLayerError

__all__ = ["SparseUNet", "CostModel", "cost_cache_path", "UnsupportedLayerError"]
