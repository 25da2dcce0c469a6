"""Measurement analysis: from a raw stack to a checked measurement and what it says.

``measurement`` (stack quality checks and refusal reasons, ``Measurement``, centring plan),
``metrics`` (null depth, correlation), ``donut`` (the SLM phase of a correction, the ideal
reference, the simulated truth), ``centroid``, ``optics``, ``poke`` (poke calibration),
``selfcheck`` (convention self-check) and ``modal`` (the classical sensorless modal estimator).
Depends only on the ground floor (``autoalign.settings``, ``autoalign.correction``,
``autoalign.estimator``), ``hardware`` and ``simulation``; never on ``app``.
"""
