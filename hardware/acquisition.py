"""Z-stack acquisition on any camera and focus stage.

``acquire_stack(camera, focus, settings)``: ``settings.stack.planes`` planes ``settings.stack.z_step_um``
apart, centred on the current focus (plane ``planes // 2`` is the current focus, like the
simulator's grid), from low z to high z. After each move it waits for the focus to settle
(``settings.stage.settle_timeout_s``). The focus returns to where it was, also when the
acquisition fails. Simulated cameras render all planes in one batch (same result, much faster).
"""
from __future__ import annotations

import logging
import math

import numpy as np

from autoalign.hardware.base import Camera, DeviceError, FocusStage, Stack, XYStage
from autoalign.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["stack_positions", "acquire_stack", "move_stage_by"]


def stack_positions(centre_um: float, planes: int, step_um: float) -> np.ndarray:
    """Focus positions (µm) of a stack: ``centre + (k - planes // 2) * step`` for k = 0..planes-1."""
    if planes < 1 or not step_um > 0:
        raise ValueError(f"stack of {planes} planes, step {step_um} µm: expected planes >= 1 and step > 0")
    return float(centre_um) + (np.arange(int(planes)) - int(planes) // 2) * float(step_um)


def _xy_position(camera: Camera, xy: XYStage | None) -> tuple[float, float]:
    try:
        if xy is not None:
            x, y = xy.position_um
            return (float(x), float(y))
        pos = getattr(camera, "xy_position_um", None)
        if pos is not None:
            return (float(pos[0]), float(pos[1]))
    except DeviceError:
        log.warning("could not read the XY stage position for the stack record", exc_info=True)
    return (math.nan, math.nan)


def acquire_stack(
    camera: Camera, focus: FocusStage, settings: "Settings", xy: XYStage | None = None
) -> Stack:
    """Acquire a z-stack around the current focus; returns a :class:`hardware.base.Stack` with
    ``data`` (planes, ny, nx) float64 ADU, the camera's pixel size, the z step and the focus
    positions (µm), and the xy stage position (``xy`` or what the camera knows, else NaN).

    Raises the devices' :class:`DeviceError` (``StageLimitError`` when the stack would leave the
    focus travel, before anything moves). The focus is moved back to its start in every case."""
    st = settings.stack
    timeout_s = float(settings.stage.settle_timeout_s)
    start = float(focus.position_um)
    z = stack_positions(start, st.planes, st.z_step_um)
    check = getattr(focus, "check_target", None)
    if callable(check):
        for value in (z[0], z[-1]):
            check(float(value))
    camera.begin_sequence(len(z))
    frames: list[np.ndarray] | np.ndarray | None = None
    try:
        fast = getattr(camera, "acquire_z_series", None)
        if callable(fast):
            frames = fast(focus, z)
        if frames is None:
            out = []
            for value in z:
                focus.move_to(float(value))
                focus.wait_until_settled(timeout_s)
                out.append(np.asarray(camera.snap(), dtype=float))
            frames = out
    finally:
        try:
            focus.move_to(start)
            focus.wait_until_settled(timeout_s)
        except DeviceError:
            log.error("%s: could not return the focus to %g µm after the stack", focus.name, start)
            raise
    data = np.asarray(np.stack(frames) if isinstance(frames, list) else frames, dtype=float)
    if data.ndim != 3 or data.shape[0] != len(z):
        raise DeviceError(f"{camera.name}: stack of shape {data.shape}, expected ({len(z)}, ny, nx)")
    return Stack(
        data=data,
        pixel_size_um=float(camera.pixel_size_um),
        z_step_um=float(st.z_step_um),
        z_positions_um=z,
        xy_position_um=_xy_position(camera, xy),
    )


def move_stage_by(xy: XYStage, focus: FocusStage, move_um: tuple[float, float, float]) -> None:
    """Move the XY stage and the focus by ``move_um`` (dx, dy, dz) relative to where they are
    (an axis with zero move is not commanded)."""
    dx, dy, dz = move_um
    x, y = xy.position_um
    z = focus.position_um
    if dx or dy:
        xy.move_to(x + dx, y + dy)
    if dz:
        focus.move_to(z + dz)
