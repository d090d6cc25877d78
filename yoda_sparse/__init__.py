"""yoda-sparse: area-masked diffusion super-resolution (YODA, "You Only Diffuse Areas").

Top-level names: :class:`NoiseSchedule` (schedules and respacing), :func:`time_mask` (eq. 9),
:class:`MaskSchedule` (the masks of a whole run) and the ops in :mod:`yoda_sparse.ops`
(``masked_l1_loss``, eq. 10; ``yoda_step``, eq. 11-14).  Attention maps live in
:mod:`yoda_sparse.attention`, models in :mod:`yoda_sparse.models`, samplers and losses in
:mod:`yoda_sparse.diffusion`.
"""
import os as _os

# The sparse engine's convolutions run on strips of a few widths per layer (see
# csrc/sparse_conv_plan.h); oneDNN keeps one primitive per shape in a cache of 1024 by default,
# which the strips of a large UNet and the dense layers together can overflow. Effective when
# set before the process's first oneDNN convolution; a value the user set is kept.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "4096")

from .masking import MaskSchedule, time_mask  # noqa: E402
from .schedule import NoiseSchedule  # noqa: E402

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "MaskSchedule", "time_mask", "__version__"]
