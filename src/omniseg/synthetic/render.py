"""Procedural rendering of stained kidney cortex with the full ground truth of every tissue.

The renderer works in two passes:

1. **Layout** (:func:`_layout`), in micrometres, on a coarse grid of about 1 um spacing:
   glomeruli and arteries are placed first (rejection sampling), then tubules fill the rest as
   the cells of a power (weighted Voronoi) diagram of jittered lattice seeds, shrunk by a thin
   interstitium and pushed away from every other object; peritubular capillaries sit on the
   interstitium between neighbouring tubules. Each tubule is described by smooth distance
   fields (``T``: depth inside the tubule, ``lam``: signed distance to its lumen) that are cheap
   to interpolate. Nuclei and red blood cells become a list of elliptical *stamps*.
2. **Raster** (:func:`_raster_tile`), tile by tile at the output resolution: the coarse fields are
   upsampled bilinearly and thresholded into a material map, round objects (glomeruli, arteries,
   capillaries) are drawn analytically in their bounding boxes, stamps are splatted with
   ``np.bincount``, and colour comes from a per-stain optical-density palette (Beer-Lambert) with
   per-image stain jitter, texture noise and a slight blur.

All coordinates are ``(row, col)``; layout quantities are in micrometres from the top-left
pixel centre of the output image, so the same code renders at any pixel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from omniseg.tissues import TissueTable

#: Stain codes the renderer knows: H&E, PAS, Jones silver, Masson trichrome.
STAINS: tuple[str, ...] = ("he", "pas", "sil", "tri")

#: Structures the renderer can draw, by tissue key. Other keys get all-False masks.
DRAWN: tuple[str, ...] = ("dt", "pt", "cap", "tuft", "ves", "ptc")

#: RGB of bare glass outside a tissue mask.
GLASS_RGB = (240, 240, 240)

_TILE = 2048  # raster tile edge in output pixels (memory stays bounded for slide-sized shapes)
_NA = 4096  # angular samples of the radial profiles of round objects
_ANGLES = np.linspace(-np.pi, np.pi, _NA, endpoint=False)
_BLUR_UM = 0.18  # optical blur (sigma, um) of the 3-tap binomial filter, ~0.7 px at 40x

# ---------------------------------------------------------------------------------------------
# Materials and stain palettes
# ---------------------------------------------------------------------------------------------
_MATERIALS = (
    "glass",
    "stroma",  # interstitium
    "pt_cyto",  # proximal tubule epithelium
    "pt_brush",  # brush border (apical, fuzzy)
    "dt_cyto",  # distal tubule epithelium
    "lumen",  # tubular lumen
    "tbm",  # tubular basement membrane
    "bc_wall",  # Bowman's capsule (parietal epithelium + basement membrane)
    "bc_space",  # Bowman's space
    "tuft",  # mesangium and cells of the glomerular tuft
    "tuft_lumen",  # glomerular capillary lumen
    "gbm",  # glomerular basement membrane around capillary lumens
    "media",  # arterial smooth muscle
    "elastic",  # internal / external elastic lamina
    "v_lumen",  # arterial lumen (plasma)
    "advent",  # adventitia (dense collagen)
    "endo",  # endothelium / intima / capillary wall
    "ptc_lumen",  # capillary lumen (plasma)
)
_M = {name: i for i, name in enumerate(_MATERIALS)}

# Typical RGB of every material under each stain (before jitter); nucleus and red cell colours.
# fmt: off
_PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "he": {
        "glass": GLASS_RGB, "stroma": (214, 172, 208), "pt_cyto": (194, 96, 160),
        "pt_brush": (206, 122, 178), "dt_cyto": (208, 152, 202), "lumen": (238, 228, 236),
        "tbm": (188, 108, 170), "bc_wall": (190, 108, 172), "bc_space": (238, 228, 236),
        "tuft": (182, 108, 182), "tuft_lumen": (232, 214, 230), "gbm": (180, 96, 170),
        "media": (208, 110, 164), "elastic": (196, 100, 166), "v_lumen": (236, 224, 234),
        "advent": (220, 160, 198), "endo": (204, 128, 180), "ptc_lumen": (232, 214, 228),
        "nucleus": (72, 40, 118), "rbc": (206, 42, 64),
    },
    "pas": {
        "glass": GLASS_RGB, "stroma": (214, 184, 214), "pt_cyto": (188, 138, 194),
        "pt_brush": (166, 74, 158), "dt_cyto": (206, 178, 212), "lumen": (236, 228, 236),
        "tbm": (146, 40, 132), "bc_wall": (150, 48, 136), "bc_space": (238, 230, 238),
        "tuft": (172, 92, 170), "tuft_lumen": (228, 212, 228), "gbm": (138, 38, 130),
        "media": (194, 148, 200), "elastic": (146, 56, 138), "v_lumen": (236, 228, 236),
        "advent": (204, 158, 200), "endo": (164, 84, 154), "ptc_lumen": (226, 208, 222),
        "nucleus": (68, 52, 134), "rbc": (200, 62, 92),
    },
    "sil": {
        "glass": GLASS_RGB, "stroma": (214, 198, 204), "pt_cyto": (214, 168, 184),
        "pt_brush": (172, 150, 156), "dt_cyto": (222, 200, 206), "lumen": (238, 235, 235),
        "tbm": (52, 46, 46), "bc_wall": (46, 40, 40), "bc_space": (238, 235, 235),
        "tuft": (150, 128, 134), "tuft_lumen": (226, 214, 216), "gbm": (36, 30, 30),
        "media": (206, 160, 172), "elastic": (60, 50, 50), "v_lumen": (238, 235, 235),
        "advent": (178, 164, 166), "endo": (90, 78, 78), "ptc_lumen": (228, 222, 222),
        "nucleus": (88, 84, 112), "rbc": (200, 118, 108),
    },
    "tri": {
        "glass": GLASS_RGB, "stroma": (160, 188, 224), "pt_cyto": (204, 82, 98),
        "pt_brush": (200, 98, 122), "dt_cyto": (216, 134, 150), "lumen": (236, 234, 240),
        "tbm": (72, 110, 190), "bc_wall": (62, 100, 186), "bc_space": (236, 234, 240),
        "tuft": (150, 118, 178), "tuft_lumen": (226, 214, 230), "gbm": (80, 108, 190),
        "media": (196, 72, 92), "elastic": (120, 80, 130), "v_lumen": (236, 234, 240),
        "advent": (100, 140, 210), "endo": (112, 128, 200), "ptc_lumen": (226, 218, 232),
        "nucleus": (62, 40, 62), "rbc": (226, 62, 42),
    },
}

# Texture amplitudes per material: (mid-scale ~2.5 um mottling, pixel grain), relative to OD.
_TEXTURE = {
    "glass": (0.0, 0.05), "stroma": (0.25, 0.2), "pt_cyto": (0.26, 0.22),
    "pt_brush": (0.22, 0.35), "dt_cyto": (0.2, 0.18), "lumen": (0.35, 0.2),
    "tbm": (0.1, 0.1), "bc_wall": (0.1, 0.1), "bc_space": (0.35, 0.2), "tuft": (0.22, 0.2),
    "tuft_lumen": (0.25, 0.2), "gbm": (0.1, 0.1), "media": (0.15, 0.15), "elastic": (0.1, 0.1),
    "v_lumen": (0.35, 0.2), "advent": (0.32, 0.24), "endo": (0.1, 0.1), "ptc_lumen": (0.25, 0.2),
}
# fmt: on
_TEX_MID = np.array([_TEXTURE[m][0] for m in _MATERIALS], np.float32)
_TEX_HI = np.array([_TEXTURE[m][1] for m in _MATERIALS], np.float32)

# Kind codes of the coarse tubule map.
_PT, _DT = 1, 2


@dataclass
class _Stain:
    """Per-image optical densities: ``od`` (n_materials, 3), nucleus/red cell (3,), light (3,)."""

    od: np.ndarray
    od_nuc: np.ndarray
    od_rbc: np.ndarray
    light: np.ndarray


def _stain(rng: np.random.Generator, stain: str) -> _Stain:
    """Optical densities of one image's stain with random jitter (intensity, hue, light)."""
    pal = _PALETTES[stain]

    def od(rgb):
        return -np.log(np.clip(np.asarray(rgb, np.float64), 1, None) / 245.0)

    table = np.stack([od(pal[m]) for m in _MATERIALS])
    nuc, rbc = od(pal["nucleus"]), od(pal["rbc"])
    # near-identity mixing in OD space: stain strength and hue vary from slide to slide
    jitter = np.diag(np.exp(rng.normal(0.0, 0.1, 3))) + rng.normal(0.0, 0.02, (3, 3))
    strength = math.exp(rng.normal(0.0, 0.12))
    table, nuc, rbc = (np.clip(x @ jitter * strength, 0.0, None) for x in (table, nuc, rbc))
    table[_M["glass"]] = od(GLASS_RGB)
    light = np.clip(245.0 + rng.normal(0.0, 3.0, 3), 225.0, 255.0)
    return _Stain(
        table.astype(np.float32),
        nuc.astype(np.float32),
        rbc.astype(np.float32),
        light.astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
@dataclass
class _Glom:
    """A glomerulus: capsule outline ``r_cap`` around (cy, cx) and tuft outline around (ty, tx),
    radial profiles in um sampled at ``_ANGLES``; ``wall`` capsule thickness; ``loops`` the
    capillary loops of the tuft as stamp rows (see :func:`_stamps`), lumen radius ``a``."""

    cy: float
    cx: float
    r_cap: np.ndarray
    wall: float
    ty: float
    tx: float
    r_tuft: np.ndarray
    loops: np.ndarray = field(default_factory=lambda: np.zeros((0, 7), np.float32))

    @property
    def reach(self) -> float:
        return float(self.r_cap.max())


@dataclass
class _Artery:
    """An artery centred at (cy, cx): outer media ``r_out``, internal elastic lamina ``r_iel``,
    lumen ``r_lum`` and adventitia ``r_adv`` radial profiles (um); ``eel`` draws an external
    lamina."""

    cy: float
    cx: float
    r_out: np.ndarray
    r_iel: np.ndarray
    r_lum: np.ndarray
    r_adv: np.ndarray
    eel: bool

    @property
    def reach(self) -> float:
        return float(self.r_adv.max())


@dataclass
class _Layout:
    """Everything the raster pass needs. Coarse node (i, j) sits at output pixel
    ((i - m) * f, (j - m) * f), i.e. at ((i - m) * s, (j - m) * s) um."""

    shape: tuple[int, int]
    um: float  # output um per pixel
    f: int  # output pixels per coarse node
    m: int  # coarse margin, nodes
    T: np.ndarray  # (hc, wc) depth inside a tubule, um (< 0 outside)
    lam: np.ndarray  # (hc, wc) signed distance to the tubule's lumen, um (> 0 in the lumen)
    kind: np.ndarray  # (hc, wc) int8: 0 none, _PT, _DT
    group: np.ndarray  # (hc, wc) int32 tubule instance id, -1 none
    tex: np.ndarray  # (hc, wc) mid-scale texture noise
    gloms: list[_Glom]
    arteries: list[_Artery]
    ptc: np.ndarray  # (n, 6): cy, cx, a, b, angle, wall (um, rad); lumen semi-axes a >= b
    nuclei: np.ndarray  # (n, 7): cy, cx, a, b, angle, darkness, rim (um, rad, -)
    rbcs: np.ndarray  # (n, 7) same columns
    grain: np.ndarray  # (P, P) periodic pixel-grain noise
    stain: _Stain

    @property
    def s(self) -> float:
        return self.f * self.um


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Unit-variance Gaussian random field of correlation length ``scale`` (in grid nodes)."""
    q = max(1, int(scale // 3))  # generate coarser and interpolate when the scale is large
    small = (shape[0] // q + 3, shape[1] // q + 3)
    field_ = ndi.gaussian_filter(
        rng.standard_normal(small).astype(np.float32), scale / q, mode="wrap"
    )
    if q > 1:
        field_ = _upsample(field_, q)[: shape[0], : shape[1]]
    field_ = field_[: shape[0], : shape[1]]
    return (field_ - field_.mean()) / max(float(field_.std()), 1e-6)


def _upsample(a: np.ndarray, f: int) -> np.ndarray:
    """Bilinear upsampling by an integer factor: node k of ``a`` lands on output index k * f.

    Returns shape ((h - 1) * f, (w - 1) * f) (the last node row/column only closes the ramp).
    """
    if f == 1:
        return a[:-1, :-1]
    t = np.arange(f, dtype=np.float32) / f
    a0 = a[:-1]
    rows = (a0[:, None, :] + (a[1:] - a0)[:, None, :] * t[None, :, None]).reshape(-1, a.shape[1])
    r0 = rows[:, :-1]
    return (r0[:, :, None] + (rows[:, 1:] - r0)[:, :, None] * t).reshape(rows.shape[0], -1)


def _profile(rng: np.random.Generator, radius: float, harmonics: list[tuple[int, float]]):
    """Radial profile r(theta) = radius * (1 + sum a_k cos(k theta + phi_k)), at ``_ANGLES``."""
    r = np.ones(_NA)
    for k, amp in harmonics:
        r += amp * rng.uniform(0.3, 1.0) * np.cos(k * _ANGLES + rng.uniform(0, 2 * np.pi))
    return (radius * r).astype(np.float32)


def _angle_index(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Index into ``_ANGLES`` of the direction (dy, dx)."""
    idx = ((np.arctan2(dy, dx) + np.pi) * (_NA / (2 * np.pi))).astype(np.int32)
    idx[idx >= _NA] = 0
    return idx


def _make_glom(rng: np.random.Generator, cy: float, cx: float) -> _Glom:
    radius = rng.uniform(75.0, 118.0)
    r_cap = _profile(rng, radius, [(2, 0.08), (3, 0.035), (4, 0.025)])
    wall = rng.uniform(2.0, 3.5)
    space = rng.uniform(3.0, 11.0)  # mean width of Bowman's space
    pole = rng.uniform(-np.pi, np.pi)
    shift = 0.75 * space
    ty, tx = cy + shift * math.sin(pole), cx + shift * math.cos(pole)
    r_tuft = _profile(
        rng, radius - wall - space, [(2, 0.06), (5, 0.05), (6, 0.04), (7, 0.04), (9, 0.03)]
    )
    # a few clefts between lobules
    for _ in range(rng.integers(2, 6)):
        centre, width = rng.uniform(-np.pi, np.pi), rng.uniform(0.04, 0.09)
        dang = np.angle(np.exp(1j * (_ANGLES - centre)))
        r_tuft *= 1.0 - rng.uniform(0.08, 0.2) * np.exp(-0.5 * (dang / width) ** 2)
    return _Glom(cy, cx, r_cap, wall, ty, tx, r_tuft.astype(np.float32))


def _make_artery(rng: np.random.Generator, cy: float, cx: float) -> _Artery:
    radius = rng.uniform(40.0, 110.0)
    shape = [(2, 0.12), (3, 0.04)]
    seed_shape = rng.integers(0, 2**31)
    r_out = _profile(np.random.default_rng(seed_shape), radius, shape)
    r_lum = _profile(np.random.default_rng(seed_shape), radius * rng.uniform(0.42, 0.62), shape)
    r_lum = r_lum * (1 + _profile(rng, 1.0, [(3, 0.06), (5, 0.04)]) - 1)
    intima = rng.uniform(1.5, 3.5)
    waves = max(8, int(2 * np.pi * float(r_lum.mean()) / rng.uniform(4.0, 7.0)))
    r_iel = r_lum + intima + 0.7 * np.sin(waves * _ANGLES + rng.uniform(0, 2 * np.pi))
    r_adv = r_out + _profile(rng, rng.uniform(5.0, 14.0), [(2, 0.4), (3, 0.3), (5, 0.2)])
    return _Artery(
        cy,
        cx,
        r_out,
        r_iel.astype(np.float32),
        r_lum.astype(np.float32),
        r_adv.astype(np.float32),
        bool(rng.random() < 0.6),
    )


def _polar_window(lo_y, lo_x, n_y, n_x, step, cy, cx):
    """Offsets (dy (n_y, 1), dx (1, n_x)) in um of a grid window from the centre (cy, cx)."""
    dy = (lo_y + np.arange(n_y, dtype=np.float32)[:, None]) * step - cy
    dx = (lo_x + np.arange(n_x, dtype=np.float32)[None, :]) * step - cx
    return dy, dx


def _coarse_window(
    lay_m: int, s: float, shape_c: tuple[int, int], cy: float, cx: float, reach: float
):
    """Slices of the coarse grid covering a disc, and the node offset of its top-left corner."""
    i0 = max(0, int(math.floor((cy - reach) / s)) + lay_m)
    i1 = min(shape_c[0], int(math.ceil((cy + reach) / s)) + lay_m + 1)
    j0 = max(0, int(math.floor((cx - reach) / s)) + lay_m)
    j1 = min(shape_c[1], int(math.ceil((cx + reach) / s)) + lay_m + 1)
    return i0, i1, j0, j1


def _thin(points: np.ndarray, rng: np.random.Generator, spacing: float) -> np.ndarray:
    """Blue-noise subset of ``points`` (n, 2) um: one per grid cell, then no pair < 0.75 spacing."""
    if len(points) == 0:
        return points
    prio = rng.permutation(len(points))
    pts = points[prio]
    cells = np.floor(pts / spacing).astype(np.int64)
    key = (cells[:, 0] - cells[:, 0].min()) * (cells[:, 1].max() - cells[:, 1].min() + 1) + (
        cells[:, 1] - cells[:, 1].min()
    )
    _, first = np.unique(key, return_index=True)
    pts = pts[np.sort(first)]
    pairs = cKDTree(pts).query_pairs(0.75 * spacing, output_type="ndarray")
    if len(pairs):
        keep = np.ones(len(pts), bool)
        keep[np.maximum(pairs[:, 0], pairs[:, 1])] = False
        pts = pts[keep]
    return pts


def _stamps(rng, pts, a, aspect, angle, dark, rim) -> np.ndarray:
    """Stamp rows (cy, cx, a, b, angle, darkness, rim) for ``pts`` (n, 2) um.

    Each parameter is a scalar or a ``(low, high)`` range drawn uniformly per stamp; ``a`` is
    the long semi-axis (um), ``aspect`` = b / a, ``rim`` how much paler the centre is.
    """
    n = len(pts)

    def col(v):
        if isinstance(v, tuple):
            return rng.uniform(v[0], v[1], n)
        return np.broadcast_to(np.asarray(v, np.float64), (n,))

    a_ = col(a)
    return np.column_stack(
        [pts[:, 0], pts[:, 1], a_, a_ * col(aspect), col(angle), col(dark), col(rim)]
    ).reshape(n, 7)


@dataclass
class _Grid:
    """The coarse grid of one image: node (i, j) sits at ((i - m) * s, (j - m) * s) um; ``tc``
    is the tissue at each node (None: tissue everywhere), ``tc_near`` the same with some slack."""

    H: int
    W: int
    f: int  # output pixels per node
    s: float  # node spacing, um
    m: int  # margin, nodes
    hc: int
    wc: int
    size_y: float  # image size, um
    size_x: float
    centre: np.ndarray
    ys: np.ndarray  # node coordinates, um
    xs: np.ndarray
    tc: np.ndarray | None
    tc_near: np.ndarray | None

    @classmethod
    def make(cls, shape: tuple[int, int], um: float, tissue: np.ndarray | None) -> _Grid:
        H, W = shape
        f = max(1, round(1.0 / um))
        s = f * um  # coarse spacing, um
        m = int(math.ceil(70.0 / s)) + 1  # margin: objects beyond the border still shape the edge
        hc, wc = (H - 1) // f + 2 + 2 * m, (W - 1) // f + 2 + 2 * m
        centre = np.array([(H - 1) * um / 2, (W - 1) * um / 2])
        ys, xs = (np.arange(hc) - m) * s, (np.arange(wc) - m) * s
        tc = tc_near = None
        if tissue is not None:
            tc = np.zeros((hc, wc), bool)
            sub = tissue[::f, ::f]
            tc[m : m + sub.shape[0], m : m + sub.shape[1]] = sub
            tc_near = ndi.binary_dilation(tc, iterations=max(1, int(30 / s)))
        return cls(H, W, f, s, m, hc, wc, H * um, W * um, centre, ys, xs, tc, tc_near)

    def in_tissue(self, y, x) -> bool:
        if self.tc is None:
            return True
        i, j = int(round(y / self.s)) + self.m, int(round(x / self.s)) + self.m
        return 0 <= i < self.hc and 0 <= j < self.wc and bool(self.tc[i, j])

    def focus_centre(self, rng: np.random.Generator) -> np.ndarray:
        span = 0.1 * min(self.size_y, self.size_x)
        for _ in range(200):
            p = self.centre + rng.uniform(-span, span, 2)
            if self.in_tissue(*p):
                return p
        if self.tc is not None and self.tc.any():
            ii, jj = np.nonzero(self.tc)
            d = (self.ys[ii] - self.centre[0]) ** 2 + (self.xs[jj] - self.centre[1]) ** 2
            k = int(np.argmin(d))
            return np.array([self.ys[ii[k]], self.xs[jj[k]]])
        return self.centre

    def window(self, cy: float, cx: float, reach: float):
        """``(i0, i1, j0, j1, dy, dx)``: the nodes within ``reach`` of a point and their offsets
        from it (um); None when the window is empty."""
        i0, i1, j0, j1 = _coarse_window(self.m, self.s, (self.hc, self.wc), cy, cx, reach)
        if i0 >= i1 or j0 >= j1:
            return None
        dy, dx = _polar_window(i0 - self.m, j0 - self.m, i1 - i0, j1 - j0, self.s, cy, cx)
        return i0, i1, j0, j1, dy, dx

    def node_points(self, rng, mask: np.ndarray, spacing: float | None = None) -> np.ndarray:
        """Jittered positions (um) of the nodes in ``mask``; with ``spacing``, only a random
        share of them, still ~10 per cell of a later ``_thin(..., spacing)``."""
        s, m = self.s, self.m
        ii, jj = np.nonzero(mask)
        if spacing is not None and len(ii):
            keep = rng.random(len(ii)) < 10.0 * (s / spacing) ** 2
            ii, jj = ii[keep], jj[keep]
        pts = np.column_stack([(ii - m) * s, (jj - m) * s]).astype(np.float64)
        return pts + rng.uniform(-0.5 * s, 0.5 * s, pts.shape)


def _layout(
    rng: np.random.Generator,
    shape: tuple[int, int],
    um: float,
    stain: str,
    focus: str | None,
    tissue: np.ndarray | None,
) -> _Layout:
    """Place every object of one image and build the coarse fields (see module docstring).

    The steps draw from ``rng`` in a fixed order (same state, same image)."""
    g = _Grid.make(shape, um, tissue)
    st = _stain(rng, stain)
    gloms, arteries = _round_objects(rng, g, focus)
    B = _blocker(g, gloms, arteries)
    tub = _tubule_seeds(rng, g, B, focus)
    cells = _power_diagram(g, tub)
    n_gap = _smooth_noise(rng, (g.hc, g.wc), 6.0 / g.s)
    n_star = _smooth_noise(rng, (g.hc, g.wc), 1.8 / g.s)
    gap = rng.uniform(1.3, 2.3, tub.n).astype(np.float32)
    gap_eff = np.maximum(np.append(gap, 0.0)[cells.G] + 0.7 * n_gap, 1.3)
    ptc_rows = _capillaries(rng, g, B, tub, cells, focus)
    fields = _tubule_fields(rng, cells, tub, B, gap_eff, n_gap, n_star)
    nuclei, rbcs = _cell_stamps(rng, g, cells, fields, B)
    tex = _smooth_noise(rng, (g.hc, g.wc), 2.5 / g.s) + 0.4 * _smooth_noise(
        rng, (g.hc, g.wc), 20.0 / g.s
    )
    for glom in gloms:
        _glom_stamps(rng, g, glom, tex, nuclei, rbcs)
    for artery in arteries:
        _artery_stamps(rng, artery, nuclei, rbcs)
    _capillary_stamps(rng, ptc_rows, nuclei, rbcs)
    grain = rng.standard_normal((256, 256)).astype(np.float32)
    grain = ndi.gaussian_filter(grain, 0.6, mode="wrap")
    grain /= grain.std()

    def stack(parts):
        parts = [p for p in parts if len(p)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 7), np.float32)

    T = fields.T
    return _Layout(
        shape=(g.H, g.W),
        um=um,
        f=g.f,
        m=g.m,
        T=T.astype(np.float32),
        lam=fields.lam.astype(np.float32),
        kind=fields.kind_map,
        group=np.where(T > -3.0, cells.G, -1).astype(np.int32),
        tex=tex.astype(np.float32),
        gloms=gloms,
        arteries=arteries,
        ptc=ptc_rows.astype(np.float32),
        nuclei=stack(nuclei),
        rbcs=stack(rbcs),
        grain=grain,
        stain=st,
    )


