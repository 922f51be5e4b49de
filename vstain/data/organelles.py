"""What fills the cells: the density of every compartment and structure of the cell model.

Densities are float32 ``[Z, Y, X]``. The fluorescent targets peak at about 1; the organelles
that set the refractive index (mitochondria, lipid droplets, vesicles) are **volume fractions**
(0-1 per voxel), so the brightfield sees each organelle by its volume and index whatever the voxel
size. Per cell: a nucleus (or a mitotic cell's metaphase plate) with chromatin texture, its
envelope (none in mitosis), 1-3 nucleoli (none in mitosis), mitochondria as short tubes packed
into the thin cytoplasm around the nucleus, lipid droplets and vesicles (a non-target texture),
actomyosin bundles along the cell's walls near the basal side, and a membrane whose dye uptake
varies from cell to cell and is partly internalised into endosomes (bright puncta).
"""
from __future__ import annotations

import numpy as np

from .cells import Colony
from .fields import draw, occupancy, sheet, shell, step, texture
from .simconfig import SimConfig


def _tex(cfg: SimConfig, sigma_um: float, rng: np.random.Generator) -> np.ndarray:
    return texture(cfg.shape, cfg.pixel_size, sigma_um, rng)


def structures(cfg: SimConfig, col: Colony, rng: np.random.Generator,
               organelle_rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Density of every compartment and structure. ``rng`` draws the textures (grid-sized),
    ``organelle_rng`` places the organelles (in µm, independent of the voxel size)."""
    dy, dx = cfg.pixel_size[1:]
    ny, nx = cfg.shape[1:]
    lab, nuc, hz = col.label, col.nucleus, col.hz
    alive = col.alive[lab]
    soft = 0.5 * min(cfg.pixel_size)
    yy, xx = np.meshgrid((np.arange(ny) + 0.5) * dy, (np.arange(nx) + 0.5) * dx, indexing="ij")

    # cell solid and membrane: lateral walls, apical dome, basal plane
    cell = step(hz, soft) * step(col.top - hz, soft) * alive
    wall_h = np.maximum(np.where(alive, col.top, 0), np.where(col.alive[col.neighbour], col.top, 0))
    dz, dxy = cfg.pixel_size[0], max(cfg.pixel_size[1:])
    lateral = sheet(col.bdist, 0.1, dxy) * step(hz, soft) * step(wall_h - hz, soft)
    apical = sheet(hz - col.top, 0.1, dz) * alive
    basal = sheet(hz, 0.1, dz) * alive
    plasma = np.maximum(np.maximum(lateral, apical), basal)

    # nucleus: ellipsoid in the cell's frame, clipped by the cell's walls (distance ~ (rho^2-1)/|grad|)
    c, s = np.cos(nuc["theta"])[lab], np.sin(nuc["theta"])[lab]
    ry, rx = yy - nuc["cy"][lab], xx - nuc["cx"][lab]
    u, v = c * rx + s * ry, -s * rx + c * ry
    a, b, cz_ax = nuc["a"][lab], nuc["b"][lab], nuc["c"][lab]
    w = (hz + col.z_basal) - nuc["cz"][lab]
    rho2 = (u / a) ** 2 + (v / b) ** 2 + (w / cz_ax) ** 2
    grad = 2 * np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2 + (w / cz_ax**2) ** 2) + 1e-3
    sdist = np.maximum((rho2 - 1) / grad, cfg.wall_gap - col.bdist).astype(np.float32)  # µm, < 0 inside
    sdist = np.where(alive, sdist, 10.0)
    mitotic = col.mitotic[lab]
    chromatin_region = step(-sdist, soft) * cell
    nucleus = chromatin_region * ~mitotic
    chromosomes = chromatin_region * mitotic
    envelope = sheet(sdist, 0.1, max(cfg.pixel_size)) * cell * ~mitotic * (0.8 + 0.2 * _tex(cfg, 0.6, rng))

    nucleoli = _nucleoli(cfg, col, yy, xx, rng, organelle_rng) * nucleus

    # DNA: total content per cell spread over its nucleus; heterochromatin at the periphery and in
    # foci, `nucleolar_dna` times as dense in nucleoli; a metaphase plate `chromatin_compaction` times denser
    chromatin = _tex(cfg, 0.35, rng)
    foci = np.clip(_tex(cfg, 0.3, rng) - 1.2, 0, None)
    periphery = shell(sdist + 0.35, 0.3)
    dna = nucleus * np.clip(0.65 + 0.2 * chromatin + 0.25 * periphery + 0.6 * foci, 0.2, None)
    dna = dna * (1 - (1 - cfg.nucleolar_dna) * nucleoli)
    dna = dna + chromosomes * cfg.chromatin_compaction * np.clip(1 + 0.3 * chromatin, 0.3, None)

    cytoplasm = cell * (1 - chromatin_region)
    mito = _mitochondria(cfg, col, cytoplasm, sdist, organelle_rng)
    lipid, vesicles, endosomes = _droplets(cfg, col, cytoplasm, organelle_rng)
    actomyosin = _actomyosin(cfg, col, hz, yy, xx, cell, rng)

    # CellMask: uneven uptake per cell, patchy along the walls, part internalised into endosomes
    uptake = np.clip(1 + cfg.membrane_uptake_cv * organelle_rng.standard_normal(len(col.seeds)), 0.2, None)
    patchy = np.clip(1 + 0.4 * _tex(cfg, 1.0, rng), 0.1, None)
    surface = (1 - cfg.membrane_internalised) * plasma * patchy
    puncta = cfg.membrane_internalised * 4.0 * endosomes
    membrane = np.where(alive | (plasma > 0.01), uptake[lab], 1.0) * (surface + puncta)
    return {"cell": cell, "nucleus": nucleus, "chromosomes": chromosomes, "cytoplasm": cytoplasm,
            "plasma": plasma, "lipid": lipid, "vesicles": vesicles, "dna": dna, "membrane": membrane,
            "mito": mito, "envelope": envelope, "actomyosin": actomyosin, "nucleoli": nucleoli}


def _nucleoli(cfg: SimConfig, col: Colony, yy, xx, rng, org_rng) -> np.ndarray:
    """1-3 irregular blobs inside each interphase nucleus, together ``nucleoli_fraction`` of its
    volume (so they grow with the nucleus), shared unevenly between them."""
    nuc, lab, n = col.nucleus, col.label, len(col.seeds)
    count = org_rng.choice([1, 2, 3], n, p=cfg.nucleoli_count)
    volume = draw(org_rng, cfg.nucleoli_fraction, n) * 4 / 3 * np.pi * nuc["a"] * nuc["b"] * nuc["c"]
    # uneven shares of that volume, Dirichlet(2, 2, 2) over the nucleoli present (assumption: none published)
    share = org_rng.dirichlet((2.0, 2.0, 2.0), n) * (np.arange(3) < count[:, None])
    radius = np.cbrt(3 * volume[:, None] * share / share.sum(1, keepdims=True) / (4 * np.pi))  # µm [n, 3]
    wobble = _tex(cfg, 0.4, rng)
    out = np.zeros(cfg.shape, np.float32)
    soft = 0.5 * min(cfg.pixel_size)
    for k in range(3):
        r = radius[:, k]
        dirn = org_rng.normal(size=(n, 3))
        # the centre sits far enough inside that most of the nucleolus lies within the nucleus: 0.1-0.6 of
        # the room left between it and the nucleus' shortest semi-axis (assumption: anywhere in the nucleoplasm)
        room = np.clip(1 - r / np.minimum(np.minimum(nuc["a"], nuc["b"]), nuc["c"]), 0, None)
        dirn *= (org_rng.uniform(0.1, 0.6, n) * room / np.linalg.norm(dirn, axis=1))[:, None]
        pu, pv = dirn[:, 0] * nuc["a"], dirn[:, 1] * nuc["b"]
        py = nuc["cy"] + np.sin(nuc["theta"]) * pu + np.cos(nuc["theta"]) * pv
        px = nuc["cx"] + np.cos(nuc["theta"]) * pu - np.sin(nuc["theta"]) * pv
        pz = nuc["cz"] + dirn[:, 2] * nuc["c"]
        d = np.sqrt((yy - py[lab]) ** 2 + (xx - px[lab]) ** 2 + (col.hz + col.z_basal - pz[lab]) ** 2)
        out = np.maximum(out, step(r[lab] * (1 + 0.15 * wobble) - d, soft) * ((count > k) & (r > 0))[lab])
    return out


def _sample_inside(mask: np.ndarray, weight: np.ndarray | None, k: int, cfg: SimConfig,
                   rng: np.random.Generator) -> np.ndarray:
    """``k`` points (µm) inside ``mask``, voxels drawn with probability ~ ``weight``."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or k == 0:
        return np.zeros((0, 3))
    p = None if weight is None else weight.ravel()[idx] / weight.ravel()[idx].sum()
    pick = idx[rng.choice(idx.size, k, p=p)]
    return (np.stack(np.unravel_index(pick, cfg.shape), -1) + rng.uniform(0, 1, (k, 3))) * np.array(cfg.pixel_size)


def _mitochondria(cfg: SimConfig, col: Colony, cytoplasm: np.ndarray, sdist: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Volume fraction of mitochondria: short tubes (persistent random walks of ``mito_radius``)
    packed into the cytoplasm at ``mito_volume_fraction``, denser next to the nucleus."""
    px = np.array(cfg.pixel_size, np.float32)
    inside = cytoplasm > 0.5
    volume = inside.sum() * float(np.prod(px))
    fraction = draw(rng, cfg.mito_volume_fraction)
    tube = np.pi * cfg.mito_radius**2
    mean_len = float(np.mean(cfg.mito_length))
    n_tubes = int(volume * fraction / (tube * mean_len))
    if n_tubes == 0:
        return np.zeros(cfg.shape, np.float32)
    perinuclear = np.exp(-np.clip(sdist, 0, None) / 2.0)  # the cytoplasm next to the nucleus first
    pos = _sample_inside(inside, perinuclear, n_tubes, cfg, rng)
    step_um = 0.1
    length = draw(rng, cfg.mito_length, n_tubes)
    direction = rng.normal(size=pos.shape)
    direction[:, 0] *= 0.5  # flatter than tall
    live = np.ones(n_tubes, bool)
    trail = []
    for t in range(int(np.ceil(cfg.mito_length[1] / step_um))):
        direction += rng.normal(0, 0.1, direction.shape)
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        nxt = pos + step_um * direction
        vox = np.floor(nxt / px).astype(np.int64)
        ok = np.all((vox >= 0) & (vox < np.array(cfg.shape)), axis=1)
        ok[ok] = inside[tuple(vox[ok].T)]
        direction[~ok] *= -1  # a tube turns back at the nuclear envelope and the cell's walls
        pos = np.where(ok[:, None], nxt, pos)
        live &= t * step_um < length
        trail.append(pos[live])
    pts = np.concatenate(trail)
    return occupancy(pts, np.full(len(pts), tube * step_um), cfg.mito_radius / 2, cfg.shape, cfg.pixel_size) * cytoplasm


def _droplets(cfg: SimConfig, col: Colony, cytoplasm: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Volume fractions of lipid droplets and of vesicles in the cytoplasm, and the endosomes (a
    third of the vesicles) that collect internalised membrane dye."""
    cells_here = max(1, len(np.unique(col.label[cytoplasm > 0.5])))
    inside = cytoplasm > 0.5
    out = []
    for per_cell, radius in ((cfg.lipid_per_cell, cfg.lipid_radius), (cfg.vesicles_per_cell, cfg.vesicle_radius)):
        k = rng.poisson(per_cell * cells_here)
        centres = _sample_inside(inside, None, k, cfg, rng)
        r = draw(rng, radius, len(centres))
        out.append((centres, 4 / 3 * np.pi * r**3, float(np.mean(radius))))
    fields = [occupancy(c, v, r / np.sqrt(5), cfg.shape, cfg.pixel_size) * cytoplasm for c, v, r in out]
    c, v, r = out[1]
    endo = occupancy(c[::3], v[::3], r / np.sqrt(5), cfg.shape, cfg.pixel_size) * cytoplasm
    return fields[0], fields[1], endo


def _actomyosin(cfg: SimConfig, col: Colony, hz, yy, xx, cell, rng) -> np.ndarray:
    """MYH10 bundles: beaded strands along each cell's walls and a few straight fibres across the
    cell, all close to the basal side, plus a faint cortical pool (stronger in mitotic cells)."""
    lab, n = col.label, len(col.seeds)
    sy, sx = yy - col.centre[..., 0], xx - col.centre[..., 1]
    angle = np.arctan2(sy, sx)
    strands = np.zeros(cfg.shape, np.float32)
    for offset in (0.35, 0.75):  # µm inside the cell edge
        amp = np.zeros(cfg.shape, np.float32)
        for m in (2, 3, 5, 8):
            amp += np.cos(m * angle + rng.uniform(0, 2 * np.pi, n)[lab]) / np.sqrt(m)
        strands += np.clip(0.4 + 0.6 * amp, 0, 1.2) * shell(col.bdist - offset, 0.12)
    fibres = np.zeros(cfg.shape, np.float32)
    r_in = col.r_in[lab]
    for _ in range(2):  # straight fibres that fade towards their ends
        psi = rng.uniform(0, np.pi, n)[lab]
        shift = (rng.uniform(-0.6, 0.6, n))[lab] * r_in
        along = (np.cos(psi) * sx + np.sin(psi) * sy) / r_in - rng.uniform(-0.5, 0.5, n)[lab]
        across = -np.sin(psi) * sx + np.cos(psi) * sy - shift
        on = (rng.random(n) < 0.5)[lab] * rng.uniform(0.4, 0.9, n)[lab]
        fibres = np.maximum(fibres, shell(across, 0.12) * shell(along, 0.6) * on)
    fibres *= step(col.bdist - 0.4, 0.15)
    basal = np.exp(-np.clip(hz, 0, None) / 1.2)
    near = shell(hz - 0.4, 0.45)
    cortex = np.where(col.mitotic[lab], 0.6, 0.15) * shell(col.bdist, 0.4)
    return (cell * (strands * basal + fibres * near + cortex)).astype(np.float32)
