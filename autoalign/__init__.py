"""autoalign: closed-loop, model-based alignment of a STED depletion donut.

This package is the ground floor: typed settings (:mod:`autoalign.settings`), the correction data
type (:mod:`autoalign.correction`) and the conventions (:mod:`autoalign.conventions`). It imports
nothing else of the project. The floors above are installed under the same namespace from the
repository folders of the same name: ``autoalign.simulation``, ``autoalign.hardware``,
``autoalign.models``, ``autoalign.calibration`` and ``autoalign.app`` (see ``docs/architecture.md``).
"""

__version__ = "0.2.0"