def _round_objects(rng, g: _Grid, focus) -> tuple[list[_Glom], list[_Artery]]:
    """Glomeruli and arteries: the focus structure at the centre, then others by density."""
    gloms: list[_Glom] = []
    arteries: list[_Artery] = []
    placed: list[tuple[float, float, float]] = []  # (cy, cx, reach incl. margin)

    def free(cy, cx, reach) -> bool:
        return all(math.hypot(cy - y, cx - x) > reach + r + 6.0 for y, x, r in placed)

    if focus in ("cap", "tuft"):
        gl = _make_glom(rng, *g.focus_centre(rng))
        gloms.append(gl)
        placed.append((gl.cy, gl.cx, gl.reach))
    elif focus == "ves":
        a = _make_artery(rng, *g.focus_centre(rng))
        arteries.append(a)
        placed.append((a.cy, a.cx, a.reach))
    elif focus is not None:  # keep the centre free for the small focus structure
        placed.append((float(g.centre[0]), float(g.centre[1]), 25.0))
    area_mm2 = g.size_y * g.size_x / 1e6
    for kind, density in (("glom", 1 / 0.55), ("artery", 1 / 1.6)):
        for _ in range(rng.poisson(area_mm2 * density)):
            for _try in range(30):
                cy, cx = rng.uniform(-60, g.size_y + 60), rng.uniform(-60, g.size_x + 60)
                obj = _make_glom(rng, cy, cx) if kind == "glom" else _make_artery(rng, cy, cx)
                if free(cy, cx, obj.reach) and g.in_tissue(cy, cx):
                    (gloms if kind == "glom" else arteries).append(obj)
                    placed.append((cy, cx, obj.reach))
                    break
    return gloms, arteries


