"""The PSF's centre of mass and the ortho-sections through the bead: re-exported from their home,
:mod:`autoalign.simulation.centroid` (the data-set writer below this floor needs them too; see
docs/architecture.md). Conventions there."""
from __future__ import annotations

from autoalign.simulation.centroid import (Centroid, background_and_noise, centred_sections, image_centroid,
                                           orthosections, robust_stack_centroid, section_centroid, stack_centroid,
                                           subtract_background)

__all__ = ["Centroid", "subtract_background", "image_centroid", "section_centroid", "stack_centroid", "orthosections",
           "background_and_noise", "robust_stack_centroid", "centred_sections"]
