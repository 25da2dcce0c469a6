"""'Save report': the state on the SLM now, for a lab notebook, as three files in one folder.

``<stem>.png`` (the window), ``<stem>.json`` (metrics, history, correction, settings summary,
timestamps) and ``<stem>_correction.yaml`` (the correction, loadable with *Load correction*).
No existing file is ever overwritten: the stem takes a numbered suffix (``_2``, ``_3``, …) until
none of the three names exists, and each file is written to a temporary name and then linked into
place, which fails rather than replace a file that appeared meanwhile.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from collections.abc import Callable

SUFFIXES = (".png", ".json", "_correction.yaml")


def unique_stem(folder: str | Path, base: str, suffixes: tuple[str, ...] = SUFFIXES) -> Path:
    """``folder / base`` or ``folder / base_N`` (N = 2, 3, …): the first for which no file
    ``stem + suffix`` exists."""
    folder = Path(folder)
    n = 1
    while True:
        stem = folder / (base if n == 1 else f"{base}_{n}")
        if not any(Path(str(stem) + s).exists() for s in suffixes):
            return stem
        n += 1


def write_new(path: Path, write: Callable[[Path], None]) -> None:
    """Write a NEW file: ``write(temporary path)`` in the same folder, then link it to ``path``
    (``FileExistsError`` if ``path`` exists; the temporary file is always removed). The file gets
    the permissions of any new file (0o666 less the umask, as *Save…* writes), not the temporary
    file's 0o600."""
    from autoalign.files import give_default_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        give_default_mode(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:   # never replace a file (it is an OSError: re-raise first)
            raise
        except OSError:   # a file system without hard links: rename if still free
            if path.exists():
                raise FileExistsError(path) from None
            os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def settings_summary(settings: Any) -> dict[str, Any]:
    """The settings a reader of the report needs to interpret its numbers, plus the full
    settings file's path."""
    o, c, st, lp = settings.optics, settings.camera, settings.stack, settings.loop
    return {
        "source": str(getattr(settings, "source", "?")),
        "optics": {"numerical_aperture": o.numerical_aperture, "wavelength_um": o.wavelength_um,
                   "immersion_index": o.immersion_index, "beam": o.beam,
                   "vortex_charge": o.vortex_charge, "polarisation": o.polarisation},
        "camera": {"pixel_size_um": c.pixel_size_um, "roi_px": c.roi_px,
                   "bead_diameter_um": c.bead_diameter_um, "exposure_ms": c.exposure_ms},
        "stack": {"planes": st.planes, "z_step_um": st.z_step_um},
        "loop": {"gain": lp.gain, "max_iterations": lp.max_iterations,
                 "floor_margin": lp.floor_margin, "aligned_min_correlation": lp.aligned_min_correlation,
                 "min_corrections": lp.min_corrections, "patience": lp.patience},
        "model": {"checkpoint": str(settings.model.checkpoint),
                  "architecture": settings.model.architecture,
                  "modes": list(settings.model.modes)},
        "hardware_backend": settings.hardware.backend,
        "slm_backend": settings.slm.backend,
        "all": settings.to_dict() if hasattr(settings, "to_dict") else None,
    }


def write_report(folder: str | Path, image: Any, summary: dict[str, Any], correction: Any,
                 base: str | None = None, settings: Any = None) -> dict[str, Path]:
    """Write the three report files into ``folder`` (created if missing) and return their paths
    ``{"png", "json", "correction"}``. ``image``: a ``QImage`` (or anything with
    ``save(path, "PNG") -> bool``); ``summary``: JSON-safe dict; ``correction``: an
    :class:`autoalign.correction.Correction` (``None``: an empty one); ``settings``: the settings
    in use, whose optics the correction file records (as *Save…* does), so that *Load correction*
    can check them."""
    from autoalign.correction import Correction

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{folder}: folder not writable")
    now = datetime.now(timezone.utc)
    base = base or f"autoalign_report_{now.astimezone().strftime('%Y%m%d_%H%M%S')}"
    stem = unique_stem(folder, base)
    paths = {"png": Path(str(stem) + ".png"), "json": Path(str(stem) + ".json"),
             "correction": Path(str(stem) + "_correction.yaml")}
    correction = correction if correction is not None else Correction()
    data = {"report": "autoalign", "saved_utc": now.isoformat(timespec="seconds"),
            "saved_local": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "files": {k: p.name for k, p in paths.items()}, **summary}

    def save_png(tmp: Path) -> None:
        if not image.save(str(tmp), "PNG"):
            raise OSError(f"{paths['png']}: the PNG could not be written")

    written: list[Path] = []
    try:
        write_new(paths["png"], save_png)
        written.append(paths["png"])
        write_new(paths["json"], lambda tmp: tmp.write_text(
            json.dumps(data, indent=2, allow_nan=False), encoding="utf-8"))
        written.append(paths["json"])
        write_new(paths["correction"], lambda tmp: correction.save_yaml(tmp, settings=settings))
        written.append(paths["correction"])
    except Exception:
        for p in written:   # no half report: the ones this call created go again
            p.unlink(missing_ok=True)
        raise
    return paths


__all__ = ["write_report", "unique_stem", "write_new", "settings_summary", "SUFFIXES"]