def _blocker(g: _Grid, gloms, arteries) -> np.ndarray:
    """Blocker field: > 0 inside an object grown by its margin (tubules stay where B < 0)."""
    B = np.full((g.hc, g.wc), -1e3, np.float32)

    def block(cy, cx, radius: np.ndarray, margin: float):
        w = g.window(cy, cx, float(radius.max()) + margin + 2 * g.s)
        if w is None:
            return
        i0, i1, j0, j1, dy, dx = w
        val = radius[_angle_index(dy, dx)] + margin - np.hypot(dy, dx)
        np.maximum(B[i0:i1, j0:j1], val, out=B[i0:i1, j0:j1])

    for gl in gloms:
        block(gl.cy, gl.cx, gl.r_cap, 3.0)
    for a in arteries:
        block(a.cy, a.cx, a.r_adv, 2.0)
    return B


@dataclass
class _Tubules:
    """Tubule seeds (a jittered, rotated hexagonal lattice) and their per-seed properties."""

    d: float  # lattice spacing, um
    seeds: np.ndarray  # (n, 2) um
    kinds: np.ndarray  # (n,) _PT or _DT
    weight: np.ndarray  # power-diagram weights
    r_max: np.ndarray
    group: np.ndarray  # seed -> tubule id (a seed index): merged neighbours share one

    @property
    def n(self) -> int:
        return len(self.seeds)


