"""Our vectorial simulator against the peer library psf-generator 0.1.0 (EPFL BIG,
``VectorialCartesianPropagator``): throughput and accuracy for the same optics, in one run.

    python benchmarks/peer_psf_generator.py --threads 1 --quick      # tiny sizes, ~10 s
    python benchmarks/peer_psf_generator.py --threads 1              # 64 px, 64 planes, ~40 s (5.6 GB peak)
    python benchmarks/peer_psf_generator.py --device cuda --json     # both libraries on the GPU

psf-generator is not a dependency of autoalign; install it into the environment by hand (it imports
``zernikepy`` at import time, so that pure-Python wheel is needed too; the rest of its requirements,
numpy/scipy/torch/matplotlib, come with autoalign; scikit-image is only needed for its file I/O):

    pip install --no-deps psf_generator-0.1.0-py3-none-any.whl
    pip install --no-deps zernikepy

What is compared (optics from the settings file: NA, immersion index, vacuum wavelength, camera
pixel, z step, circular polarisation, vortex charge):

1. Throughput at the peer's default pupil sampling (its ``n_pix_pupil`` default, 128) and ours
   (``optics.pupil_samples``, 64): our ortho-section triplets/s (``orthosections_batch``) and our
   stacks/s (``stack``) against the peer's stacks/s (``compute_focus_field`` with all planes). The
   peer has no ortho-section mode: a triplet (xy, xz, yz) needs its whole stack, so the triplet
   ratio is our triplets/s over its stacks/s. Every PSF on both sides carries a 15-mode Zernike
   aberration (orders n <= 4: ours Noll 1..15, the peer OSA 0..14; costs do not depend on the
   values), results are copied to host memory as numpy intensities, the simulators are built once
   outside the timing, and the repeats are interleaved (ours, peer, ours, peer, ...), reporting the
   best and the median.
2. Accuracy of the unaberrated beam's in-focus xy intensity against the brute-force Debye quadrature
   (``autoalign.simulation.debye_quadrature``, 200 x 256 polar nodes, float64) of the SAME optics,
   each on its own pixel grid (ours has a pixel on the axis, the peer's grid is centred between
   pixels) and each normalised to its own peak; the error is max |I - I_ref| / max(I_ref). Ours is
   also given with the normalisation of ``autoalign benchmark`` (our unaberrated peak). The peer
   supports a vortex mask (``special_phase_mask='vortex'``), so the comparison is vortex against
   vortex; ``--no-vortex`` compares the plain focus instead (our ``Optics.beam = 'none'``). The
   peer's pupil sampling is then raised (64, 128, 192, 256, 384, ...) until its error is <= ours or
   ``--max-pupil`` is reached, and its stacks are timed at that sampling (in chunks of planes when a
   whole stack would not fit in memory).

Like-for-like settings of the peer (checked against the quadrature, see the printed errors):
``pix_size`` and ``defocus_step`` are passed as ``p (n - 1) / n`` because the peer spans its field
and z range end-point inclusive (``linspace(-fov/2, fov/2, n)``); ``apod_factor=True`` gives the
aplanatic ``sqrt(cos theta)`` that, with its ``1/s_z`` Jacobian, equals our ``1/sqrt(cos theta)``;
``n_i = n_i0 =`` immersion index (no Gibson-Lanni); the wavelength in nm (vacuum). The peer's vortex
``atan2(kx, ky)`` is charge -1 in its pupil frame and its focal frame is mirrored relative to ours,
so our (charge l, circular hand s) becomes its circular hand ``-s l``; for these unaberrated,
circularly polarised beams the intensity depends only on the radius, which is also what makes the
reference cheap (one quadrature per distinct radius, spot-checked at off-axis points).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


PEER_LADDER = (64, 128, 192, 256, 384, 512, 640, 768, 1024, 1536, 2048)


def import_peer():
    """The peer's propagator class and version, or exit with how to install it."""
    try:
        from psf_generator import VectorialCartesianPropagator
    except ModuleNotFoundError as exc:
        if exc.name == "zernikepy":
            hint = "psf-generator imports zernikepy at import time: pip install --no-deps zernikepy"
        else:
            hint = "pip install --no-deps psf_generator-0.1.0-py3-none-any.whl (and zernikepy)"
        sys.exit(f"peer library not importable ({exc}); it is not an autoalign dependency. {hint}")
    return VectorialCartesianPropagator, importlib.metadata.version("psf-generator")


