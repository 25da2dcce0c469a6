"""Physics of the focused STED beam: Zernike basis, pupil, vectorial focusing, camera noise,
the simulated microscope and data-set writing. Public entry point: :class:`PSFSimulator`."""
from autoalign.simulation.vectorial import Optics, PSFSimulator, debye_quadrature

__all__ = ["Optics", "PSFSimulator", "debye_quadrature"]