def _tubule_seeds(rng, g: _Grid, B: np.ndarray, focus) -> _Tubules:
    s, m, hc, wc, centre = g.s, g.m, g.hc, g.wc, g.centre
    d = rng.uniform(42.0, 50.0)
    rot = rng.uniform(0, np.pi)
    half = 0.5 * math.hypot(g.size_y, g.size_x) + 80.0
    n = int(half / d) + 2
    gi, gj = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    ly = gi * d * math.sqrt(3) / 2
    lx = (gj + 0.5 * (gi % 2)) * d
    lattice = np.column_stack([ly.ravel(), lx.ravel()])
    rmat = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    seeds = lattice @ rmat.T + centre + rng.uniform(-0.36 * d, 0.36 * d, lattice.shape)
    inside = (
        (seeds[:, 0] > -60)
        & (seeds[:, 0] < g.size_y + 60)
        & (seeds[:, 1] > -60)
        & (seeds[:, 1] < g.size_x + 60)
    )
    seeds = seeds[inside]
    si = np.clip(np.round(seeds / s).astype(int) + m, 0, [hc - 1, wc - 1])
    ok = B[si[:, 0], si[:, 1]] < -0.25 * d
    if g.tc_near is not None:
        ok &= g.tc_near[si[:, 0], si[:, 1]]
    seeds = seeds[ok]
    ns = len(seeds)
    kinds = np.where(rng.random(ns) < 0.62, _PT, _DT).astype(np.int8)
    near = -1
    if focus in ("pt", "dt") and ns:
        near = int(np.argmin(((seeds - centre) ** 2).sum(1)))
        kinds[near] = _PT if focus == "pt" else _DT
    size = np.where(kinds == _PT, rng.uniform(0.55, 0.65, ns), rng.uniform(0.32, 0.42, ns)) * d
    if focus == "dt" and near >= 0:
        size[near] = 0.5 * d
    weight = size**2
    r_max = np.where(kinds == _PT, rng.uniform(29.0, 35.0, ns), rng.uniform(22.0, 28.0, ns))
    # merge some neighbouring same-kind seeds into one elongated tubule
    group = np.arange(ns)
    if ns > 1:
        _, nbr = cKDTree(seeds).query(seeds, k=2)
        for i in rng.permutation(ns)[: int(0.28 * ns)]:
            j = nbr[i, 1]
            if kinds[i] == kinds[j] and group[i] == i and group[j] == j:
                group[j] = i
    return _Tubules(d, seeds, kinds, weight, r_max, group)


@dataclass
class _Cells:
    """The power diagram of the tubule seeds on the coarse grid."""

    owner: np.ndarray  # (hc, wc) seed index, -1 none
    valid: np.ndarray  # owner >= 0
    ow: np.ndarray  # owner with the sentinel index n for "none"
    G: np.ndarray  # (hc, wc) tubule id, -1 none
    diff_v: np.ndarray  # tubule changes between vertical / horizontal neighbours
    diff_h: np.ndarray
    T_cell: np.ndarray  # depth inside the cell, corners rounded, um


def _power_diagram(g: _Grid, tub: _Tubules) -> _Cells:
    s, ns, weight = g.s, tub.n, tub.weight
    best = np.full((g.hc, g.wc), np.inf, np.float32)
    owner = np.full((g.hc, g.wc), -1, np.int32)
    for k in range(ns):
        w = g.window(*tub.seeds[k], 1.25 * tub.d)
        if w is None:
            continue
        i0, i1, j0, j1, dy, dx = w
        p = dy * dy + dx * dx - np.float32(weight[k])
        win = best[i0:i1, j0:j1]
        closer = p < win
        win[closer] = p[closer]
        owner[i0:i1, j0:j1][closer] = k
    valid = owner >= 0
    ow = np.where(valid, owner, ns)  # per-seed arrays get a sentinel at index ns
    G = np.append(tub.group, -1)[ow].astype(np.int32)  # tubule id (a seed index), -1: none
    edge = ~valid
    diff_v = G[1:] != G[:-1]
    diff_h = G[:, 1:] != G[:, :-1]
    edge[1:] |= diff_v
    edge[:-1] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    E = ndi.distance_transform_edt(~edge).astype(np.float32) * s
    E = ndi.gaussian_filter(E, 1.0 / s)
    best = np.where(valid, best, 0.0)
    dist_seed = np.sqrt(np.maximum(best + np.append(weight, 0.0)[ow].astype(np.float32), 0.0))
    cap = np.append(tub.r_max, 0.0)[ow].astype(np.float32) - dist_seed
    tau = 2.0
    lo = np.minimum(E, cap)
    T_cell = lo - tau * np.log1p(np.exp(-np.abs(E - cap) / tau))  # soft minimum, rounds corners
    return _Cells(owner, valid, ow, G, diff_v, diff_h, T_cell)


