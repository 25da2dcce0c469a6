"""Focus displacement <-> Zernike tip, tilt and defocus: re-exported from their home,
:mod:`autoalign.simulation.optics` (the data-set writer below this floor needs them too; see
docs/architecture.md). Frame and units there."""
from __future__ import annotations

from autoalign.simulation.optics import (defocus_per_um, paraxial_defocus_per_um, shift_to_zernike, tip_tilt_per_um,
                                         zernike_to_shift)

__all__ = ["tip_tilt_per_um", "defocus_per_um", "shift_to_zernike", "zernike_to_shift", "paraxial_defocus_per_um"]
