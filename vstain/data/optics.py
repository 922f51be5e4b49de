"""Optics of the simulated microscope: fluorescence PSF, camera noise and the brightfield image.

The simulator (:mod:`vstain.data.simulate`) builds a 3D object and hands it here to be imaged the way
the Allen Cell spinning-disk microscopes image hiPSC colonies (Viana et al. 2023; thesis 2.1.2):

* **Fluorescence** is the dye or FP density convolved with an anisotropic 3D point-spread function
  (a Gaussian, elongated along the optical axis), then counted by a camera: Poisson shot noise on
  the photons, Gaussian read noise, an offset, rounded to uint16.
* **Brightfield** is transmitted light through a weak phase (refractive index) and weak absorption
  object, imaged at every focal plane of the z-stack. Each object slice contributes its phase
  through the defocus transfer function ``sin(gamma(f) d)`` and its absorption through
  ``cos(gamma(f) d)``, where ``d`` is the distance from the slice to the focal plane and
  ``gamma(f) ~ pi lambda f^2 / n`` (the weak-object transfer functions of Streibl 1985). Phase
  contrast therefore vanishes in focus and changes sign through focus, as it does in a real
  brightfield stack; a partially coherent condenser damps the high frequencies the further a
  slice is from focus. The image is a physical function of the refractive index, not a mix of
  the fluorescence channels.

All lengths are in micrometres; arrays are ``[Z, Y, X]``.
"""
from __future__ import annotations

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

# ----------------------------------------------------------------------------------------------
# Fluorescence: PSF and convolution


def widefield_psf_sigmas(wavelength_um: float, na: float, n_medium: float) -> tuple[float, float]:
    """Gaussian approximation ``(sigma_z, sigma_xy)`` in µm of a widefield PSF (Zhang, Zerubia and
    Olivo-Marin 2007): ``sigma_xy = 0.21 lambda / NA``, ``sigma_z = 0.66 lambda n / NA^2``
    (about (0.29, 0.09) µm for the Allen 1.25-NA water objective at 520 nm)."""
    if not (0 < na < n_medium):
        raise ValueError(f"numerical aperture {na} must lie in (0, n_medium={n_medium})")
    return 0.66 * wavelength_um * n_medium / na**2, 0.21 * wavelength_um / na


FWHM_PER_SIGMA = 2 * np.sqrt(2 * np.log(2))


def confocal_psf_sigmas(excitation_um: float, na: float, n_medium: float) -> tuple[float, float]:
    """Gaussian ``(sigma_z, sigma_xy)`` in µm of a confocal PSF with a pinhole of about one Airy
    unit (a spinning disk at 100x): FWHM ``0.51 lambda_ex / NA`` laterally and
    ``0.88 lambda_ex / (n - sqrt(n^2 - NA^2))`` axially (Wilhelm et al., Zeiss CLSM principles)."""
    if not (0 < na < n_medium):
        raise ValueError(f"numerical aperture {na} must lie in (0, n_medium={n_medium})")
    axial = 0.88 * excitation_um / (n_medium - np.sqrt(n_medium**2 - na**2))
    return float(axial / FWHM_PER_SIGMA), float(0.51 * excitation_um / na / FWHM_PER_SIGMA)


def gaussian_psf(sigma_zyx_px: tuple[float, float, float], truncate: float = 3.0) -> np.ndarray:
    """A normalised 3D Gaussian PSF kernel (odd size per axis, sum 1), sigmas in pixels.

    Each voxel holds the Gaussian integrated over that voxel (differences of error functions), so
    a PSF narrower than a pixel still sums to one and stays centred.
    """
    from scipy.special import erf

    axes = []
    for s in sigma_zyx_px:
        half = max(1, int(np.ceil(truncate * s)))
        edges = np.arange(-half, half + 2) - 0.5
        if s <= 0:
            w = (np.abs(edges[:-1] + 0.5) < 0.5).astype(np.float64)
        else:
            cdf = 0.5 * (1 + erf(edges / (np.sqrt(2) * s)))
            w = np.diff(cdf)
        axes.append(w / w.sum())
    kernel = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (kernel / kernel.sum()).astype(np.float32)