def _capillaries(rng, g: _Grid, B: np.ndarray, tub: _Tubules, cells: _Cells, focus) -> np.ndarray:
    """Peritubular capillaries on the interstitium between two tubules: rows ``(cy, cx, a, b,
    angle, wall)``; each is stamped into the blocker field ``B`` (in place)."""
    s, m, hc, wc, centre, ns = g.s, g.m, g.hc, g.wc, g.centre, tub.n
    G, owner, diff_v, diff_h = cells.G, cells.owner, cells.diff_v, cells.diff_h
    Bbig = B.copy()
    # node pairs (vertical, then horizontal neighbours) on the border of two tubules
    iv, jv = np.nonzero(diff_v & (G[1:] >= 0) & (G[:-1] >= 0))
    ih, jh = np.nonzero(diff_h & (G[:, 1:] >= 0) & (G[:, :-1] >= 0))
    pa = np.concatenate([G[iv, jv], G[ih, jh]])
    pb = np.concatenate([G[iv + 1, jv], G[ih, jh + 1]])
    oa = np.concatenate([owner[iv, jv], owner[ih, jh]])
    ob = np.concatenate([owner[iv + 1, jv], owner[ih, jh + 1]])
    ptc_rows = np.zeros((0, 6))
    if len(pa):
        cand = np.column_stack(
            [(np.concatenate([iv + 0.5, ih]) - m) * s, (np.concatenate([jv, jh + 0.5]) - m) * s]
        )
        order = rng.permutation(len(pa))
        code = np.minimum(pa, pb).astype(np.int64) * (ns + 1) + np.maximum(pa, pb)
        _, first = np.unique(code[order], return_index=True)
        pick = order[first]
        cand, oa, ob = cand[pick], oa[pick], ob[pick]
        # about half of the tubule pairs get a capillary; with focus on capillaries, the
        # candidates nearest the centre are tried first until one is accepted
        dc = ((cand - centre) ** 2).sum(1)
        order = np.argsort(dc) if focus == "ptc" else rng.permutation(len(cand))
        rows = []
        taken = np.zeros((len(order), 3))  # accepted (cy, cx, outer radius)
        for k in order:
            if (focus != "ptc" or rows) and rng.random() > 0.55:
                continue
            cy, cx = cand[k]
            if not (-20 < cy < g.size_y + 20 and -20 < cx < g.size_x + 20) or not g.in_tissue(
                cy, cx
            ):
                continue
            v = tub.seeds[ob[k]] - tub.seeds[oa[k]]
            ang = math.atan2(-v[1], v[0])  # along the shared edge: perpendicular to seed-seed
            a_ = rng.uniform(2.5, 7.5)
            b_ = min(a_, rng.uniform(1.4, 3.6))
            wall = rng.uniform(0.4, 0.7)
            r_out = a_ + wall
            i, j = int(round(cy / s)) + m, int(round(cx / s)) + m
            if not (0 <= i < hc and 0 <= j < wc) or Bbig[i, j] > -(r_out + 2.0):
                continue
            t = taken[: len(rows)]
            if (np.hypot(t[:, 0] - cy, t[:, 1] - cx) < t[:, 2] + (r_out + 3.0)).any():
                continue
            taken[len(rows)] = (cy, cx, r_out)
            rows.append((cy, cx, a_, b_, ang, wall))
        if rows:
            ptc_rows = np.array(rows)
    for cy, cx, a_, b_, ang, wall in ptc_rows:
        w = g.window(cy, cx, a_ + wall + 4 * s)
        if w is None:
            continue
        i0, i1, j0, j1, dy, dx = w
        u = dy * math.sin(ang) + dx * math.cos(ang)
        v = dy * math.cos(ang) - dx * math.sin(ang)
        rho = np.sqrt((u / a_) ** 2 + (v / b_) ** 2)
        val = (1.0 - rho) * b_ + wall + 1.0
        np.maximum(B[i0:i1, j0:j1], val, out=B[i0:i1, j0:j1])
    return ptc_rows


@dataclass
class _Fields:
    T: np.ndarray  # depth inside a tubule, um
    lam: np.ndarray  # signed distance to the lumen (with the cells' star-shaped jitter)
    lam_raw: np.ndarray  # the same without it
    kind_map: np.ndarray  # int8 tubule kind where T > -3
    kc: np.ndarray  # the cell's kind everywhere


def _tubule_fields(rng, cells: _Cells, tub: _Tubules, B, gap_eff, n_gap, n_star) -> _Fields:
    G, ow, ns = cells.G, cells.ow, tub.n
    T = np.minimum(cells.T_cell - gap_eff, -B)
    T[~cells.valid] = -10.0
    # per tubule (indexed by G; index -1 = the sentinel for "no tubule")
    t_max = np.zeros(ns + 1, np.float32)
    inside_any = G >= 0
    np.maximum.at(t_max, G[inside_any], T[inside_any])
    t_max = t_max[:ns]
    kinds = tub.kinds
    lum_r = np.where(kinds == _PT, rng.uniform(0.5, 3.2, ns), 0.0)
    epi = rng.uniform(4.5, 7.0, ns)
    h = np.where(kinds == _PT, t_max - lum_r, np.minimum(epi, t_max - 2.5)).astype(np.float32)
    h = np.append(h, 1e3)
    kinds = np.append(kinds, 0).astype(np.int8)
    kc = kinds[ow]
    star = np.where(kc == _PT, 1.4 * n_star, 0.35 * n_gap).astype(np.float32)
    lam_raw = T - h[G]
    lam = lam_raw + star
    kind_map = np.where(T > -3.0, kinds[G], 0).astype(np.int8)
    return _Fields(T, lam, lam_raw, kind_map, kc)


def _cell_stamps(rng, g: _Grid, cells: _Cells, fields: _Fields, B) -> tuple[list, list]:
    """Nuclei of the tubules' epithelium and of the interstitium (red cells come later)."""
    T, kc, lam_raw, valid = fields.T, fields.kc, fields.lam_raw, cells.valid
    nuclei: list[np.ndarray] = []
    pt_band = valid & (kc == _PT) & (T > 3.8) & (T < 11.0) & (lam_raw < -3.6)
    dt_band = valid & (kc == _DT) & (T > 2.8) & (lam_raw < -1.4)
    pts = _thin(g.node_points(rng, pt_band, 9.5), rng, 9.5)
    nuclei.append(_stamps(rng, pts, (3.0, 3.8), (0.7, 0.95), (0, np.pi), (0.85, 1.05), 0.2))
    pts = _thin(g.node_points(rng, dt_band, 7.2), rng, 7.2)
    nuclei.append(_stamps(rng, pts, (2.6, 3.2), (0.7, 0.95), (0, np.pi), (0.9, 1.1), 0.15))
    stroma = (T < -1.2) & (B < -1.0)
    if g.tc is not None:
        stroma &= g.tc
    pts = _thin(g.node_points(rng, stroma, 10.0), rng, 10.0)
    pts = pts[rng.random(len(pts)) < 0.6]
    lymph = rng.random(len(pts)) < 0.35
    nuclei.append(_stamps(rng, pts[~lymph], (3.5, 5.0), (0.28, 0.4), (0, np.pi), (0.75, 1.0), 0.1))
    nuclei.append(_stamps(rng, pts[lymph], (2.1, 2.6), (0.85, 1.0), (0, np.pi), (0.95, 1.1), 0.0))
    return nuclei, []


def _glom_stamps(rng, g: _Grid, glom: _Glom, tex, nuclei: list, rbcs: list) -> None:
    """Capillary loops, nuclei and red cells of one glomerulus (appended to the lists)."""
    s, m, hc, wc = g.s, g.m, g.hc, g.wc
    reach = glom.reach
    w = g.window(glom.ty, glom.tx, reach)
    if w is None:
        return
    i0, i1, j0, j1, dy, dx = w
    rt = glom.r_tuft[_angle_index(dy, dx)]
    dist = np.hypot(dy, dx)
    sub = np.zeros((hc, wc), bool)
    # capillary loops: blue-noise discs inside the tuft, fewer near the vascular stalk
    sub[i0:i1, j0:j1] = dist < rt - 3.0
    pts = _thin(g.node_points(rng, sub, 6.4), rng, 6.4)
    if len(pts):
        rel = np.hypot(pts[:, 0] - glom.ty, pts[:, 1] - glom.tx) / float(glom.r_tuft.mean())
        pts = pts[rng.random(len(pts)) < np.clip(rel * 1.6, 0.25, 0.95)]
    loops = _stamps(rng, pts, (2.4, 4.6), (0.35, 0.75), (0, np.pi), 1.0, 0.0)
    glom.loops = loops.astype(np.float32)
    # mesangial / endothelial / podocyte nuclei between the loops
    sub[i0:i1, j0:j1] = dist < rt - 1.2
    cand = g.node_points(rng, sub)
    if len(loops) and len(cand):
        dd, ii = cKDTree(loops[:, :2]).query(cand)
        cand = cand[dd > loops[ii, 3] + 1.8]
    pts = _thin(cand, rng, 5.4)
    if len(pts):  # mesangial cells gather in the lobule centres
        ti = np.clip(np.round(pts / s).astype(int) + m, 0, [hc - 1, wc - 1])
        pts = pts[rng.random(len(pts)) < np.clip(0.55 + 0.5 * tex[ti[:, 0], ti[:, 1]], 0.1, 1)]
    nuclei.append(_stamps(rng, pts, (2.0, 2.7), (0.7, 1.0), (0, np.pi), (0.85, 1.1), 0.1))
    # red cells in some loops
    sel = loops[rng.random(len(loops)) < 0.12]
    if len(sel):
        rb = _stamps(rng, sel[:, :2], 1.0, (0.85, 1.0), (0, np.pi), (0.8, 1.0), 0.25)
        rb[:, 2] = np.minimum(0.9 * sel[:, 3], 3.2)
        rb[:, 3] *= rb[:, 2]
        rbcs.append(rb)
    # parietal cells: flat nuclei along the inside of the capsule
    n_par = max(3, int(2 * np.pi * reach / 16.0))
    th = np.sort(rng.uniform(-np.pi, np.pi, n_par))
    idx = ((th + np.pi) * (_NA / (2 * np.pi))).astype(int) % _NA
    rr = glom.r_cap[idx] - glom.wall - 1.0
    pts = np.column_stack([glom.cy + rr * np.sin(th), glom.cx + rr * np.cos(th)])
    nuclei.append(_stamps(rng, pts, (3.4, 4.4), (0.25, 0.35), 0, (0.85, 1.05), 0.0))
    nuclei[-1][:, 4] = th + np.pi / 2


