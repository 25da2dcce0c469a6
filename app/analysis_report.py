"""The PNG report of an analysed measurement (``autoalign analyse``): what a person checks before
trusting a number.

Rows: (1) data, model and normalised residual ``(data - model) / sqrt(model)`` of the xy plane
at the bead's focus and the xz and yz sections through the bead (log intensity); (2) radial
profiles in focus and at +-1 µm, the axial profile through the bead, and the photons per plane;
(3) the Zernike estimate of the fit and of the independent phase retrieval side by side with
their one-sigma error bars; and the verdict and its limits in words.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from autoalign.app.analysis import StackAnalysis
from autoalign.calibration.section_fit import SectionFit

__all__ = ["write_report", "write_sections_report"]


def _radial(img: np.ndarray, cx: float, cy: float, pixel: float, r_max: float) -> tuple[np.ndarray, np.ndarray]:
    n = img.shape[-1]
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot((xx - n // 2) * pixel - cx, (yy - n // 2) * pixel - cy)
    edges = np.arange(0, r_max + pixel, pixel)
    idx = np.digitize(r.ravel(), edges) - 1
    prof = np.bincount(idx, weights=img.ravel(), minlength=len(edges))[: len(edges) - 1]
    cnt = np.bincount(idx, minlength=len(edges))[: len(edges) - 1]
    return 0.5 * (edges[1:] + edges[:-1]), prof / np.maximum(cnt, 1)


def write_report(analysis: StackAnalysis, path: str | Path, title: str = "") -> Path:
    """Draw the report of one analysed stack into ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoalign.files import atomic_path

    sf = analysis.fit.stacks[0]
    data, model = sf.data, sf.model
    k_focus = int(np.argmin(np.abs(sf.z_um - sf.bead_um[2])))
    n = data.shape[-1]
    p = sf.pixel_um
    iy = int(np.clip(round(sf.bead_um[1] / p) + n // 2, 0, n - 1))
    ix = int(np.clip(round(sf.bead_um[0] / p) + n // 2, 0, n - 1))
    sections = {
        "xy (focus)": (data[k_focus], model[k_focus]),
        "xz (y = bead)": (data[:, iy, :], model[:, iy, :]),
        "yz (x = bead)": (data[:, :, ix], model[:, :, ix]),
    }
    fig = plt.figure(figsize=(16, 15))
    gs = fig.add_gridspec(5, 9, height_ratios=[1, 1, 1, 1.1, 1.2], hspace=0.6, wspace=1.1,
                          left=0.05, right=0.97, top=0.94, bottom=0.04)
    vmax = np.log10(max(float(data.max()), 10.0))
    for col, (name, (d, m)) in enumerate(sections.items()):
        z_extent = (-n // 2 * p, (n - 1 - n // 2) * p, float(sf.z_um[0] - sf.bead_um[2]), float(sf.z_um[-1] - sf.bead_um[2]))
        xy_extent = (-n // 2 * p, (n - 1 - n // 2) * p, (n - 1 - n // 2) * p, -n // 2 * p)
        extent = xy_extent if col == 0 else z_extent
        for row, (label, img, kind) in enumerate((("data", d, "log"), ("model", m, "log"),
                                                 ("residual / sqrt(model)", (d - m) / np.sqrt(np.clip(m, 1, None)), "res"))):
            ax = fig.add_subplot(gs[row, 3 * col: 3 * col + 3])
            if kind == "log":
                im = ax.imshow(np.log10(np.clip(img, 1.0, None)), cmap="magma", vmin=0, vmax=vmax, extent=extent,
                               aspect="auto", origin="upper" if col == 0 else "lower")
            else:
                im = ax.imshow(img, cmap="RdBu_r", vmin=-5, vmax=5, extent=extent, aspect="auto",
                               origin="upper" if col == 0 else "lower")
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.set_xlabel("x (µm)" if col < 2 else "y (µm)", fontsize=8)
            ax.set_ylabel("y (µm)" if col == 0 else "z - z_bead (µm)", fontsize=8)
            ax.tick_params(labelsize=7)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.ax.tick_params(labelsize=6)
            if col == 2:
                cb.set_label("log10 electrons" if kind == "log" else "sigma", fontsize=7)
    # ---- profiles
    ax = fig.add_subplot(gs[3, 0:3])
    for dz, colour in ((0.0, "C0"), (-1.0, "C1"), (1.0, "C2")):
        k = int(np.argmin(np.abs(sf.z_um - sf.bead_um[2] - dz)))
        r, dprof = _radial(data[k], sf.bead_um[0], sf.bead_um[1], p, 2.5)
        _, mprof = _radial(model[k], sf.bead_um[0], sf.bead_um[1], p, 2.5)
        ax.semilogy(r, np.clip(dprof, 0.1, None), ".", color=colour, ms=3,
                    label=f"data z{sf.z_um[k] - sf.bead_um[2]:+.1f} µm")
        ax.semilogy(r, np.clip(mprof, 0.1, None), "-", color=colour, lw=1)
    ax.set_xlabel("radius (µm)", fontsize=8)
    ax.set_ylabel("electrons / px", fontsize=8)
    ax.set_title("radial profiles (dots data, lines model)", fontsize=9)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(gs[3, 3:6])
    zz = sf.z_um - sf.bead_um[2]
    ax.semilogy(zz, np.clip(data[:, iy, ix], 0.1, None), "k.", ms=4, label="data (bead axis)")
    ax.semilogy(zz, np.clip(model[:, iy, ix], 0.1, None), "r-", lw=1, label="model")
    ax.set_xlabel("z - z_bead (µm)", fontsize=8)
    ax.set_title("axial profile through the bead", fontsize=9)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(gs[3, 6:9])
    ax.plot(zz, data.sum(axis=(1, 2)), "k.", ms=4, label="data")
    ax.plot(zz, model.sum(axis=(1, 2)), "r-", lw=1, label="model")
    ax.set_xlabel("z - z_bead (µm)", fontsize=8)
    ax.set_title("electrons per plane in the crop", fontsize=9)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    # ---- Zernikes
    ax = fig.add_subplot(gs[4, 0:6])
    modes = sorted(sf.coefficients)
    x = np.arange(len(modes))
    w = 0.38
    ax.bar(x - w / 2, [sf.coefficients[j] for j in modes], w, yerr=[sf.sigma[j] for j in modes], capsize=2,
           label="instrument-model fit (sigma: max of Fisher, block sandwich)", color="C0")
    pr = analysis.retrieval
    if pr is not None:
        ax.bar(x + w / 2, [pr.coefficients.get(j, 0.0) for j in modes], w,
               yerr=[pr.uncertainty.get(j, 0.0) for j in modes], capsize=2, color="C3",
               label="phase retrieval (Gerchberg-Saxton; sigma: half the even/odd-plane spread)")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels([str(j) for j in modes], fontsize=7)
    ax.set_xlabel("Noll index", fontsize=8)
    ax.set_ylabel("rad (RMS-normalised)", fontsize=8)
    ax.set_title("aberration estimate", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    ax = fig.add_subplot(gs[4, 6:9])
    ax.axis("off")
    lines = [sf.verdict]
    if analysis.comparison is not None:
        c = analysis.comparison
        lines.append(f"fit vs phase retrieval, Noll 5..22: {c['rms_difference_rad']:.3f} rad RMS apart, correlation "
                     f"{c['correlation']:.2f}, {c['disagreement_over_sigma']:.1f}x the combined sigma")
    lines += ["limit: " + s for s in analysis.limits]
    ins = analysis.fit.instrument
    lines.append(f"instrument: NA {ins.numerical_aperture:.3f}, fill {ins.fill_factor:.2f}, apodisation "
                 f"{ins.apodisation:+.2f}, axial scale {ins.axial_scale:.3f}, bead {1000 * ins.bead_diameter_um:.0f} nm"
                 + (f" ({ins.source})" if ins.source else " (nominal: not calibrated)"))
    ax.text(0, 1, "\n".join(textwrap.fill(s, 62) for s in lines), va="top", fontsize=7.5, family="monospace")
    fig.suptitle(title or f"{analysis.stack.name}: data, instrument model and residual", fontsize=12, y=0.985)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png", metadata={"Software": "autoalign analyse"})
    plt.close(fig)
    return out


def write_sections_report(fit: SectionFit, entry: dict, path: str | Path, title: str = "") -> Path:
    """Report of a section-scan fit (:class:`calibration.section_fit.SectionFit` and the entry of
    :func:`app.analysis.analyse_scans`). One row per section (xy, xz, yz): data and model on one
    colour scale, the normalised residual ``(data - model) / sqrt(model)`` (+-4), and the profiles
    through the bead along both axes (data as points, model as lines); then the Zernike estimate
    of the fit with its one-sigma error bars beside the networks' readings, and the verdict, the
    fitted beam, bead and photons, the detection and what limits the result, in words. Axes in
    µm from the fitted bead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoalign.files import atomic_path

    data: dict = fit.data
    model: dict = fit.model
    axes_um: dict = fit.axes_um
    bead = fit.bead_um
    keys = list(data)
    names = {"xy": ("x", "y"), "xz": ("x", "z"), "yz": ("y", "z")}    # (columns, rows)
    centre = {"x": bead[0], "y": bead[1], "z": bead[2]}
    from matplotlib.ticker import MaxNLocator

    height = 3.35 * len(keys) + 4.6
    fig = plt.figure(figsize=(15, height))
    gs = fig.add_gridspec(len(keys) + 1, 4, height_ratios=[1] * len(keys) + [1.2], hspace=0.42, wspace=0.38,
                          left=0.05, right=0.985, top=1 - 0.75 / height, bottom=0.035)
    log_profiles = fit.beam != "none"      # a donut's null is what matters: counts on a log scale
    for row, key in enumerate(keys):
        d, m = np.asarray(data[key], float), np.asarray(model[key], float)
        cname, rname = names.get(key, ("columns", "rows"))
        if key in axes_um:
            r_ax, c_ax = (np.asarray(a, float) for a in axes_um[key])
        else:
            r_ax, c_ax = np.arange(d.shape[0], dtype=float), np.arange(d.shape[1], dtype=float)
        r_rel, c_rel = r_ax - centre.get(rname, 0.0), c_ax - centre.get(cname, 0.0)
        pr = float(r_rel[1] - r_rel[0]) if len(r_rel) > 1 else 1.0
        pc = float(c_rel[1] - c_rel[0]) if len(c_rel) > 1 else 1.0
        extent = (c_rel[0] - pc / 2, c_rel[-1] + pc / 2, r_rel[0] - pr / 2, r_rel[-1] + pr / 2)
        vmax = float(max(d.max(), m.max()))
        res = (d - m) / np.sqrt(np.clip(m, 1e-6, None))
        chi2 = float(np.mean(res**2))
        for col, (label, img, kind) in enumerate(((f"{key}: data (counts)", d, "img"),
                                                  (f"{key}: model", m, "img"),
                                                  (f"{key}: residual / sqrt(model), chi^2/px {chi2:.2f}", res, "res"))):
            ax = fig.add_subplot(gs[row, col])
            im = ax.imshow(img, cmap="RdBu_r" if kind == "res" else "magma", vmin=-4 if kind == "res" else 0,
                           vmax=4 if kind == "res" else vmax, origin="lower", extent=extent, aspect="equal",
                           interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel(f"{cname} - bead (µm)", fontsize=8)
            ax.set_ylabel(f"{rname} - bead (µm)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(5))
            ax.yaxis.set_major_locator(MaxNLocator(5))
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.ax.tick_params(labelsize=6)
            if kind == "res":
                cb.set_label("sigma", fontsize=7)
        ax = fig.add_subplot(gs[row, 3])
        ir, ic = int(np.argmin(np.abs(r_rel))), int(np.argmin(np.abs(c_rel)))
        ax.plot(c_rel, d[ir], ".", color="C0", ms=3.5, label=f"along {cname} ({rname} = bead)")
        ax.plot(c_rel, m[ir], "-", color="C0", lw=1)
        ax.plot(r_rel, d[:, ic], ".", color="C3", ms=3.5, label=f"along {rname} ({cname} = bead)")
        ax.plot(r_rel, m[:, ic], "-", color="C3", lw=1)
        if log_profiles:
            ax.set_yscale("log")
            ax.set_ylim(max(0.5 * float(min(m[ir].min(), m[:, ic].min())), 0.1), 2 * vmax)
        ax.set_xlabel("µm from the bead", fontsize=8)
        ax.set_ylabel("counts per binned pixel" + (" (log)" if log_profiles else ""), fontsize=8)
        ax.set_title(f"{key}: profiles through the bead\n(points: data, lines: model)", fontsize=8.5)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6.5, loc="upper right", framealpha=0.7)
    # ---- the Zernike estimates
    ax = fig.add_subplot(gs[len(keys), 0:2])
    coeffs: dict = fit.coefficients
    sig: dict = fit.sigma
    modes = sorted(coeffs)
    x = np.arange(len(modes))
    nets = {k: v for k, v in entry.get("networks", {}).items() if isinstance(v, dict) and "coefficients_rad" in v}
    w = 0.8 / (1 + len(nets))
    ax.bar(x - 0.4 + w / 2, [coeffs[j] for j in modes], w, yerr=[sig[j] for j in modes], capsize=2,
           label="instrument-model fit (1 sigma)")
    for i, (label, v) in enumerate(nets.items()):
        c = {int(k): float(val) for k, val in v["coefficients_rad"].items()}
        ax.bar(x - 0.4 + w * (i + 1.5), [c.get(j, 0.0) for j in modes], w, label=f"{label} network")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels([str(j) for j in modes], fontsize=7)
    ax.set_xlabel("Noll index", fontsize=8)
    ax.set_ylabel("aberration (rad RMS)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title("Zernike estimate" + ("" if nets else " (no network reading: networks read vortex beams only)"),
                 fontsize=9)
    # ---- words
    ax = fig.add_subplot(gs[len(keys), 2:4])
    ax.axis("off")
    fit_e = entry.get("fit", {})
    off, off_s = fit.mask_offset, fit.mask_offset_sigma
    bead_s = fit.bead_sigma_um
    verdict = ("VALID: " if fit.valid else "NOT VALID: ") + str(fit.verdict)
    lines = [verdict,
             f"beam {entry.get('beam', fit.beam)}, {entry.get('detection', '?')} detection; "
             + str(entry.get("beam_rule", "")),
             "bead (µm): " + ", ".join(f"{a} {v:.4f} +- {s:.4f}" for a, v, s in zip("xyz", bead, bead_s))]
    if entry.get("beam", "none") != "none":
        lines.append(f"mask offset (pupil radii): x {off[0]:+.4f} +- {off_s[0]:.4f}, y {off[1]:+.4f} +- {off_s[1]:.4f}")
    photons: dict = fit.photons
    bg: dict = fit.background
    lines.append("photons / background per px: " + ", ".join(f"{k} {photons[k]:.0f} / {bg[k]:.1f}" for k in photons))
    lines.append(f"{fit_e.get('pupil_samples', '?')} pupil nodes, {fit_e.get('evaluations', '?')} evaluations, "
                 f"fit {fit.elapsed_s:.1f} s")
    for label, v in entry.get("networks", {}).items():
        if isinstance(v, dict) and "vs_fit" in v:
            c = v["vs_fit"]
            lines.append(f"{label} network: {c['rms_other_rad']:.3f} rad RMS, {c['rms_difference_rad']:.3f} rad RMS "
                         f"from the fit")
        elif isinstance(v, dict) and "error" in v and label in ("coarse", "fine"):
            lines.append(f"{label} network: not read ({v['error'][:80]})")
    lines += ["limit: " + s for s in entry.get("limits", [])]
    ax.text(0, 1, "\n".join(textwrap.fill(s, 90, subsequent_indent="  ") for s in lines), va="top", fontsize=8,
            family="monospace", transform=ax.transAxes)
    fig.suptitle(title or "section scans", fontsize=12, y=1 - 0.2 / height)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png", metadata={"Software": "autoalign analyse"})
    plt.close(fig)
    return out
