"""yoda-sparse: area-masked diffusion super-resolution (YODA, "You Only Diffuse Areas").

Top-level names: :class:`NoiseSchedule` (schedules and respacing), :func:`time_mask` (eq. 9),
:class:`MaskSchedule` (the masks of a whole run) and the ops in :mod:`yoda_sparse.ops`
(``masked_l1_loss``, eq. 10; ``yoda_step``, eq. 11-14).  Attention maps live in
:mod:`yoda_sparse.attention`, models in :mod:`yoda_sparse.models`, samplers and losses in
:mod:`yoda_sparse.diffusion`.
"""
from .masking import MaskSchedule, time_mask
from .schedule import NoiseSchedule

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "MaskSchedule", "time_mask", "__version__"]