def _artery_stamps(rng, a: _Artery, nuclei: list, rbcs: list) -> None:
    """Smooth muscle and endothelial nuclei of one artery, sometimes red cells in its lumen."""
    # smooth muscle: elongated nuclei, concentric
    n_try = int(np.pi * (float(a.r_out.mean()) ** 2 - float(a.r_iel.mean()) ** 2) / 9.0)
    th = rng.uniform(-np.pi, np.pi, n_try)
    idx = ((th + np.pi) * (_NA / (2 * np.pi))).astype(int) % _NA
    rin, rout = a.r_iel[idx] + 2.0, a.r_out[idx] - 2.0
    rr = np.sqrt(rng.uniform(0, 1, n_try) * (rout**2 - rin**2) + rin**2)
    pts = np.column_stack([a.cy + rr * np.sin(th), a.cx + rr * np.cos(th)])
    keep = rout > rin
    pts = pts[keep]
    thk = th[keep]
    pts_t = _thin(pts, rng, 6.5)
    if len(pts_t):
        thk = np.arctan2(pts_t[:, 0] - a.cy, pts_t[:, 1] - a.cx)
        st_ = _stamps(rng, pts_t, (4.5, 6.5), (0.2, 0.28), 0, (0.8, 1.05), 0.0)
        st_[:, 4] = thk + np.pi / 2 + rng.normal(0, 0.12, len(thk))
        nuclei.append(st_)
    # endothelium
    n_end = max(3, int(2 * np.pi * float(a.r_lum.mean()) / 18.0))
    th = rng.uniform(-np.pi, np.pi, n_end)
    idx = ((th + np.pi) * (_NA / (2 * np.pi))).astype(int) % _NA
    rr = a.r_lum[idx] + 0.8
    pts = np.column_stack([a.cy + rr * np.sin(th), a.cx + rr * np.cos(th)])
    st_ = _stamps(rng, pts, (3.2, 4.2), (0.25, 0.35), 0, (0.85, 1.05), 0.0)
    st_[:, 4] = th + np.pi / 2
    nuclei.append(st_)
    if rng.random() < 0.6:  # red cells in the lumen
        n_r = int(rng.integers(4, 40))
        th = rng.uniform(-np.pi, np.pi, n_r)
        idx = ((th + np.pi) * (_NA / (2 * np.pi))).astype(int) % _NA
        rr = np.sqrt(rng.uniform(0, 1, n_r)) * np.maximum(a.r_lum[idx] - 4.0, 0)
        pts = np.column_stack([a.cy + rr * np.sin(th), a.cx + rr * np.cos(th)])
        rbcs.append(_stamps(rng, pts, (3.3, 3.8), (0.85, 1.0), (0, np.pi), (0.8, 1.0), 0.3))


def _capillary_stamps(rng, ptc_rows: np.ndarray, nuclei: list, rbcs: list) -> None:
    """Sometimes a red cell in a capillary's lumen, sometimes an endothelial nucleus beside it."""
    for cy, cx, a_, b_, ang, wall in ptc_rows:
        if rng.random() < 0.35:
            ra = min(3.6, a_)
            rb = min(3.4, 0.95 * b_)
            off = rng.uniform(-1, 1) * max(a_ - ra, 0.0)
            p = np.array([[cy + off * math.sin(ang), cx + off * math.cos(ang)]])
            rbcs.append(_stamps(rng, p, ra, rb / ra, ang, (0.8, 1.0), 0.2))
        if rng.random() < 0.3:
            side = rng.choice([-1.0, 1.0]) * (b_ + 0.5 * wall)
            p = np.array([[cy + side * math.cos(ang), cx - side * math.sin(ang)]])
            nuclei.append(_stamps(rng, p, (2.8, 3.8), (0.25, 0.35), ang, (0.85, 1.05), 0.0))


