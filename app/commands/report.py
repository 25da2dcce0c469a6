"""``autoalign report``: a PNG of the ideal and a few aberrated donuts (xy, xz, yz each),
noise-free and as the camera sees them (bead, photons, noise), and a table of each beam's own null
depth (noise-free, without the bead: not what the camera measures through a bead, which the loop
compares with the bead's floor)."""
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
    p = sub.add_parser("report", help="figure of ideal and aberrated donuts (simulation report)", description=__doc__)
    add_settings_argument(p)
    from autoalign.app.cli import non_negative_int

    p.add_argument("--out", default="out/donuts.png", metavar="PNG",
                   help="PNG to write (default out/donuts.png); an existing file is replaced only when "
                   "autoalign wrote it, else with --force")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random case and the noise, >= 0")
    p.add_argument("--force", action="store_true", help="replace --out even when autoalign did not write it")
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

    from autoalign.app.cli import cli_path
    from autoalign.files import OverwriteRefused, atomic_writer, check_writable, png_software

    out = Path(cli_path(args.out))
    if out.exists() and not args.force and not (png_software(out) or "").startswith("autoalign"):
        raise OverwriteRefused(f"{out}: exists and was not written by autoalign; choose another --out or "
                               "pass --force")
    check_writable(out, "figure")
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
    print(f"{'case':40s}{'beam null':>12s}{'peak':>8s}")
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
    print(f"beam null: centre / peak of the beam's own xy section, NOISE-FREE and WITHOUT the bead (the "
          f"{1000 * settings.camera.bead_diameter_um:.0f} nm bead fills a measured null up to its floor; "
          "'autoalign align' prints that floor); peak: relative to the ideal donut's")
    fig.suptitle(
        f"Vortex donut, NA {settings.optics.numerical_aperture}, {settings.optics.wavelength_um * 1000:.0f} nm, "
        f"{settings.optics.polarisation}; field {ext[1] - ext[0]:.2f} µm, "
        f"camera: {settings.camera.peak_photons:.0f} photons at the ideal peak", fontsize=10
    )
    fig.tight_layout()
    with atomic_writer(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=80, metadata={"Software": "autoalign report"})
    print(f"wrote {out}")
    return 0