def fft_convolve(volume: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``volume`` convolved with a centred, odd-sized ``kernel`` by FFT, same shape.

    The volume is mirrored at its borders first (the scene continues beyond the field of view),
    so a uniform background stays uniform up to the edges. Leading axes of ``volume`` beyond the
    kernel's rank (e.g. channels) are convolved independently.
    """
    extra = volume.ndim - kernel.ndim
    if extra < 0:
        raise ValueError(f"kernel rank {kernel.ndim} exceeds volume rank {volume.ndim}")
    if any(s % 2 == 0 for s in kernel.shape):
        raise ValueError(f"kernel shape {kernel.shape} must be odd on every axis (a centred PSF)")
    half = [(0, 0)] * extra + [(s // 2, s // 2) for s in kernel.shape]
    padded = np.pad(volume.astype(np.float32), half, mode="symmetric")
    k = kernel.reshape((1,) * extra + kernel.shape).astype(np.float32)
    axes = tuple(range(extra, volume.ndim))
    from scipy import signal  # here: its import (0.5 s, scipy.stats with it) is paid only by a simulation

    return signal.fftconvolve(padded, k, mode="valid", axes=axes).astype(np.float32)


def blur(volume: np.ndarray, sigma_zyx_um: tuple[float, float, float],
         pixel_size_zyx: tuple[float, float, float]) -> np.ndarray:
    """``volume [Z, Y, X]`` seen through a Gaussian PSF with sigmas in µm."""
    sigma_px = tuple(s / p for s, p in zip(sigma_zyx_um, pixel_size_zyx))
    return fft_convolve(volume, gaussian_psf(sigma_px))


# ----------------------------------------------------------------------------------------------
# Camera


def camera(expected_photons: np.ndarray, rng: np.random.Generator, *, gain: float = 1.0,
           offset: float = 100.0, read_noise: float = 2.0) -> np.ndarray:
    """A sCMOS-like camera: Poisson photons x ``gain`` (ADU/photon) + ``offset`` + Gaussian read
    noise (ADU), rounded and clipped to uint16. The mean image is ``gain * expected + offset``."""
    lam = np.clip(expected_photons, 0, None).astype(np.float64)
    counts = rng.poisson(lam).astype(np.float32) * gain
    counts += offset + rng.normal(0.0, read_noise, size=lam.shape).astype(np.float32)
    return np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def illumination_field(shape_yx: tuple[int, int], strength: float,
                       rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field ``[Y, X]`` around 1: a random tilt plus an off-centre radial
    fall-off (Koehler illumination that is slightly off axis), peak-to-peak about ``2 strength``."""
    y, x = np.meshgrid(np.linspace(-1, 1, shape_yx[0]), np.linspace(-1, 1, shape_yx[1]),
                       indexing="ij")
    ty, tx = rng.normal(0, 1, 2)
    cy, cx = rng.uniform(-0.6, 0.6, 2)
    field = 0.5 * (ty * y + tx * x) / np.sqrt(ty**2 + tx**2 + 1e-9)
    field -= 0.5 * ((y - cy) ** 2 + (x - cx) ** 2)
    field -= field.mean()
    field /= np.abs(field).max() + 1e-9
    return (1.0 + strength * field).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Brightfield: weak-object transfer through focus


def brightfield_transfer(shape_zyx: tuple[int, int, int], pixel_size_zyx: tuple[float, float, float],
                         *, wavelength_um: float, na_objective: float, na_condenser: float,
                         n_medium: float) -> tuple[np.ndarray, np.ndarray]:
    """Defocus transfer functions ``(h_cos, h_sin)``, each ``[2Z, Y, X//2+1]`` (rfft2 layout).

    Index ``k`` along the first axis holds the defocus ``d = k dz`` for ``k < Z`` and
    ``d = (k - 2Z) dz`` above, so a circular convolution along z of length ``2Z`` sums every
    object slice into every focal plane without wrap-around. Each transfer is

    * the defocus phase ``gamma(f) d`` with ``gamma = 2 pi (n/lambda - sqrt((n/lambda)^2 - f^2))``
      (non-paraxial; ``~ pi lambda f^2 / n``), averaged over the slice thickness ``dz``
      (a sinc factor, so thick slices do not alias),
    * a partial-coherence envelope ``exp(-(pi d f NA_c / n)^2 / 2)`` (a condenser of numerical
      aperture ``NA_c`` tilts the illumination, which blurs defocused slices),
    * the objective pupil, cut off at ``NA / lambda`` with a soft edge.
    """
    nz, ny, nx = shape_zyx
    dz, dy, dx = pixel_size_zyx
    fy = np.fft.fftfreq(ny, d=dy)[:, None]
    fx = np.fft.rfftfreq(nx, d=dx)[None, :]
    f = np.sqrt(fy**2 + fx**2)  # [Y, X//2+1], cycles/µm
    k_med = n_medium / wavelength_um
    gamma = 2 * np.pi * (k_med - np.sqrt(np.clip(k_med**2 - f**2, 0, None)))
    cutoff = na_objective / wavelength_um
    pupil = 0.5 * (1 - np.tanh((f - cutoff) / (0.05 * cutoff)))
    slab = np.sinc(gamma * dz / (2 * np.pi))  # np.sinc(x) = sin(pi x)/(pi x)

    k = np.arange(2 * nz)
    d = np.where(k < nz, k, k - 2 * nz).astype(np.float64) * dz  # [2Z]
    d = d[:, None, None]
    envelope = np.exp(-0.5 * (np.pi * d * f * na_condenser / n_medium) ** 2)
    common = (slab * pupil)[None] * envelope
    h_cos = (np.cos(gamma * d) * common).astype(np.float32)
    h_sin = (np.sin(gamma * d) * common).astype(np.float32)
    h_cos[nz] = 0  # the unused wrap slot d = -Z dz
    h_sin[nz] = 0
    return h_cos, h_sin


def brightfield_stack(phase: np.ndarray, absorption: np.ndarray,
                      pixel_size_zyx: tuple[float, float, float], *, wavelength_um: float = 0.706,
                      na_objective: float = 1.25, na_condenser: float = 0.55,
                      n_medium: float = 1.335, pad_px: int = 24) -> np.ndarray:
    """The brightfield z-stack (relative intensity around 1) of a weak object.

    Args:
        phase: ``[Z, Y, X]`` phase delay of each voxel slab in radians,
            ``2 pi dz (n(x) - n_medium) / lambda``.
        absorption: ``[Z, Y, X]`` amplitude attenuation of each slab (dimensionless, ``mu dz``).
        pixel_size_zyx: voxel size in µm; the focal planes are the z-slices.
        wavelength_um: illumination wavelength (Allen: 706/95 nm band-pass on the transmitted light).
        na_objective, na_condenser, n_medium: objective and condenser apertures, medium index.
        pad_px: reflect padding in Y and X against wrap-around of defocused light.

    Returns:
        ``[Z, Y, X]`` float32 intensity ``1 - 2 A * h_cos(d) + 2 phi * h_sin(d)`` summed over the
        object slices, with ``d = z_focus - z_object``: a phase object shows no contrast in focus,
        and opposite contrast above and below it.
    """
    if phase.shape != absorption.shape or phase.ndim != 3:
        raise ValueError(f"phase {phase.shape} and absorption {absorption.shape} must be equal [Z, Y, X]")
    nz, ny, nx = phase.shape
    pad = ((0, 0), (pad_px, pad_px), (pad_px, pad_px))
    phi = np.pad(phase.astype(np.float32), pad, mode="reflect")
    amp = np.pad(absorption.astype(np.float32), pad, mode="reflect")
    h_cos, h_sin = brightfield_transfer(phi.shape, pixel_size_zyx, wavelength_um=wavelength_um,
                                        na_objective=na_objective, na_condenser=na_condenser,
                                        n_medium=n_medium)
    # object spectrum per slice, zero-padded to 2Z slices so the z-convolution is linear
    obj_sin = sfft.rfftn(np.concatenate([phi, np.zeros_like(phi)]))  # [2Z, Y, X//2+1]
    obj_cos = sfft.rfftn(np.concatenate([amp, np.zeros_like(amp)]))
    spec = 2 * (obj_sin * sfft.fft(h_sin, axis=0) - obj_cos * sfft.fft(h_cos, axis=0))
    image = sfft.irfft2(sfft.ifft(spec, axis=0)[:nz], s=phi.shape[1:], axes=(1, 2))
    image = image[:, pad_px:pad_px + ny, pad_px:pad_px + nx]
    return (1.0 + image).astype(np.float32)


def smooth_noise(shape: tuple[int, ...], sigma_px: float | tuple[float, ...],
                 rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation: a texture field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px,
                                    mode="wrap")
    return field / (field.std() + 1e-9)