# ---------------------------------------------------------------------------------------------
# Raster
# ---------------------------------------------------------------------------------------------
def _interp(a: np.ndarray, lay: _Layout, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Bilinear upsampling of the coarse field ``a`` onto output pixels [r0, r1) x [c0, c1)."""
    f, m = lay.f, lay.m
    k0, l0 = r0 // f, c0 // f
    k1, l1 = (r1 - 1) // f + 2, (c1 - 1) // f + 2
    up = _upsample(a[k0 + m : k1 + m, l0 + m : l1 + m], f)
    return np.ascontiguousarray(up[r0 - k0 * f : r1 - k0 * f, c0 - l0 * f : c1 - l0 * f])


def _nearest(a: np.ndarray, lay: _Layout, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Nearest-node upsampling of the coarse map ``a`` onto output pixels [r0, r1) x [c0, c1)."""
    f, m = lay.f, lay.m
    ri = (np.arange(r0, r1) + f // 2) // f + m
    ci = (np.arange(c0, c1) + f // 2) // f + m
    return np.ascontiguousarray(a[ri[0] : ri[-1] + 1][ri - ri[0]][:, ci])


def _box(cy: float, cx: float, reach: float, um: float, r0, r1, c0, c1):
    """Output-pixel window [i0, i1) x [j0, j1) (tile-relative) of a disc, or None if outside."""
    i0 = max(r0, int(math.floor((cy - reach) / um)))
    i1 = min(r1, int(math.ceil((cy + reach) / um)) + 1)
    j0 = max(c0, int(math.floor((cx - reach) / um)))
    j1 = min(c1, int(math.ceil((cx + reach) / um)) + 1)
    if i0 >= i1 or j0 >= j1:
        return None
    return i0 - r0, i1 - r0, j0 - c0, j1 - c0


# material of a tubule pixel from its bits: 1 pt, 2 dt, 4 brush border, 8 lumen, 16 membrane
_TUBULE_LUT = np.full(32, _M["stroma"], np.uint8)
for _code in range(32):
    if _code & 3 == 0:
        continue
    if _code & 16:
        _TUBULE_LUT[_code] = _M["tbm"]
    elif _code & 8:
        _TUBULE_LUT[_code] = _M["lumen"]
    elif _code & 4 and _code & 1:
        _TUBULE_LUT[_code] = _M["pt_brush"]
    else:
        _TUBULE_LUT[_code] = _M["pt_cyto"] if _code & 1 else _M["dt_cyto"]


def _raster_tile(
    lay: _Layout,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    tissue: np.ndarray | None,
    instances: bool = False,
):
    """Material map, structure masks and (optionally) instance ids of one output window.

    Returns:
        ``(material uint8 (h, w), masks {structure: bool (h, w)}, instances int32 (h, w) or
        None, tex float32 (h, w), grain float32 (h, w))``.
    """
    um = lay.um
    h, w = r1 - r0, c1 - c0
    T = _interp(lay.T, lay, r0, r1, c0, c1)
    lam = _interp(lay.lam, lay, r0, r1, c0, c1)
    kind = _nearest(lay.kind, lay, r0, r1, c0, c1)
    tex = _interp(lay.tex, lay, r0, r1, c0, c1)
    P = lay.grain.shape[0]
    grain = np.ascontiguousarray(lay.grain[(np.arange(r0, r1) % P)][:, np.arange(c0, c1) % P])

    tub = T > 0
    pt = tub & (kind == _PT)
    dt = tub & (kind == _DT)
    code = pt.view(np.uint8) + 2 * dt.view(np.uint8)
    code += 4 * (lam > -1.7 - 0.6 * grain).view(np.uint8)
    code += 8 * (lam > 0).view(np.uint8)
    code += 16 * (T < 0.9).view(np.uint8)
    M = _TUBULE_LUT[code]
    masks = {"pt": pt, "dt": dt}
    for key in ("cap", "tuft", "ves", "ptc"):
        masks[key] = np.zeros((h, w), bool)
    inst = None
    if instances:
        grp = _nearest(lay.group, lay, r0, r1, c0, c1)
        inst = np.where(tub & (kind > 0), grp + 1, 0).astype(np.int32)

    window = (um, r0, r1, c0, c1)
    for g in lay.gloms:
        _raster_glom(g, window, M, masks)
    for k, a in enumerate(lay.arteries):
        _raster_artery(k, a, window, M, masks, inst)
    for k, row in enumerate(lay.ptc):
        _raster_capillary(k, row, window, tex, M, masks, inst)

    if tissue is not None:
        M[~tissue] = _M["glass"]
        for arr in masks.values():
            arr &= tissue
        if inst is not None:
            inst[~tissue] = 0
    return M, masks, inst, tex, grain


def _raster_glom(g: _Glom, window, M: np.ndarray, masks: dict) -> None:
    """Draw one glomerulus (capsule, Bowman's space, tuft, loops) into the window's maps."""
    um, r0, r1, c0, c1 = window
    box = _box(g.cy, g.cx, g.reach + 1.0, um, r0, r1, c0, c1)
    if box is None:
        return
    i0, i1, j0, j1 = box
    dy, dx = _polar_window(i0 + r0, j0 + c0, i1 - i0, j1 - j0, um, g.cy, g.cx)
    dist = np.hypot(dy, dx)
    rc = g.r_cap[_angle_index(dy, dx)]
    inside = dist < rc
    if not inside.any():
        return
    wall = dist > rc - g.wall
    dyt, dxt = dy - (g.ty - g.cy), dx - (g.tx - g.cx)
    tuft = (
        (np.hypot(dyt, dxt) < g.r_tuft[_angle_index(dyt, dxt)])
        & inside
        & (dist < rc - g.wall - 0.6)
    )
    loops = g.loops
    lum = _splat(loops, um, i0 + r0, i1 + r0, j0 + c0, j1 + c0)
    grown = loops.copy()
    grown[:, 2:4] += 0.7
    outer = _splat(grown, um, i0 + r0, i1 + r0, j0 + c0, j1 + c0)
    lumen = tuft & (lum > 0.5)
    gbm = tuft & ~lumen & (outer > 0.5)
    sub = np.where(tuft, _M["tuft"], _M["bc_space"]).astype(np.uint8)
    sub[lumen] = _M["tuft_lumen"]
    sub[gbm] = _M["gbm"]
    sub[wall] = _M["bc_wall"]
    view = M[i0:i1, j0:j1]
    view[inside] = sub[inside]
    masks["cap"][i0:i1, j0:j1] |= inside
    masks["tuft"][i0:i1, j0:j1] |= tuft


def _raster_artery(k: int, a: _Artery, window, M: np.ndarray, masks: dict, inst) -> None:
    """Draw artery ``k`` (adventitia, media, elastic laminae, endothelium, lumen)."""
    um, r0, r1, c0, c1 = window
    box = _box(a.cy, a.cx, a.reach + 1.0, um, r0, r1, c0, c1)
    if box is None:
        return
    i0, i1, j0, j1 = box
    dy, dx = _polar_window(i0 + r0, j0 + c0, i1 - i0, j1 - j0, um, a.cy, a.cx)
    dist = np.hypot(dy, dx)
    idx = _angle_index(dy, dx)
    adv = dist < a.r_adv[idx]
    ro = a.r_out[idx]
    media = dist < ro
    riel = a.r_iel[idx]
    sub = np.where(media, _M["media"], _M["advent"]).astype(np.uint8)
    if a.eel:
        sub[media & (dist > ro - 1.0)] = _M["elastic"]
    sub[dist < riel + 0.6] = _M["elastic"]
    sub[dist < riel - 0.6] = _M["endo"]
    sub[dist < a.r_lum[idx]] = _M["v_lumen"]
    view = M[i0:i1, j0:j1]
    view[adv] = sub[adv]
    masks["ves"][i0:i1, j0:j1] |= media
    if inst is not None:
        inst[i0:i1, j0:j1][media] = 2_000_000 + k


def _raster_capillary(k: int, row, window, tex, M: np.ndarray, masks: dict, inst) -> None:
    """Draw peritubular capillary ``k`` (endothelial ring and lumen)."""
    um, r0, r1, c0, c1 = window
    cy, cx, a_, b_, ang, wall = row
    box = _box(cy, cx, a_ + wall + 1.0, um, r0, r1, c0, c1)
    if box is None:
        return
    i0, i1, j0, j1 = box
    dy, dx = _polar_window(i0 + r0, j0 + c0, i1 - i0, j1 - j0, um, cy, cx)
    u = dy * math.sin(ang) + dx * math.cos(ang)
    v = dy * math.cos(ang) - dx * math.sin(ang)
    q = (u / a_) ** 2 + (v / b_) ** 2
    # signed distance to the lumen outline, to first order (um, > 0 outside)
    dist = (q - 1.0) / (2.0 * np.sqrt((u / a_**2) ** 2 + (v / b_**2) ** 2) + 1e-6)
    dist = dist + 0.25 * tex[i0:i1, j0:j1]
    lumen = dist < 0
    ring = ~lumen & (dist < wall)
    view = M[i0:i1, j0:j1]
    view[ring] = _M["endo"]
    view[lumen] = _M["ptc_lumen"]
    masks["ptc"][i0:i1, j0:j1] |= lumen
    if inst is not None:
        inst[i0:i1, j0:j1][lumen] = 1_000_000 + k


def _splat(stamps: np.ndarray, um: float, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Sum of soft elliptical stamps over output pixels [r0, r1) x [c0, c1), float32 (h, w)."""
    h, w = r1 - r0, c1 - c0
    out = np.zeros(h * w, np.float64)
    if len(stamps):
        cy, cx = stamps[:, 0], stamps[:, 1]
        a = stamps[:, 2] + 2 * um  # the soft edge reaches half a pixel beyond the ellipse
        sel = (cy + a > r0 * um) & (cy - a < r1 * um) & (cx + a > c0 * um) & (cx - a < c1 * um)
        stamps = stamps[sel]
    if len(stamps) == 0:
        return out.reshape(h, w).astype(np.float32)
    half = np.ceil(stamps[:, 2] / um).astype(np.int64) + 1
    iy = np.rint(stamps[:, 0] / um).astype(np.int64)
    ix = np.rint(stamps[:, 1] / um).astype(np.int64)
    interior = (iy - half >= r0) & (iy + half < r1) & (ix - half >= c0) & (ix + half < c1)
    for hk in np.unique(half):  # one template size at a time, in bounded chunks
        for inner in (True, False):
            pick = (half == hk) & (interior == inner)
            if not pick.any():
                continue
            g = stamps[pick].astype(np.float32)
            gy, gx = iy[pick], ix[pick]
            off = np.arange(-hk, hk + 1)
            offf = off.astype(np.float32) * np.float32(um)
            step = max(1, 2_000_000 // (len(off) ** 2))
            for s0 in range(0, len(g), step):
                sl = slice(s0, s0 + step)
                gg = g[sl]
                # offsets of template pixels from the stamp centre, um: (n, K, 1) and (n, 1, K)
                dy = ((gy[sl] * um - gg[:, 0]).astype(np.float32)[:, None] + offf)[:, :, None]
                dx = ((gx[sl] * um - gg[:, 1]).astype(np.float32)[:, None] + offf)[:, None, :]
                sa, ca = np.sin(gg[:, 4])[:, None, None], np.cos(gg[:, 4])[:, None, None]
                ia, ib = (1.0 / gg[:, 2])[:, None, None], (1.0 / gg[:, 3])[:, None, None]
                u = dy * (sa * ia) + dx * (ca * ia)
                v = dy * (ca * ib) - dx * (sa * ib)
                q = u * u
                q += v * v
                inside = 1.0 - q
                # ~1 px soft edge (1 - q ~ 2 (1 - r) near the outline); centre paler by `rim`
                edge = inside * (0.5 * gg[:, 3] / um)[:, None, None] + 0.5
                np.clip(edge, 0.0, 1.0, out=edge)
                np.clip(inside, 0.0, 1.0, out=inside)
                inside *= (gg[:, 5] * gg[:, 6])[:, None, None]
                np.subtract(gg[:, 5][:, None, None], inside, out=inside)
                inside *= edge
                rr = (gy[sl] - r0)[:, None, None] + off[None, :, None]
                cc = (gx[sl] - c0)[:, None, None] + off[None, None, :]
                flat = rr * w + cc
                if inner:
                    out += np.bincount(flat.ravel(), inside.ravel(), minlength=h * w)
                else:
                    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
                    out += np.bincount(flat[ok], inside[ok], minlength=h * w)
    return out.reshape(h, w).astype(np.float32)


def _splat_field(stamps: np.ndarray, um: float, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """:func:`_splat` computed on a grid twice as coarse when pixels are small (< 0.35 um), then
    upsampled bilinearly: 4x cheaper, and a nucleus edge stays under a micrometre wide."""
    q = 2 if um < 0.35 else 1
    if q == 1 or len(stamps) == 0:
        return _splat(stamps, um, r0, r1, c0, c1)
    k0, l0 = r0 // q, c0 // q
    k1, l1 = (r1 - 1) // q + 2, (c1 - 1) // q + 2
    coarse = _splat(stamps, um * q, k0, k1, l0, l1)
    up = _upsample(coarse, q)
    return np.ascontiguousarray(up[r0 - k0 * q : r1 - k0 * q, c0 - l0 * q : c1 - l0 * q])


def _blur_passes(um: float) -> int:
    """Number of [1, 2, 1] / 4 passes (sigma 0.71 px each) that approximate the optical blur."""
    return int(np.clip(round((_BLUR_UM / um / 0.7071) ** 2), 0, 4))


def _colour(lay: _Layout, M, tex, grain, nuc, rbc, passes: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) of a material map with texture, nuclei and red cells (Beer-Lambert)."""
    st = lay.stain
    h, w = M.shape
    texf = _TEX_MID[M]
    texf *= tex
    texf += 1.0
    hi = _TEX_HI[M]
    hi *= grain
    texf += hi
    # nuclei and red cells cover a small share of the pixels: blend them sparsely
    nz = np.flatnonzero(nuc)
    n_val = nuc.reshape(-1)[nz]
    n_a = np.minimum(n_val, 1.0)
    n_od = n_val * (1.0 + 0.35 * grain.reshape(-1)[nz])  # chromatin
    rz = np.flatnonzero(rbc)
    r_val = rbc.reshape(-1)[rz]
    r_a = np.minimum(r_val, 1.0)
    planes = []
    for c in range(3):
        od = st.od[:, c][M]
        od *= texf
        flat = od.reshape(-1)
        if rz.size:
            cur = flat[rz]
            flat[rz] = cur + r_a * (st.od_rbc[c] * r_val - cur)
        if nz.size:
            cur = flat[nz]
            flat[nz] = cur + n_a * (st.od_nuc[c] * n_od - cur)
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= st.light[c]
        od += 0.5
        np.clip(od, 0.0, 255.0, out=od)
        planes.append(od.astype(np.uint8))
    out = np.stack(planes, axis=-1)
    for _ in range(passes):  # [1, 2, 1] / 4 along rows then columns: avg(b, avg(a, c))
        for axis in (0, 1):
            lo = (slice(None),) * axis
            a = out[lo + (slice(None, -2),)]
            c = out[lo + (slice(2, None),)]
            b = out[lo + (slice(1, -1),)]
            ac = (a & c) + ((a ^ c) >> 1)
            res = out.copy()
            res[lo + (slice(1, -1),)] = (ac & b) + ((ac ^ b) >> 1)
            out = res
    return out


def _render(
    rng: np.random.Generator,
    shape: tuple[int, int],
    stain: str,
    focus: str | None,
    um_per_px: float,
    tissue_mask: np.ndarray | None,
    instances: bool = False,
):
    """Lay out and rasterise one image; returns (image, masks by structure, instances|None)."""
    H, W = shape
    lay = _layout(rng, shape, um_per_px, stain, focus, tissue_mask)
    image = np.empty((H, W, 3), np.uint8)
    masks = {key: np.zeros((H, W), bool) for key in DRAWN}
    inst = np.zeros((H, W), np.int32) if instances else None
    passes = _blur_passes(um_per_px)
    pad = passes
    tile = max(lay.f, lay.f * (_TILE // lay.f))
    glass = np.array(GLASS_RGB, np.uint8)
    for r0 in range(0, H, tile):
        for c0 in range(0, W, tile):
            r1, c1 = min(H, r0 + tile), min(W, c0 + tile)
            R0, R1, C0, C1 = max(0, r0 - pad), min(H, r1 + pad), max(0, c0 - pad), min(W, c1 + pad)
            tis = None if tissue_mask is None else tissue_mask[R0:R1, C0:C1]
            if tis is not None and not tis.any():
                image[r0:r1, c0:c1] = glass
                continue
            M, mk, ins, tex, grain = _raster_tile(lay, R0, R1, C0, C1, tis, instances)
            nuc = _splat_field(lay.nuclei, um_per_px, R0, R1, C0, C1)
            rbc = _splat(lay.rbcs, um_per_px, R0, R1, C0, C1)  # few: full resolution
            if tis is not None:
                nuc *= tis
                rbc *= tis
            rgb = _colour(lay, M, tex, grain, nuc, rbc, passes)
            crop = (slice(r0 - R0, r1 - R0), slice(c0 - C0, c1 - C0))
            image[r0:r1, c0:c1] = rgb[crop]
            for key in DRAWN:
                masks[key][r0:r1, c0:c1] = mk[key][crop]
            if inst is not None:
                inst[r0:r1, c0:c1] = ins[crop]
    return image, masks, inst


def render_tissue(
    rng: np.random.Generator,
    shape: tuple[int, int],
    stain: str,
    tissues: TissueTable,
    focus: str | None = None,
    um_per_px: float = 0.25,
    tissue_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render a synthetic stained kidney cortex region with the full ground truth.

    Args:
        rng: the only source of randomness (same state -> same output).
        shape: output ``(H, W)`` in pixels; any size (large shapes are rendered in tiles).
        stain: one of :data:`STAINS`.
        tissues: the registry; one mask is returned per key. Keys the renderer does not draw
            (not in :data:`DRAWN`) get all-False masks.
        focus: a tissue key the region must contain: a glomerulus near the centre for
            ``cap``/``tuft``, an artery for ``ves``, a tubule or capillary near the centre
            for ``pt``/``dt``/``ptc``. ``None``: no constraint.
        um_per_px: output pixel size; all anatomy is sized in micrometres.
        tissue_mask: optional bool ``(H, W)``; outside it the image is glass
            (~ :data:`GLASS_RGB`) and every mask is False.

    Returns:
        ``(image, masks)``: RGB uint8 ``(H, W, 3)`` and ``{key: bool (H, W)}`` in the order of
        ``tissues``. Masks overlap only where a glomerular tuft lies inside its capsule.

    Raises:
        ValueError: unknown stain or focus, bad shape, pixel size or tissue mask.
    """
    H, W = _check_args(shape, stain, tissues, focus, um_per_px, tissue_mask)
    for _attempt in range(8):
        image, masks, _ = _render(rng, (H, W), stain, focus, um_per_px, tissue_mask)
        if focus is None or masks[focus].any():
            break
    else:
        raise RuntimeError(f"could not place a {focus!r} in a {H}x{W} region (tissue mask?)")
    return image, {k: masks[k] if k in masks else np.zeros((H, W), bool) for k in tissues.keys}


def _check_args(shape, stain, tissues, focus, um_per_px, tissue_mask) -> tuple[int, int]:
    if stain not in STAINS:
        raise ValueError(f"unknown stain {stain!r}; known: {', '.join(STAINS)}")
    try:
        H, W = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (H, W), got {shape!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"shape must be positive, got {H}x{W}")
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be > 0, got {um_per_px}")
    if focus is not None:
        if focus not in tissues:
            raise ValueError(f"focus {focus!r} is not a tissue of {tissues!r}")
        if focus not in DRAWN:
            raise ValueError(
                f"the synthetic renderer cannot draw tissue {focus!r}; it draws {', '.join(DRAWN)}"
            )
    if tissue_mask is not None:
        if tissue_mask.shape != (H, W) or tissue_mask.dtype != bool:
            raise ValueError(
                f"tissue_mask must be bool {H}x{W}, got {tissue_mask.dtype} "
                f"{'x'.join(map(str, tissue_mask.shape))}"
            )
    return H, W