# ------------------------------------------------------------------ reference
def radial_reference(optics, cx: np.ndarray, cy: np.ndarray, spot_checks: int = 4, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Brute-force in-focus intensity |E|^2 on the grid cy x cx (µm), unnormalised. The unaberrated,
    centred beam with circular polarisation has a rotationally symmetric intensity, so the Debye
    quadrature runs once per distinct radius (on the +x axis); a few off-axis grid points are also
    evaluated directly and their largest relative deviation is reported."""
    from autoalign.simulation import debye_quadrature

    xx, yy = np.meshgrid(cx, cy)
    r = np.hypot(xx, yy)
    radii, inverse = np.unique(np.round(r, 9), return_inverse=True)
    t0 = time.perf_counter()
    profile = (np.abs(debye_quadrature(optics, radii, 0 * radii, 0 * radii)) ** 2).sum(0)
    seconds = time.perf_counter() - t0
    image = profile[inverse].reshape(r.shape)
    rng = np.random.default_rng(seed)
    iy, ix = rng.integers(0, len(cy), spot_checks), rng.integers(0, len(cx), spot_checks)
    direct = (np.abs(debye_quadrature(optics, cx[ix], cy[iy], 0 * cx[ix])) ** 2).sum(0)
    deviation = float(np.abs(direct - image[iy, ix]).max() / image.max())
    return image, {"radii": int(len(radii)), "seconds": seconds, "symmetry_check": deviation}


def max_rel_error(image: np.ndarray, ref: np.ndarray) -> float:
    """Both normalised to their own peak: max |a - b| (i.e. relative to the reference's peak)."""
    return float(np.abs(image / image.max() - ref / ref.max()).max())


# ------------------------------------------------------------------ peer
class Peer:
    """One psf-generator vectorial Cartesian propagator matching our optics and output grid."""

    def __init__(self, cls, optics, n_pupil: int, n_px: int, pixel_um: float, planes: int, dz_um: float,
                 device: str, vortex: bool, zernike: np.ndarray | None = None) -> None:
        s2 = 1 / math.sqrt(2)
        hand = {"circular_plus": 1, "circular_minus": -1}[optics.polarisation]
        peer_hand = -hand * (optics.vortex_charge if vortex else 1)  # its vortex is charge -1, mirrored frame
        self.kwargs = dict(
            n_pix_pupil=n_pupil, n_pix_psf=n_px, device=device,
            special_phase_mask="vortex" if vortex else None,
            e0x=s2, e0y=peer_hand * 1j * s2,
            wavelength=optics.wavelength_um * 1e3, na=optics.numerical_aperture,
            pix_size=pixel_um * 1e3 * (n_px - 1) / n_px,
            defocus_step=dz_um * 1e3 * (planes - 1) / planes if planes > 1 else 0.0, n_defocus=planes,
            apod_factor=True, gibson_lanni=False,
            n_i=optics.immersion_index, n_i0=optics.immersion_index,
        )
        self.prop = cls(**self.kwargs)
        if zernike is not None:
            self.prop.zernike_coefficients = torch.as_tensor(zernike, dtype=torch.float32)
        self.n_pupil, self.n_px, self.planes = n_pupil, n_px, planes
        p = self.prop
        self.z_nm = np.linspace(float(p.defocus_min), float(p.defocus_max), planes)
        self.pixel_nm = p.fov / (n_px - 1)  # its field spans -fov/2 .. fov/2 end-point inclusive
        self.chunk = planes
        self._filters = p.defocus_filters

    def intensity(self) -> np.ndarray:
        """|E|^2 (planes, n, n) on the host: compute_focus_field over all planes (in chunks of
        ``self.chunk`` planes by slicing its defocus filters when memory requires)."""
        p = self.prop
        if self.chunk >= self.planes:
            f = p.compute_focus_field()
            return (f.real**2 + f.imag**2).sum(dim=1).cpu().numpy()
        out = []
        try:
            for i in range(0, self.planes, self.chunk):
                p.defocus_filters = self._filters[i : i + self.chunk]
                f = p.compute_focus_field()
                out.append((f.real**2 + f.imag**2).sum(dim=1).cpu())
        finally:
            p.defocus_filters = self._filters
        return torch.cat(out).numpy()

    def fit_memory(self, device: str) -> None:
        """Choose the plane chunk so that the peak memory (~4 arrays of planes x 3 x fft^2 complex64,
        from the chirp-z transform) stays under half of what is available."""
        fft = 2 ** math.ceil(math.log2(self.n_pupil + self.n_px - 1))
        per_plane = 4 * 3 * fft * fft * 8 + 4 * self.n_pupil**2 * 8 * 3
        budget = 0.5 * available_memory(device)
        chunk = self.planes
        while chunk > 1 and chunk * per_plane > budget:
            chunk = (chunk + 1) // 2
        self.chunk = chunk


def available_memory(device: str) -> float:
    if device.startswith("cuda"):
        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8e9


# ------------------------------------------------------------------ timing
def interleaved(fns: dict, repeats: int) -> dict:
    """Time each callable once per round, rounds repeated; returns best and median seconds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"best_s": min(v), "median_s": statistics.median(v), "all_s": v} for k, v in times.items()}


def rate(t: dict, items: int = 1) -> dict:
    return {"best": items / t["best_s"], "median": items / t["median_s"]}


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=None, help="settings YAML (default: the packaged settings)")
    p.add_argument("--device", default="cpu", help="torch device for both libraries: cpu (default) or cuda[:k]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 3, quick 2)")
    p.add_argument("--batch", type=int, default=None, help="our ortho-section triplets per batch (default 64, quick 8)")
    p.add_argument("--pupil-samples", type=int, default=None, help="our pupil nodes per axis (default: settings)")
    p.add_argument("--max-pupil", type=int, default=None, help="largest peer n_pix_pupil tried (default 1024, quick 256)")
    p.add_argument("--no-vortex", action="store_true", help="compare the plain focus (our beam='none', no peer mask)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: 32 px, 32 planes, batch 8, 2 rounds, peer <= 256")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    for name in ("threads", "repeats", "batch", "pupil_samples", "max_pupil"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    peer_cls, peer_version = import_peer()
    from autoalign.settings import load_settings
    from autoalign.simulation import PSFSimulator
    from autoalign.simulation.zernike import rms

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch sees no CUDA device")
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    batch = args.batch or (8 if quick else 64)
    max_pupil = args.max_pupil or (256 if quick else 1024)
    settings = load_settings(args.settings)
    vortex = not args.no_vortex

    overrides: dict = {"device": args.device}
    if args.pupil_samples:
        overrides["pupil_samples"] = args.pupil_samples
    if args.no_vortex:
        overrides["beam"] = "none"
    dz = settings.stack.z_step_um
    if quick:
        overrides["n_px"] = 32
        overrides["z_um"] = (np.arange(32) - 16) * dz
    sim = PSFSimulator.from_settings(settings, **overrides)
    o = sim.optics
    if o.polarisation not in ("circular_plus", "circular_minus"):
        sys.exit(f"polarisation {o.polarisation!r}: this comparison needs circular polarisation (rotationally symmetric beam)")
    if vortex and (o.beam != "vortex" or abs(o.vortex_charge) != 1):
        sys.exit(f"beam {o.beam!r}, charge {o.vortex_charge}: the peer only has a charge-1 vortex; use --no-vortex")
    n, planes = sim.n_px, len(sim.z_um)
    if planes != n:
        sys.exit("ortho-sections need as many planes as pixels")
    pix = sim.pixel_size_um
    peer_default = inspect.signature(peer_cls).parameters["n_pix_pupil"].default

    # workloads: 15-mode aberrations on both sides (<= 1 rad RMS on ours, as `autoalign benchmark`)
    rng = np.random.default_rng(0)
    coeffs = np.zeros((batch, 15))
    coeffs[:, 4:15] = rng.uniform(-0.5, 0.5, (batch, 11))
    coeffs *= np.minimum(1.0, 1.0 / np.maximum(rms(coeffs), 1e-9))[:, None]
    peer_zernike = np.zeros(15)
    peer_zernike[3:] = rng.uniform(-0.3, 0.3, 12)  # OSA 0..14, its unnormalised convention

    # ---- accuracy: references on both grids
    ours_grid = sim.coords_um
    peer_grid = (np.arange(n) - (n - 1) / 2) * pix
    ref_ours, info_ours = radial_reference(o, ours_grid, ours_grid)
    ref_peer, info_peer = radial_reference(o, peer_grid, peer_grid)
    with torch.no_grad():
        xy = sim.orthosections(np.zeros(15))[0]
    ours_err = max_rel_error(xy, ref_ours)
    ours_err_bench = float(np.abs(xy - ref_ours / sim._peak).max() / (ref_ours / sim._peak).max())

    ladder = sorted({k for k in PEER_LADDER if k <= max_pupil} | {peer_default, max_pupil})
    peer_errors: dict[int, float] = {}
    n_eq, reached = ladder[-1], False
    for k in ladder:
        single = Peer(peer_cls, o, k, n, pix, 1, 0.0, args.device, vortex)
        with torch.no_grad():
            peer_errors[k] = max_rel_error(single.intensity()[0], ref_peer)
        del single
        if peer_errors[k] <= ours_err:
            n_eq, reached = k, True
            break
    if peer_default not in peer_errors:
        single = Peer(peer_cls, o, peer_default, n, pix, 1, 0.0, args.device, vortex)
        peer_errors[peer_default] = max_rel_error(single.intensity()[0], ref_peer)
        del single

    # ---- throughput, interleaved
    peers = {"peer_default": Peer(peer_cls, o, peer_default, n, pix, planes, dz, args.device, vortex, peer_zernike)}
    if n_eq != peer_default:
        peers["peer_equal"] = Peer(peer_cls, o, n_eq, n, pix, planes, dz, args.device, vortex, peer_zernike)
    for p in peers.values():
        p.fit_memory(args.device)
    fns = {
        "ours_triplets": lambda: sim.orthosections_batch(coeffs, chunk=batch),
        "ours_stack": lambda: sim.stack(coeffs[0]),
    }
    for name, p in peers.items():
        fns[name] = p.intensity
    with torch.no_grad():
        for fn in fns.values():  # warm-up (allocator, FFT plans, CUDA kernels)
            fn()
        timing = interleaved(fns, repeats)

    ours_trip = rate(timing["ours_triplets"], batch)
    ours_stack = rate(timing["ours_stack"])
    peer_rates = {k: rate(timing[k]) for k in peers}
    eq_key = "peer_equal" if "peer_equal" in peers else "peer_default"

    def ratios(key: str) -> dict:
        pr = peer_rates[key]
        return {m: {"triplets": ours_trip[m] / pr[m], "stacks": ours_stack[m] / pr[m]} for m in ("best", "median")}

    device_name = args.device
    if args.device.startswith("cuda"):
        device_name += f" ({torch.cuda.get_device_name(torch.device(args.device))})"
    result = {
        "peer": f"psf-generator {peer_version} VectorialCartesianPropagator",
        "device": device_name,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "beam": "vortex (both)" if vortex else "no mask (ours: Optics.beam='none'; peer: special_phase_mask=None)",
        "optics": {"na": o.numerical_aperture, "n": o.immersion_index, "wavelength_um": o.wavelength_um,
                   "polarisation": o.polarisation, "vortex_charge": o.vortex_charge if vortex else 0,
                   "pixel_um": pix, "z_step_um": dz, "px": n, "planes": planes},
        "peer_grid": {"pixel_nm": peers["peer_default"].pixel_nm,
                      "z_step_nm": float(np.diff(peers["peer_default"].z_nm).mean()) if planes > 1 else 0.0,
                      "z_range_nm": [float(peers["peer_default"].z_nm[0]), float(peers["peer_default"].z_nm[-1])],
                      "hand_e0y": str(peers["peer_default"].kwargs["e0y"])},
        "ours_pupil_samples": sim.pupil_samples,
        "batch": batch,
        "reference": {"ours_grid": info_ours, "peer_grid": info_peer},
        "accuracy": {
            "ours_error": ours_err,
            "ours_error_benchmark_normalisation": ours_err_bench,
            "peer_errors": {str(k): v for k, v in peer_errors.items()},
            "peer_equal_accuracy_pupil": n_eq,
            "equal_accuracy_reached": reached,
        },
        "throughput": {
            "ours_triplets_per_s": ours_trip,
            "ours_stacks_per_s": ours_stack,
            "peer_default_pupil": peer_default,
            "peer_default_stacks_per_s": peer_rates["peer_default"],
            "peer_equal_stacks_per_s": peer_rates[eq_key],
            "peer_equal_plane_chunk": peers[eq_key].chunk,
            "ratio_at_default": ratios("peer_default"),
            "ratio_at_equal_accuracy": ratios(eq_key),
        },
        "timing_s": timing,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_table(result, n, planes)
    return 0


def print_table(r: dict, n: int, planes: int) -> None:
    o, a, t, g = r["optics"], r["accuracy"], r["throughput"], r["peer_grid"]
    print(f"autoalign PSFSimulator vs {r['peer']}")
    print(f"  optics: NA {o['na']}, n {o['n']}, lambda {o['wavelength_um'] * 1e3:.0f} nm, {o['polarisation']}, "
          f"beam: {r['beam']}")
    print(f"  grid: {n}x{n} px of {o['pixel_um'] * 1e3:.1f} nm, {planes} planes of {o['z_step_um'] * 1e3:.1f} nm "
          f"(peer: {g['pixel_nm']:.2f} nm px, {g['z_step_nm']:.2f} nm step, "
          f"z {g['z_range_nm'][0]:.0f}..{g['z_range_nm'][1]:.0f} nm, "
          f"e0y = {g['hand_e0y']})")
    print(f"  device {r['device']}, {r['threads']} torch threads, {r['repeats']} interleaved rounds, "
          f"our batch {r['batch']}, our pupil {r['ours_pupil_samples']}")
    ref = r["reference"]
    print(f"  reference: debye_quadrature at {ref['ours_grid']['radii']} + {ref['peer_grid']['radii']} radii "
          f"({ref['ours_grid']['seconds'] + ref['peer_grid']['seconds']:.1f} s), symmetry spot-check "
          f"{max(ref['ours_grid']['symmetry_check'], ref['peer_grid']['symmetry_check']):.1e}")
    print()
    print("Accuracy (unaberrated in-focus xy, each normalised to its own peak, max |I - I_ref| / max I_ref)")
    print(f"  ours, pupil {r['ours_pupil_samples']:<5d}            {a['ours_error']:.2e}   "
          f"(benchmark normalisation: {a['ours_error_benchmark_normalisation']:.2e})")
    for k, v in a["peer_errors"].items():
        mark = "  <= ours" if v <= a["ours_error"] else ""
        print(f"  peer, n_pix_pupil {k:<6s}      {v:.2e}{mark}")
    eq = a["peer_equal_accuracy_pupil"]
    if not a["equal_accuracy_reached"]:
        print(f"  peer did not reach our error by n_pix_pupil {eq} (--max-pupil): ratios below are lower bounds")
    print()
    print(f"Throughput ({n} px, {planes} planes; rate = best / median of rounds)")
    print(f"  {'':40s}{'best':>12s}{'median':>12s}")

    def row(label: str, rr: dict, fmt: str = "12.2f") -> None:
        print(f"  {label:40s}{rr['best']:{fmt}}{rr['median']:{fmt}}")

    row("ours: ortho-section triplets / s", t["ours_triplets_per_s"], "12.1f")
    row(f"ours: {planes}-plane stacks / s", t["ours_stacks_per_s"])
    row(f"peer @ pupil {t['peer_default_pupil']} (default): stacks / s", t["peer_default_stacks_per_s"], "12.3f")
    chunk = t["peer_equal_plane_chunk"]
    note = ("equal acc." if a["equal_accuracy_reached"] else "cap") + (f", {chunk}-plane chunks" if chunk < planes else "")
    row(f"peer @ pupil {eq} ({note}): stacks / s", t["peer_equal_stacks_per_s"], "12.3f")
    print("  ratios ours / peer (a peer triplet needs its whole stack):")
    last = "equal accuracy" if a["equal_accuracy_reached"] else f"pupil {eq} (>=)"
    for label, key in (("default", "ratio_at_default"), (last, "ratio_at_equal_accuracy")):
        rr = t[key]
        print(f"    at {label:15s} triplets {rr['best']['triplets']:9.1f}x (median {rr['median']['triplets']:.1f}x)"
              f"   stacks {rr['best']['stacks']:7.1f}x (median {rr['median']['stacks']:.1f}x)")


if __name__ == "__main__":
    raise SystemExit(main())
