"""``autoalign report``: a PNG of the ideal and a few aberrated donuts (xy, xz, yz each), noise-
free and as the camera sees them, with their null depth; prints a short table."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from autoalign.app.cli import add_settings_argument
from autoalign.settings import load_settings

CASES: list[tuple[str, dict[int, float]]] = [
    ("ideal donut", {}),
    ("0.5 rad vertical astigmatism (Z6)", {6: 0.5}),
    ("0.5 rad horizontal coma (Z8)", {8: 0.5}),
    ("0.5 rad oblique trefoil (Z10)", {10: 0.5}),
    ("0.5 rad spherical (Z11)", {11: 0.5}),
    ("1 rad RMS random (Noll 5-15)", {}),  # filled from the seed
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="figure of ideal and aberrated donuts (simulation report)")
    add_settings_argument(p)
    p.add_argument("--out", default="out/donuts.png", help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def null_depth(xy: np.ndarray) -> float:
    """Intensity at the centre pixel over the section's maximum (the donut's null depth)."""
    c = xy.shape[0] // 2
    return float(xy[c, c] / xy.max())


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoalign.simulation import PSFSimulator
    from autoalign.simulation.noise import CameraModel, blur_by_bead
    from autoalign.simulation.zernike import rms

    settings = load_settings(args.settings)
    sim = PSFSimulator.from_settings(settings)
    camera = CameraModel.from_settings(settings)
    rng = np.random.default_rng(args.seed)
    random = np.zeros(15)
    random[4:] = rng.normal(0, 1, 11)
    random /= rms(random)
    cases = [(name, random if not c and name.startswith("1 rad") else c) for name, c in CASES]
    ext = sim.coords_um[[0, -1]]
    zext = sim.z_um[[0, -1]]
    fig, axes = plt.subplots(len(cases), 6, figsize=(13, 2.2 * len(cases)))
    print(f"{'case':40s}{'null depth':>12s}{'peak':>8s}")
    for row, (name, coeffs) in enumerate(cases):
        sections = sim.orthosections(coeffs)
        noisy = camera.to_photons(camera.expose(blur_by_bead(sections, settings.camera.bead_diameter_um,
                                                             settings.camera.pixel_size_um), rng))
        print(f"{name:40s}{null_depth(sections[0]):12.2e}{sections.max():8.3f}")
        for k, (title, extent) in enumerate(
            [("xy", [*ext, *ext]), ("xz", [*ext, *zext]), ("yz", [*ext, *zext])]
        ):
            for j, (img, label) in enumerate(((sections[k], "model"), (noisy[k], "camera"))):
                ax = axes[row, 2 * k + j]
                ax.imshow(img, origin="lower", extent=extent, cmap="inferno")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{title} ({label})", fontsize=9)
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(
        f"Vortex donut, NA {settings.optics.numerical_aperture}, {settings.optics.wavelength_um * 1000:.0f} nm, "
        f"{settings.optics.polarisation}; field {ext[1] - ext[0]:.2f} µm, "
        f"camera: {settings.camera.peak_photons:.0f} photons at the ideal peak", fontsize=10
    )
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")
    return 0
