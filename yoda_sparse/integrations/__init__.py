"""Bring your own model: converters of public SR3 / SRDiff checkpoints and a diffusers
scheduler + pipeline.

* :func:`convert_sr3` — checkpoints of Janspiry/Image-Super-Resolution-via-Iterative-Refinement.
* :func:`convert_srdiff` — checkpoints of LeiaLi/SRDiff.
* ``yoda_sparse.integrations.diffusers`` — ``YodaScheduler`` and ``YodaSuperResolutionPipeline``
  (needs the optional ``diffusers`` package: ``pip install yoda-sparse[diffusers]``); imported
  on its own, never from here.
"""
from .sr3 import convert_sr3, sr3_state_dict
from .srdiff import convert_srdiff, srdiff_state_dict

__all__ = ["convert_sr3", "convert_srdiff", "sr3_state_dict", "srdiff_state_dict"]
