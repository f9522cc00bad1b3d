"""The random scene: fields, tissue domains, nuclei, and the gene programmes."""

# Long module: _Scene (~310 lines) is one object whose build steps (tissue, domains, nuclei,
# stain textures, rendering) share its fields; its numeric helpers and the gene programmes
# (_Genes, _make_genes, ~70 lines) sit beside it.

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from magnet_st.synthetic._params import (
    _TAG_DOMAINS,
    _TAG_FIELDS,
    _TAG_GENES,
    _TAG_NUCLEI,
    _TAG_TEX,
    A_MAX_UM,
    BACKGROUND_UMI,
    CELL_TYPES,
    CELL_UMI_PER_NUCLEUS,
    CONTEXT_UMI,
    DOMAIN_STAIN,
    DOMAIN_TYPES,
    E_VEC,
    H_VEC,
    MIN_GENES,
    NODE_UM,
    NUCLEUS_DENSITY,
    NUCLEUS_SHAPE,
    PROGRAMS,
    TEX_N,
    WHITE,
)

logger = logging.getLogger("magnet_st.synthetic")


# --------------------------------------------------------------------------- helpers


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *tags])


def _bilinear(grid: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Separable bilinear interpolation of ``grid[..., ny, nx]`` at fractional indices.

    Returns ``(..., len(fy), len(fx))`` float32; indices are clamped to the grid.
    """
    ny, nx = grid.shape[-2:]
    fy = np.clip(np.asarray(fy, dtype=np.float64), 0.0, ny - 1.000001)
    fx = np.clip(np.asarray(fx, dtype=np.float64), 0.0, nx - 1.000001)
    i0 = fy.astype(np.int64)
    j0 = fx.astype(np.int64)
    wy = (fy - i0).astype(np.float32)[:, None]
    wx = (fx - j0).astype(np.float32)
    jlo = int(j0.min())
    jhi = int(j0.max()) + 2
    ilo = int(i0.min())
    ihi = int(i0.max()) + 2
    g = grid[..., ilo:ihi, jlo:jhi]
    ii = i0 - ilo
    rows = g[..., ii, :] * (1.0 - wy) + g[..., ii + 1, :] * wy
    jj = j0 - jlo
    # np.take keeps the result C-contiguous (fancy indexing on the last axis would not)
    left = np.take(rows, jj, axis=-1)
    right = np.take(rows, jj + 1, axis=-1)
    left *= 1.0 - wx
    right *= wx
    left += right
    return left


def _bilinear_points(grid: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a 2-D grid at scattered fractional indices."""
    ny, nx = grid.shape
    fy = np.clip(fy, 0.0, ny - 1.000001)
    fx = np.clip(fx, 0.0, nx - 1.000001)
    i0 = fy.astype(np.int64)
    j0 = fx.astype(np.int64)
    wy = fy - i0
    wx = fx - j0
    return (
        grid[i0, j0] * (1 - wy) * (1 - wx)
        + grid[i0 + 1, j0] * wy * (1 - wx)
        + grid[i0, j0 + 1] * (1 - wy) * wx
        + grid[i0 + 1, j0 + 1] * wy * wx
    )


def _smooth_noise(rng: np.random.Generator, ny: int, nx: int, corr_um: float) -> np.ndarray:
    """Smooth Gaussian noise of unit variance on the node grid, correlation ~``corr_um``."""
    cell = max(NODE_UM, corr_um / 4.0)
    pad = 8
    nyc = int(math.ceil(ny * NODE_UM / cell)) + 2 * pad
    nxc = int(math.ceil(nx * NODE_UM / cell)) + 2 * pad
    z = ndimage.gaussian_filter(rng.standard_normal((nyc, nxc)), corr_um / cell / 2.0)
    z /= z[pad:-pad, pad:-pad].std() + 1e-12
    fy = np.arange(ny) * (NODE_UM / cell) + pad
    fx = np.arange(nx) * (NODE_UM / cell) + pad
    return _bilinear(z.astype(np.float32), fy, fx)


def _split_counts(n: int) -> dict[str, int]:
    """Number of genes per programme (``"BG"`` takes the rest)."""
    sizes = {name: max(1, int(round(frac * n))) for name, _, frac in PROGRAMS}
    sizes["BG"] = n - sum(sizes.values())
    if sizes["BG"] < 1:
        raise ValueError(f"n_genes={n} is too small (at least {MIN_GENES})")
    return sizes


def _lognormal_weights(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    w = rng.lognormal(0.0, sigma, n)
    return w / w.sum()


# --------------------------------------------------------------------------- scene


@dataclass
class _Nuclei:
    x: np.ndarray  # um from the image's left edge
    y: np.ndarray  # um from the image's top edge (sorted ascending)
    a: np.ndarray  # semi-major axis, um
    b: np.ndarray  # semi-minor axis, um
    theta: np.ndarray  # angle of the major axis, radians (x towards y)
    od: np.ndarray  # haematoxylin optical density
    rim: np.ndarray  # rim darkening
    ctype: np.ndarray  # index into CELL_TYPES
    domain: np.ndarray  # index into DOMAIN_TYPES

    def __len__(self) -> int:
        return len(self.x)


class _Scene:
    """The random scene: tissue, domains, nuclei, textures; renders any window at any scale."""

    def __init__(
        self,
        *,
        width_um: float,
        height_um: float,
        seed: int,
        mpp: float,
        margin_um: float,
        domain_spacing_um: float,
    ) -> None:
        self.seed = int(seed)
        self.mpp = float(mpp)
        self.margin_um = float(margin_um)
        self.domain_spacing_um = float(domain_spacing_um)
        self.n16r = int(height_um // 16)
        self.n16c = int(width_um // 16)
        if self.n16r < 2 or self.n16c < 2:
            raise ValueError("width_um and height_um must be at least 32 um")
        self.n8r, self.n8c = 2 * self.n16r, 2 * self.n16c
        self.n2r, self.n2c = 8 * self.n16r, 8 * self.n16c
        self.cap_w_um = 16.0 * self.n16c
        self.cap_h_um = 16.0 * self.n16r
        self.ox = self.oy = self.margin_um  # capture origin, um
        self.img_w_um = self.cap_w_um + 2 * self.margin_um
        self.img_h_um = self.cap_h_um + 2 * self.margin_um
        self.width_px = int(math.ceil(self.img_w_um / self.mpp - 1e-9))
        self.height_px = int(math.ceil(self.img_h_um / self.mpp - 1e-9))
        # node grid: nodes at origin + NODE_UM * k, with a node on every 8 um bin centre
        self.k0 = int(math.ceil(self.margin_um / NODE_UM)) + 2
        self.g0 = self.margin_um - NODE_UM * self.k0  # same for x and y (square margin)
        self.ny = int(math.ceil((self.img_h_um - self.g0) / NODE_UM)) + 3
        self.nx = int(math.ceil((self.img_w_um - self.g0) / NODE_UM)) + 3
        self.node_y = self.g0 + NODE_UM * np.arange(self.ny)
        self.node_x = self.g0 + NODE_UM * np.arange(self.nx)
        t0 = time.perf_counter()
        self._build_tissue()
        self._build_domains()
        self._build_stain_fields()
        self._build_nuclei()
        self._build_textures()
        logger.info(
            "synthetic scene: %d x %d px image, %d nuclei, %d domain seeds (%.1f s)",
            self.width_px,
            self.height_px,
            len(self.nuclei),
            len(self.seed_xy),
            time.perf_counter() - t0,
        )

    # ---------------------------------------------------------------- construction
    def _build_tissue(self) -> None:
        rng = _rng(self.seed, _TAG_FIELDS)
        ny, nx = self.ny, self.nx
        n250 = _smooth_noise(rng, ny, nx, 250.0)
        n25 = _smooth_noise(rng, ny, nx, 25.0)
        n80 = _smooth_noise(rng, ny, nx, 80.0)
        cx = self.ox + self.cap_w_um / 2
        cy = self.oy + self.cap_h_um / 2
        u = np.abs((self.node_x - cx) / (self.cap_w_um / 2)).astype(np.float32)
        v = np.abs((self.node_y - cy) / (self.cap_h_um / 2)).astype(np.float32)
        r = (u[None, :] ** 4 + v[:, None] ** 4) ** 0.25
        t = 1.0 - r + 0.2 * n250 + 0.04 * n25 - 1.5 * np.maximum(0.0, -n80 - 1.9)
        gy, gx = np.gradient(t, NODE_UM)
        grad = np.sqrt(gx * gx + gy * gy)
        self.sd = np.clip(t / np.maximum(grad, 1e-5), -2000.0, 2000.0).astype(np.float32)

    def _build_domains(self) -> None:
        rng = _rng(self.seed, _TAG_DOMAINS)
        s = self.domain_spacing_um
        gy = np.arange(-0.5, self.img_h_um / s + 1.0)
        gx = np.arange(-0.5, self.img_w_um / s + 1.0)
        sy, sx = np.meshgrid(gy * s, gx * s, indexing="ij")
        sy = sy.ravel() + rng.uniform(-0.35, 0.35, sy.size) * s
        sx = sx.ravel() + rng.uniform(-0.35, 0.35, sx.size) * s
        n = sy.size
        cx = self.ox + self.cap_w_um / 2
        cy = self.oy + self.cap_h_um / 2
        order = np.argsort((sx - cx) ** 2 + (sy - cy) ** 2, kind="stable")
        blocks = ([0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 3, 4], [0, 1, 2, 3, 1])
        types = np.empty(n, dtype=np.int8)
        dealt: list[int] = []
        k = 0
        while len(dealt) < n:
            dealt.extend(rng.permutation(blocks[k % len(blocks)]).tolist())
            k += 1
        types[order] = np.asarray(dealt[:n], dtype=np.int8)
        lym_radius = rng.uniform(0.35, 0.5, n) * s
        self.seed_xy = np.stack([sx, sy], axis=1)
        self.seed_type = types
        # warp the node coordinates and take the nearest seed
        wx = _smooth_noise(rng, self.ny, self.nx, 120.0) * 60.0
        wy = _smooth_noise(rng, self.ny, self.nx, 120.0) * 60.0
        px = (self.node_x[None, :] + wx).ravel()
        py = (self.node_y[:, None] + wy).ravel()
        del wx, wy
        tree = cKDTree(self.seed_xy)
        dist, idx = tree.query(np.stack([px, py], axis=1))
        del px, py
        label = types[idx]
        lym = label == DOMAIN_TYPES.index("LYM")
        label[lym & (dist > lym_radius[idx])] = DOMAIN_TYPES.index("STR")
        self.domain = label.reshape(self.ny, self.nx).astype(np.int8)
        # fibre direction field (stroma) and its orientation for fibroblasts
        self.fibre_angle = (_smooth_noise(rng, self.ny, self.nx, 100.0) * 1.2).astype(np.float32)

    def _build_stain_fields(self) -> None:
        stain = DOMAIN_STAIN[self.domain]  # (ny, nx, 3)
        fields = np.empty((5, self.ny, self.nx), dtype=np.float32)
        fields[0] = self.sd
        for c in range(3):
            fields[1 + c] = ndimage.gaussian_filter(stain[..., c], 1.0)
        # blend weight between horizontal and vertical fibre textures
        fields[4] = 0.5 + 0.5 * np.sin(self.fibre_angle)
        self.fields = fields

    def in_tissue_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        fy = (np.asarray(y_um) - self.g0) / NODE_UM
        fx = (np.asarray(x_um) - self.g0) / NODE_UM
        return _bilinear_points(self.sd, fy, fx) > 0

    def domain_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        iy = np.clip(
            np.rint((np.asarray(y_um) - self.g0) / NODE_UM).astype(np.int64), 0, self.ny - 1
        )
        ix = np.clip(
            np.rint((np.asarray(x_um) - self.g0) / NODE_UM).astype(np.int64), 0, self.nx - 1
        )
        return self.domain[iy, ix]

    def _build_nuclei(self) -> None:
        parts: list[dict[str, np.ndarray]] = []
        for t, name in enumerate(CELL_TYPES):
            rng = _rng(self.seed, _TAG_NUCLEI, t)
            dens = NUCLEUS_DENSITY[t] / 1e4
            dmax = float(dens.max())
            spacing = 1.0 / math.sqrt(dmax)
            jitter = 0.5 if name == "CUE" else 0.35
            ny = int(math.ceil(self.img_h_um / spacing)) + 1
            nx = int(math.ceil(self.img_w_um / spacing)) + 1
            off = rng.uniform(0.0, spacing, 2)
            keep_parts = []
            # rows in chunks to bound memory on full-size slides
            step = max(1, 2_000_000 // nx)
            for r0 in range(0, ny, step):
                r1 = min(ny, r0 + step)
                gy, gx = np.meshgrid(np.arange(r0, r1), np.arange(nx), indexing="ij")
                m = gy.size
                y = (gy.ravel() + 0.5 + rng.uniform(-jitter, jitter, m)) * spacing + off[0]
                x = (gx.ravel() + 0.5 + rng.uniform(-jitter, jitter, m)) * spacing + off[1]
                u = rng.random(m)
                ok = (x > 0) & (x < self.img_w_um) & (y > 0) & (y < self.img_h_um)
                x, y, u = x[ok], y[ok], u[ok]
                dom = self.domain_at(x, y)
                ok = (u < dens[dom] / dmax) & self.in_tissue_at(x, y)
                keep_parts.append((x[ok], y[ok], dom[ok]))
            x = np.concatenate([p[0] for p in keep_parts])
            y = np.concatenate([p[1] for p in keep_parts])
            dom = np.concatenate([p[2] for p in keep_parts])
            n = len(x)
            (a_lo, a_hi), (r_lo, r_hi), (od_lo, od_hi), rim = NUCLEUS_SHAPE[name]
            a = rng.uniform(a_lo, a_hi, n)
            b = a / rng.uniform(r_lo, r_hi, n)
            if name == "FIB":
                fy = (y - self.g0) / NODE_UM
                fx = (x - self.g0) / NODE_UM
                theta = _bilinear_points(self.fibre_angle, fy, fx) + rng.normal(0, 0.25, n)
            else:
                theta = rng.uniform(0.0, math.pi, n)
            parts.append(
                {
                    "x": x,
                    "y": y,
                    "a": a,
                    "b": b,
                    "theta": theta,
                    "od": rng.uniform(od_lo, od_hi, n),
                    "rim": np.full(n, rim),
                    "ctype": np.full(n, t, dtype=np.int8),
                    "domain": dom.astype(np.int8),
                }
            )
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.lexsort((cols["x"], cols["y"]))
        f32 = ("a", "b", "theta", "od", "rim")
        self.nuclei = _Nuclei(
            **{k: (v[order].astype(np.float32) if k in f32 else v[order]) for k, v in cols.items()}
        )

    def _build_textures(self) -> None:
        rng = _rng(self.seed, _TAG_TEX)
        n = TEX_N
        tex = np.empty((4, n, n), dtype=np.float32)
        for i, sigma in enumerate(((0.7, 6.0), (6.0, 0.7), (1.5, 1.5))):
            z = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
            tex[i] = z / z.std()
        tex[3] = rng.uniform(-1.0, 1.0, (n, n))
        self.tex = tex

    # ---------------------------------------------------------------- rendering
    def render(self, row0: int, col0: int, h: int, w: int, px_um: float) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the window whose pixel ``(i, j)`` is centred at
        ``((col0 + j + 0.5) px_um, (row0 + i + 0.5) px_um)`` um."""
        ys = (row0 + np.arange(h) + 0.5) * px_um
        xs = (col0 + np.arange(w) + 0.5) * px_um
        f = _bilinear(self.fields, (ys - self.g0) / NODE_UM, (xs - self.g0) / NODE_UM)
        alpha, hem, eo, fibw, fib = f  # views; updated in place below
        amp = math.sqrt(min(1.0, self.mpp / px_um))
        iy = np.floor(ys / self.mpp).astype(np.int64) % TEX_N
        ix = np.floor(xs / self.mpp).astype(np.int64) % TEX_N
        t = np.take(np.take(self.tex, iy, axis=1), ix, axis=2)
        # alpha = clip(sd / edge + 0.5, 0, 1): ~1.5 um (or one pixel) anti-aliased tissue edge
        alpha *= 1.0 / max(1.5, px_um)
        alpha += 0.5
        np.clip(alpha, 0.0, 1.0, out=alpha)
        # eosin: E * (1 + 0.45 amp fibw fibre) * (1 + 0.08 amp grain)
        fib *= t[1] - t[0]
        fib += t[0]
        fib *= fibw
        fib *= 0.45 * amp
        fib += 1.0
        eo *= fib
        grain = t[2]
        grain *= 0.15 * amp
        tmp = fibw  # reuse the buffer
        np.multiply(grain, 0.08 / 0.15, out=tmp)
        tmp += 1.0
        eo *= tmp
        # haematoxylin: H (1 + grain) + nuclei (0.85 + grain); nuclei hide some eosin
        hn = self._nuclei_od(row0, col0, h, w, px_um)
        np.add(grain, 1.0, out=tmp)
        hem *= tmp
        grain += 0.85
        grain *= hn
        hem += grain
        np.minimum(hn, 1.0, out=hn)
        hn *= -0.5
        hn += 1.0
        eo *= hn
        hem *= alpha
        eo *= alpha
        i0 = t[3]
        i0 *= 2.5
        i0 += WHITE
        out = np.empty((h, w, 3), dtype=np.uint8)
        od = tmp
        for c in range(3):
            np.multiply(hem, -H_VEC[c], out=od)
            np.multiply(eo, -E_VEC[c], out=alpha)
            od += alpha
            np.exp(od, out=od)
            od *= i0
            od += 0.5
            np.clip(od, 0.0, 255.0, out=od)
            out[..., c] = od
        return out

    def _nuclei_od(self, row0: int, col0: int, h: int, w: int, px_um: float) -> np.ndarray:
        nu = self.nuclei
        lo, hi = np.searchsorted(nu.y, [row0 * px_um - A_MAX_UM, (row0 + h) * px_um + A_MAX_UM])
        x = nu.x[lo:hi]
        sel = np.flatnonzero(
            (x > col0 * px_um - A_MAX_UM) & (x < (col0 + w) * px_um + A_MAX_UM)
        ) + int(lo)
        out = np.zeros(h * w, dtype=np.float32)
        if sel.size == 0:
            return out.reshape(h, w)
        cx = (nu.x[sel] / px_um - col0 - 0.5).astype(np.float32)
        cy = (nu.y[sel] / px_um - row0 - 0.5).astype(np.float32)
        a = nu.a[sel] / np.float32(px_um)
        b = nu.b[sel] / np.float32(px_um)
        od = nu.od[sel]
        small = a < 1.0
        if small.any():
            ix = np.rint(cx[small]).astype(np.int64)
            iy = np.rint(cy[small]).astype(np.int64)
            ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
            val = od[small] * np.float32(math.pi) * a[small] * b[small]
            out += np.bincount((iy * w + ix)[ok], weights=val[ok], minlength=h * w).astype(
                np.float32
            )
        big = np.flatnonzero(~small)
        if big.size:
            radius = np.ceil(a[big] + 1.0).astype(np.int64)
            for r in np.unique(radius):
                grp = big[radius == r]
                off = np.arange(-r, r + 1)
                dy = np.repeat(off, 2 * r + 1)
                dx = np.tile(off, 2 * r + 1)
                k = dy.size
                step = max(1, 1_500_000 // k)
                for s0 in range(0, grp.size, step):
                    g = grp[s0 : s0 + step]
                    _stamp_ellipses(
                        out,
                        (h, w),
                        (cx[g], cy[g], a[g], b[g], nu.theta[sel[g]], od[g], nu.rim[sel[g]]),
                        dy,
                        dx,
                    )
        return out.reshape(h, w)

    # ---------------------------------------------------------------- bin-level grids
    def tissue_2um(self, r2a: int = 0, r2b: int | None = None) -> np.ndarray:
        """``in_tissue`` of 2 um bins, rows ``r2a:r2b`` (bool, ``(rows, n2c)``)."""
        r2b = self.n2r if r2b is None else r2b
        yc = self.oy + 2.0 * np.arange(r2a, r2b) + 1.0
        xc = self.ox + 2.0 * np.arange(self.n2c) + 1.0
        return _bilinear(self.sd, (yc - self.g0) / NODE_UM, (xc - self.g0) / NODE_UM) > 0


def _stamp_ellipses(
    out: np.ndarray,
    shape: tuple[int, int],
    nuclei: tuple[np.ndarray, ...],
    dy: np.ndarray,
    dx: np.ndarray,
) -> None:
    """Draw anti-aliased filled ellipses (haematoxylin OD) into the flat ``out`` by max.

    ``nuclei`` = (cx, cy, a, b, theta, od, rim) in window pixels; ``dy, dx`` the offsets of
    a square stencil large enough for all of them.
    """
    h, w = shape
    cx, cy, a, b, theta, od, rim = nuclei
    icx = np.rint(cx).astype(np.int64)
    icy = np.rint(cy).astype(np.int64)
    u = dx[None, :].astype(np.float32) - (cx - icx)[:, None]
    v = dy[None, :].astype(np.float32) - (cy - icy)[:, None]
    cos = np.cos(theta)[:, None]
    sin = np.sin(theta)[:, None]
    p = u * cos + v * sin
    q = v * cos - u * sin
    g2 = p * p * (1.0 / (a * a))[:, None] + q * q * (1.0 / (b * b))[:, None]
    # coverage ~ signed distance to the edge along the minor axis, 1 px ramp
    cov = np.clip((1.0 - np.sqrt(g2)) * b[:, None] + 0.5, 0.0, 1.0)
    val = cov * od[:, None] * (1.0 + rim[:, None] * (np.minimum(g2, 1.0) - 0.6))
    py = icy[:, None] + dy[None, :]
    px = icx[:, None] + dx[None, :]
    m = (cov > 0) & (py >= 0) & (py < h) & (px >= 0) & (px < w)
    flat = (py * w + px)[m]
    out[flat] = np.maximum(out[flat], val[m])


def _describe(scene: _Scene) -> dict[str, Any]:
    return {
        "capture_area_um": [scene.cap_w_um, scene.cap_h_um],
        "capture_origin_um": [scene.ox, scene.oy],
        "image_size_px": [scene.width_px, scene.height_px],
        "image_size_um": [scene.img_w_um, scene.img_h_um],
        "bins": {
            "2": [scene.n2r, scene.n2c],
            "8": [scene.n8r, scene.n8c],
            "16": [scene.n16r, scene.n16c],
        },
    }


# --------------------------------------------------------------------------- genes


@dataclass
class _Genes:
    names: list[str]
    ids: list[str]
    program: list[str]  # per gene
    group: list[str]  # per gene: cell / context / background
    weights: np.ndarray  # (11, G) float64: feature -> rate
    tau: np.ndarray  # background genes' domain dependence (0 elsewhere)

    @property
    def programs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, prog in zip(self.names, self.program, strict=True):
            out.setdefault(prog, []).append(name)
        return out

    @property
    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"cell": [], "context": [], "background": []}
        for name, grp in zip(self.names, self.group, strict=True):
            out[grp].append(name)
        return out


N_FEATURES = len(CELL_TYPES) + len(DOMAIN_TYPES) + 1
FEATURE_NAMES = (
    [f"n_{t}" for t in CELL_TYPES] + [f"tf*1[domain={d}]" for d in DOMAIN_TYPES] + ["tf*rho"]
)


def _make_genes(n_genes: int, seed: int) -> _Genes:
    rng = _rng(seed, _TAG_GENES)
    sizes = _split_counts(n_genes)
    names: list[str] = []
    program: list[str] = []
    group: list[str] = []
    for prog, grp, _ in PROGRAMS:
        k = sizes[prog]
        width = max(2, len(str(k)))
        names += [f"{prog}_{i + 1:0{width}d}" for i in range(k)]
        program += [prog] * k
        group += [grp] * k
    k = sizes["BG"]
    width = max(3, len(str(k)))
    names += [f"BG_{i + 1:0{width}d}" for i in range(k)]
    program += ["BG"] * k
    group += ["background"] * k
    ids = [f"SYNTH{i + 1:06d}" for i in range(n_genes)]
    prog_arr = np.array(program)
    weights = np.zeros((N_FEATURES, n_genes))
    tau = np.zeros(n_genes)
    nt = len(CELL_TYPES)
    for t, ct in enumerate(CELL_TYPES):
        idx = np.flatnonzero(prog_arr == f"CELL_{ct}")
        weights[t, idx] = CELL_UMI_PER_NUCLEUS[ct] * _lognormal_weights(rng, idx.size, 0.8)
    for prog, dom in (("DOMA", "TUM_A"), ("DOMB", "TUM_B")):
        idx = np.flatnonzero(prog_arr == f"CTX_{prog}")
        d = DOMAIN_TYPES.index(dom)
        weights[nt + d, idx] = CONTEXT_UMI[prog] * _lognormal_weights(rng, idx.size, 0.8)
    idx = np.flatnonzero(prog_arr == "CTX_LYMG")
    weights[nt + len(DOMAIN_TYPES), idx] = CONTEXT_UMI["LYMG"] * _lognormal_weights(
        rng, idx.size, 0.8
    )
    idx = np.flatnonzero(prog_arr == "BG")
    base = BACKGROUND_UMI * _lognormal_weights(rng, idx.size, 1.0)
    tau[idx] = 0.5 * rng.uniform(0.0, 1.0, idx.size) ** 2
    z = rng.standard_normal((len(DOMAIN_TYPES), idx.size))
    weights[nt : nt + len(DOMAIN_TYPES), idx] += base[None, :] * np.exp(tau[idx][None, :] * z)
    return _Genes(names, ids, program, group, weights, tau)
