"""Random Convolutional Features (RCF): a fixed bank of k x k convolutions, a ReLU, a global mean.

Two methods go by this name; chipscout offers both, under their own names:

* ``rcf-gaussian``: the Microsoft Planetary Computer tutorial's model. Kernel weights are drawn
  from N(0, 1) with a generator seeded by `seed`; no data needed.
* ``rcf-empirical``: MOSAIKS (Rolf et al., "A generalizable and accessible approach to machine
  learning with global satellite imagery", Nature Communications 12, 4392, 2021). Kernels are
  k x k x C patches sampled from the imagery itself, each with its mean removed and scaled to
  unit norm, then ZCA-whitened as a pool. Such an encoder must `fit` a sample before use.

Both share the tutorial's forward convention. With `features / 2` kernels W and one bias b for
all of them, for each output position p

    x_p = (W * pixels)_p + b
    vector = [ mean_p relu(x_p) for each kernel ]  ++  [ mean_p relu(-x_p) for each kernel ]

so the second half is relu(-(W * pixels) - b), i.e. the bias is applied *before* the sign flip,
exactly as the tutorial negates its biased convolution. MOSAIKS also thresholds its convolutions
with a bias; chipscout uses the tutorial's convention for both kernel sources, so the two modes
differ only in where the kernels come from.

Defaults (`SOURCE_DEFAULTS`) depend on the kernel source. The family default is empirical kernels
of 5 x 5 px with bias -0.2 (reflectance units): the best configuration measured for retrieval on
EuroSAT, held-out protocols included (BENCHMARKS.md (quality)). Whitened empirical kernels sum to
zero and respond weakly to smooth reflectance, so the tutorial's bias of -1 leaves their relu(+x)
half mostly zero. `kernels="gaussian"` alone gives the tutorial's form: 3 x 3 kernels, bias -1.

`band_stats=True` appends each band's mean and standard deviation over the chip's valid pixels
(`encoders.baseline.band_statistics`) to the vector: a hybrid that adds the plain spectral
signature the zero-sum kernels see only as contrasts (+0.001 to +0.008 P@10 on EuroSAT, so
an option rather than a default).

Both halves come from one convolution through the identity relu(-x) = relu(x) - x: we pool
relu(x) and x itself, never materialising relu(-x). On a CPU the convolution runs one chip
at a time over blocks of kernels small enough to stay in cache, each block a task for one of
`torch.get_num_threads()` single-threaded workers (so a chip's vector never depends on its batch
or the thread count, and no OpenMP team waits on a busy core); on CUDA it runs over big chunks
channels-last under bf16 (else fp16) autocast. Pooling is always accumulated in float32.

Nodata: given a valid_mask, only output positions whose whole k x k window is valid are
averaged, so nodata never pulls a vector towards zero; a chip without one such window is an
error, never NaN.

Written from the papers' and tutorial's descriptions; no MOSAIKS code (non-commercial licence)
and no torchgeo code is copied.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from chipscout.encoders.base import LOCAL_CELL_PX, ChipEncoder, EncoderError, cell_means
from chipscout.encoders.registry import register_encoder
from chipscout.encoders.baseline import band_statistics

#: Per-process pools of single-threaded CPU workers, by size (`_cpu_workers`).
_WORKER_POOLS: dict[int, ThreadPoolExecutor] = {}
_WORKER_POOLS_LOCK = threading.Lock()


def _one_openmp_thread() -> None:
    """Limit the calling thread to one OpenMP thread (torch's intra-op pool, oneDNN and MKL read
    the thread's own OpenMP setting), leaving every other thread's as it was."""
    torch.get_num_threads()  # torch sets a new thread's OpenMP count lazily: do it first
    threadpool_limits(1, user_api="openmp")


def _cpu_workers(count: int) -> ThreadPoolExecutor:
    """`count` worker threads, each running torch on one OpenMP thread, kept for the process."""
    with _WORKER_POOLS_LOCK:
        pool = _WORKER_POOLS.get(count)
        if pool is None:
            pool = ThreadPoolExecutor(count, thread_name_prefix="rcf-cpu",
                                      initializer=_one_openmp_thread)
            _WORKER_POOLS[count] = pool
        return pool


KERNEL_SOURCES = ("gaussian", "empirical")
#: What `kernel_size` and `bias` left as None become, per kernel source. Gaussian: the Planetary
#: Computer tutorial's form. Empirical: measured on EuroSAT MS and RGB (BENCHMARKS.md (quality)).
SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "gaussian": {"kernel_size": 3, "bias": -1.0},
    "empirical": {"kernel_size": 5, "bias": -0.2},
}
MAX_FEATURES = 8192
#: A patch whose values vary less than this (L2 norm after mean removal, reflectance units) is
#: flat: it has no texture to whiten and would become an all-zero kernel, so fitting drops it.
FLAT_PATCH_NORM = 1e-6


@dataclass(frozen=True)
class PatchFitReport:
    """What `RandomConvolutionalFeatures.fit` saw; kept on the encoder as `fit_report`."""

    valid_windows: int
    """k x k windows in the sample touching no nodata (or non-finite) pixel."""
    pool_size: int
    """Patches drawn from those windows (min(patch_pool_size, valid_windows))."""
    flat_patches: int
    """Drawn patches dropped because they are constant (nothing left after mean removal)."""
    kernels: int
    """Whitened patches kept as kernels (features / 2)."""
    eigenvalues: torch.Tensor
    """Eigenvalues of the pool covariance (before adding epsilon), ascending, float64."""


@dataclass(frozen=True)
class ZcaWhitening:
    whitened: torch.Tensor
    """(N, d) float64: (patches - mean) @ matrix."""
    mean: torch.Tensor
    """(d,) float64 pool mean."""
    matrix: torch.Tensor
    """(d, d) float64 symmetric whitening matrix V diag((lambda + epsilon) ** -1/2) V^T."""
    eigenvalues: torch.Tensor
    """(d,) float64 eigenvalues lambda of the covariance, ascending."""


def zca_whiten(patches: torch.Tensor, epsilon: float) -> ZcaWhitening:
    """ZCA-whiten the rows of `patches` (N, d): covariance = centred^T centred / N.

    With epsilon much smaller than the covariance's eigenvalues, the whitened rows have
    covariance close to the identity; epsilon damps directions with less variance than that.
    Computed in float64 with `torch.linalg.eigh` (the covariance is symmetric).
    """
    if patches.ndim != 2 or patches.shape[0] < 2:
        raise EncoderError(
            f"zca_whiten needs (N >= 2, d) patches, got shape {tuple(patches.shape)}"
        )
    if not epsilon > 0:
        raise EncoderError(f"whitening epsilon must be > 0, got {epsilon}")
    rows = patches.to(torch.float64)
    mean = rows.mean(dim=0)
    centred = rows - mean
    covariance = centred.T @ centred / rows.shape[0]
    identity = torch.eye(covariance.shape[0], dtype=torch.float64, device=covariance.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance + epsilon * identity)
    matrix = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
    return ZcaWhitening(centred @ matrix, mean, matrix, (eigenvalues - epsilon).clamp_min(0))


def normalize_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove each row's mean and scale it to unit L2 norm (float64).

    Returns (normalised rows, usable) where `usable` is False for flat rows, which stay zero.
    """
    rows = patches.to(torch.float64)
    centred = rows - rows.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1)
    usable = norms > FLAT_PATCH_NORM
    return centred / norms.clamp_min(FLAT_PATCH_NORM)[:, None], usable


def valid_windows(valid: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, H, W) bool pixel validity -> (B, H-k+1, W-k+1) bool: the k x k window at each
    output position of an unpadded convolution contains only valid pixels."""
    invalid = (~valid).to(torch.float32)[:, None]
    return F.max_pool2d(invalid, kernel_size, stride=1)[:, 0] == 0


def sample_patches(pixels: torch.Tensor, valid_mask: torch.Tensor | None, kernel_size: int,
                   count: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Up to `count` distinct k x k x C patches, drawn at random from windows of `pixels`
    (B, C, H, W) that touch no nodata or non-finite pixel.

    Returns (patches (N, C*k*k) in the order drawn, number of such windows in the sample).
    `generator` is a CPU generator; the draw is reproducible for a given seed and sample.
    """
    batch, channels, height, width = pixels.shape
    valid = torch.isfinite(pixels).all(dim=1)
    if valid_mask is not None:
        valid &= valid_mask
    windows = valid_windows(valid, kernel_size)  # (B, H', W')
    out_h, out_w = windows.shape[1:]
    candidates = windows.flatten().nonzero().squeeze(1).cpu()
    found = candidates.numel()
    chosen = candidates[torch.randperm(found, generator=generator)[:count]].to(pixels.device)
    chip, position = chosen // (out_h * out_w), chosen % (out_h * out_w)
    row, col = position // out_w, position % out_w
    offsets = torch.arange(kernel_size, device=pixels.device)
    patches = pixels[
        chip[:, None, None, None],
        torch.arange(channels, device=pixels.device)[None, :, None, None],
        (row[:, None] + offsets)[:, None, :, None],
        (col[:, None] + offsets)[:, None, None, :],
    ]  # (N, C, k, k)
    return patches.reshape(chosen.numel(), -1), found


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EncoderError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise EncoderError(f"{name} must be {bound}, got {value}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EncoderError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@register_encoder("rcf")
class RandomConvolutionalFeatures(ChipEncoder):
    """Random Convolutional Features, Gaussian (tutorial) or empirical (MOSAIKS) kernels.

    in_channels: bands C the chips have.
    features: random features F; even, 2..8192. The conv has features / 2 kernels.
    kernel_size: k, the kernels' width and height in pixels (unpadded, stride 1). None: the
        kernel source's default (`SOURCE_DEFAULTS`: 5 empirical, 3 Gaussian).
    kernels: "empirical" (whitened patches of the data, after `fit`; the default) or
        "gaussian" (weights ~ N(0, 1)).
    bias: added to every kernel's response before the +/- ReLUs, in the units of the pixels
        (reflectance). None: the kernel source's default (-0.2 empirical, -1 Gaussian).
    seed: seeds the Gaussian draw, or the patch draw of `fit`.
    whitening_epsilon: added to the patch covariance before inverting its square root
        (empirical). Patches are unit-norm, so the covariance's eigenvalues sum to ~1;
        directions with less variance than epsilon are damped rather than amplified.
    patch_pool_size: patches drawn by `fit` to estimate the whitening (empirical); the kernels
        are the first features / 2 of them, in random order.
    band_stats: also append each band's mean and standard deviation (2C numbers), so vectors
        have features + 2C dimensions.
    """

    family = "rcf"
    #: Activations one convolution call may produce; larger batches are split in chips (then
    #: kernels), which changes no result. Not part of `config()`. On a 2-core EPYC, 8 MiB chunks
    #: ran 2-3x faster than 512 MiB ones (they stay in cache); a GPU wants big calls.
    cpu_chunk_bytes: int = 8 * 2**20
    cuda_chunk_bytes: int = 512 * 2**20

    def __init__(
        self,
        in_channels: int,
        features: int = 1024,
        kernel_size: int | None = None,
        kernels: str = "empirical",
        bias: float | None = None,
        seed: int = 0,
        whitening_epsilon: float = 1e-3,
        patch_pool_size: int = 100_000,
        band_stats: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels, 1)
        self.features = _check_int("features", features, 2, MAX_FEATURES)
        if features % 2:
            raise EncoderError(
                f"features must be even (half come from relu(+x), half from relu(-x)), "
                f"got {features}"
            )
        if kernels not in KERNEL_SOURCES:
            raise EncoderError(
                f"kernels must be one of {', '.join(KERNEL_SOURCES)}, got {kernels!r}"
            )
        self.kernels = kernels
        defaults = SOURCE_DEFAULTS[kernels]
        kernel_size = defaults["kernel_size"] if kernel_size is None else kernel_size
        self.kernel_size = _check_int("kernel_size", kernel_size, 1, 64)
        self.bias_value = _check_float("bias", defaults["bias"] if bias is None else bias)
        if not isinstance(band_stats, bool):
            raise EncoderError(f"band_stats must be true or false, got {band_stats!r}")
        self.band_stats = band_stats
        self.seed = _check_int("seed", seed, 0, 2**63 - 1)
        self.whitening_epsilon = _check_float("whitening_epsilon", whitening_epsilon)
        if self.whitening_epsilon <= 0:
            raise EncoderError(f"whitening_epsilon must be > 0, got {whitening_epsilon}")
        self.patch_pool_size = _check_int("patch_pool_size", patch_pool_size, 1)
        if kernels == "empirical" and patch_pool_size < features // 2:
            raise EncoderError(
                f"patch_pool_size ({patch_pool_size}) must be at least features / 2 "
                f"({features // 2}): the kernels are taken from the pool"
            )
        self.fit_report: PatchFitReport | None = None

        shape = (self.features // 2, in_channels, kernel_size, kernel_size)
        if kernels == "gaussian":
            generator = torch.Generator().manual_seed(seed)
            weight = torch.randn(shape, generator=generator, dtype=torch.float32)
        else:
            weight = torch.zeros(shape, dtype=torch.float32)  # set by fit()
        # Buffers, not parameters: nothing here trains, and state_dict() must carry them.
        self.register_buffer("weight", weight)
        self.register_buffer("bias", torch.full((self.features // 2,), self.bias_value))
        self.register_buffer("fitted", torch.tensor(kernels == "gaussian"))

    # -- the ChipEncoder contract -------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        return self.features + (2 * self.in_channels if self.band_stats else 0)

    @property
    def name(self) -> str:
        return f"rcf-{self.kernels}" + ("+band-stats" if self.band_stats else "")

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]  per instance, not per class
        return self.kernels == "empirical"

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "features": self.features,
            "kernel_size": self.kernel_size,
            "kernels": self.kernels,
            "bias": self.bias_value,
            "seed": self.seed,
            "whitening_epsilon": self.whitening_epsilon,
            "patch_pool_size": self.patch_pool_size,
            "band_stats": self.band_stats,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config().items())

    # -- fitting (empirical kernels) ----------------------------------------------------------

    def fit(self, pixels: torch.Tensor, valid_mask: torch.Tensor | None = None,
            waves_um: torch.Tensor | None = None) -> PatchFitReport | None:
        """Empirical kernels from a sample (B, C, H, W) of scaled pixels; Gaussian: nothing to do.

        Draws `patch_pool_size` k x k x C patches (seeded by `seed`) that touch no nodata pixel,
        removes each patch's mean, scales it to unit norm, drops flat patches, ZCA-whitens the
        pool and keeps the first features / 2 whitened patches as kernels.
        """
        if self.kernels != "empirical":
            return None
        pixels = self._checked_pixels(pixels, waves_um, "fit")
        mask = self._checked_mask(valid_mask, pixels)
        needed = self.features // 2
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            patches, found = sample_patches(pixels, mask, self.kernel_size, self.patch_pool_size,
                                            generator)
            if found < needed:
                raise EncoderError(
                    f"the fitting sample has only {found} {self._window} windows that touch no "
                    f"nodata pixel, but {needed} are needed (features / 2); fit on more or larger "
                    f"chips, or ask for fewer features"
                )
            normalised, usable = normalize_patches(patches.cpu())
            pool = normalised[usable]
            if pool.shape[0] < needed:
                raise EncoderError(
                    f"only {pool.shape[0]} of the {patches.shape[0]} patches drawn have any "
                    f"contrast (the others are flat), but {needed} are needed (features / 2); "
                    f"fit on a more varied sample, or ask for fewer features"
                )
            whitening = zca_whiten(pool, self.whitening_epsilon)
            kernels = whitening.whitened[:needed].reshape(self.weight.shape)
            self.weight.copy_(kernels.to(self.weight.dtype))
            self.fitted.fill_(True)
        self.fit_report = PatchFitReport(
            valid_windows=found,
            pool_size=patches.shape[0],
            flat_patches=int((~usable).sum()),
            kernels=needed,
            eigenvalues=whitening.eigenvalues,
        )
        return self.fit_report

    # -- embedding ----------------------------------------------------------------------------

    def forward(
        self,
        pixels: torch.Tensor,
        waves_um: torch.Tensor | None = None,
        *,
        valid_mask: torch.Tensor | None = None,
        gsd_m: float | None = None,
        time: torch.Tensor | None = None,
        latlon: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C, H, W) reflectance -> (B, embedding_dim) float32: the features, then (with
        `band_stats`) each band's mean and std. Wavelengths, GSD, time and place are accepted for
        the contract and ignored: the kernels already fix the band order."""
        if not self.is_fitted:
            raise EncoderError(
                "rcf-empirical has no kernels yet: call fit(pixels, valid_mask) on a sample of "
                "the imagery first, or load the encoder with its fitted state"
            )
        pixels = self._checked_pixels(pixels, waves_um, "forward")
        mask = self._checked_mask(valid_mask, pixels)
        batch = pixels.shape[0]
        out_h = pixels.shape[2] - self.kernel_size + 1
        out_w = pixels.shape[3] - self.kernel_size + 1
        vectors = torch.empty((batch, self.embedding_dim), dtype=torch.float32, device=pixels.device)

        with torch.no_grad():
            weights = None  # (B, H'*W') per-position weights of the masked mean
            if mask is not None:
                # Nodata may be NaN; zero it so it cannot leak into the conv. Windows touching it
                # get weight 0, so nodata never pulls a vector towards zero.
                pixels = torch.where(mask[:, None], pixels, torch.zeros((), device=pixels.device))
                windows = valid_windows(mask, self.kernel_size).flatten(1)
                counts = windows.sum(dim=1)
                empty = (counts == 0).nonzero().flatten().tolist()
                if empty:
                    raise EncoderError(
                        f"chip(s) {empty} of the batch have no {self._window} window of valid "
                        f"pixels (all or nearly all nodata); leave them out"
                    )
                weights = windows.to(torch.float32) / counts[:, None]

            if pixels.device.type == "cpu":
                # A chip without nodata is pooled by a plain mean whatever else its batch holds,
                # so its vector does not depend on its batch mates.
                partial = None if weights is None else (counts < windows.shape[1]).tolist()
                self._pool_on_cpu_workers(pixels, weights, vectors, partial)
            else:
                self._pool_chunks(pixels, weights, vectors, range(batch),
                                  *self._chunk_sizes(batch, out_h * out_w, pixels.device))
            if self.band_stats:
                vectors[:, self.features:] = band_statistics(pixels, mask)

        if not torch.isfinite(vectors).all():
            bad = (~torch.isfinite(vectors).all(dim=1)).nonzero().flatten().tolist()
            raise EncoderError(
                f"chip(s) {bad} of the batch contain NaN or infinite pixels outside nodata; "
                f"mark such pixels False in valid_mask"
            )
        return vectors

    # -- where in the chip: the feature maps before global pooling ---------------------------

    @property
    def local_cell_px(self) -> int:
        return LOCAL_CELL_PX

    def local_vectors(
        self,
        pixels: torch.Tensor,
        waves_um: torch.Tensor | None = None,
        *,
        valid_mask: torch.Tensor | None = None,
        gsd_m: float | None = None,
        time: torch.Tensor | None = None,
        latlon: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, embedding_dim, h, w): `forward`'s features pooled over cells of `local_cell_px`
        instead of the whole chip. The convolution at output position p sees pixels p..p+k-1, so
        a cell pools the positions whose window starts in it (a shift of (k-1)/2 px, and the last
        k-1 px of the chip start no window). With `band_stats`, each cell's band mean and std.
        Cells without a valid window are NaN. Separate from `forward`, whose pooling is tuned
        for whole chips; the mean of a chip's cells (weighted by their windows) is `forward`."""
        if not self.is_fitted:
            raise EncoderError(f"{self.name} has no kernels yet: fit it, or load it with its state")
        pixels = self._checked_pixels(pixels, waves_um, "local_vectors")
        mask = self._checked_mask(valid_mask, pixels)
        half, cell = self.features // 2, LOCAL_CELL_PX
        batch, _, height, width = pixels.shape
        rows, cols = -(-height // cell), -(-width // cell)
        out = torch.empty((batch, self.embedding_dim, rows, cols), dtype=torch.float32,
                          device=pixels.device)
        with torch.no_grad():
            windows = None
            if mask is not None:
                pixels = torch.where(mask[:, None], pixels, torch.zeros((), device=pixels.device))
                windows = valid_windows(mask, self.kernel_size).float()  # (B, H', W')
            out_h, out_w = height - self.kernel_size + 1, width - self.kernel_size + 1
            # Pad the response back to H x W with weight 0, so cells sit on the pixel grid.
            ones = torch.ones((batch, out_h, out_w), device=pixels.device)
            weights = F.pad(ones if windows is None else windows,
                            (0, width - out_w, 0, height - out_h))
            _, kernels_step = self._chunk_sizes(1, out_h * out_w, pixels.device)
            for chip in range(batch):  # one chip at a time: heatmaps embed a handful of chips
                for first in range(0, half, kernels_step):
                    last = min(first + kernels_step, half)
                    response = self._convolve(pixels[chip:chip + 1], slice(first, last)).float()
                    response = F.pad(response, (0, width - out_w, 0, height - out_h))
                    mean, _ = cell_means(response, weights[chip:chip + 1], cell)
                    positive, _ = cell_means(response.relu_(), weights[chip:chip + 1], cell)
                    out[chip, first:last] = positive[0]
                    out[chip, half + first: half + last] = (positive - mean).clamp_min_(0)[0]
            if self.band_stats:
                pixel_weights = None if mask is None else mask.float()
                band_mean, _ = cell_means(pixels, pixel_weights, cell)
                band_square, _ = cell_means(pixels * pixels, pixel_weights, cell)
                out[:, self.features:] = torch.cat(
                    [band_mean, (band_square - band_mean ** 2).clamp_min(0).sqrt()], dim=1)
        return out

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _window(self) -> str:
        return f"{self.kernel_size}x{self.kernel_size}"

    def _pool_chunks(self, pixels: torch.Tensor, weights: torch.Tensor | None, vectors: torch.Tensor,
                     chips: range, chips_step: int, kernels_step: int,
                     kernels: range | None = None) -> None:
        """Convolve `chips` of `pixels` with the kernels `kernels` (all by default) in chunks of
        `chips_step` chips x `kernels_step` kernels, pooling each chunk into `vectors`."""
        half = self.features // 2
        kernels = kernels if kernels is not None else range(half)
        for start in range(chips.start, chips.stop, chips_step):
            rows = slice(start, min(start + chips_step, chips.stop))
            for first in range(kernels.start, kernels.stop, kernels_step):
                last = min(first + kernels_step, kernels.stop)
                response = self._convolve(pixels[rows], slice(first, last))  # (b, f, H', W')
                if weights is None:
                    mean = response.mean(dim=(2, 3), dtype=torch.float32)
                    positive = response.relu_().mean(dim=(2, 3), dtype=torch.float32)
                else:
                    flat = response.flatten(2).float()  # (b, f, H'*W')
                    chip_weights = weights[rows, :, None]  # (b, H'*W', 1)
                    mean = torch.bmm(flat, chip_weights)[..., 0]
                    positive = torch.bmm(flat.relu_(), chip_weights)[..., 0]
                vectors[rows, first:last] = positive
                # relu(-x) = relu(x) - x; clamp the float rounding of a difference of means.
                vectors[rows, half + first: half + last] = (positive - mean).clamp_min_(0)

    def _pool_on_cpu_workers(self, pixels: torch.Tensor, weights: torch.Tensor | None,
                             vectors: torch.Tensor, partial: list[bool] | None = None) -> None:
        """The CPU forward: tasks of one chip x a cache-sized block of kernels, run by as many
        single-threaded workers as the caller's torch intra-op threads.

        Thread rule (measured, BENCHMARKS.md "RCF under background load"): one convolution
        call on 2 OpenMP threads forks and joins the team for every ~8 MiB chunk, and when
        other processes hold the cores each join waits for the slowest thread (0.45 chips/s with
        2 threads against 1.90 with 1 in issue #21). Workers that each run whole chunks on one
        thread never wait on one another. Each chip is computed by one task sequence on one
        thread, so its vector does not depend on the batch it came in or on the worker count.
        """
        batch, positions = pixels.shape[0], (pixels.shape[2] - self.kernel_size + 1) * (
            pixels.shape[3] - self.kernel_size + 1)
        _, kernels_step = self._chunk_sizes(1, positions, pixels.device)
        half = self.features // 2
        tasks = [(chip, first) for chip in range(batch) for first in range(0, half, kernels_step)]
        workers = min(torch.get_num_threads(), len(tasks))
        inference = torch.is_inference_mode_enabled()  # thread-local: the workers take the caller's

        def run(task: tuple[int, int]) -> None:
            chip, first = task
            chip_weights = weights if partial is not None and partial[chip] else None
            with torch.inference_mode(inference), torch.no_grad():
                self._pool_chunks(pixels, chip_weights, vectors, range(chip, chip + 1), 1, kernels_step,
                                  range(first, min(first + kernels_step, half)))

        # One worker too runs in the pool: the same single-threaded setting (oneDNN follows the
        # worker thread's OpenMP count) for every worker count, so vectors are the same bit for bit.
        for done in _cpu_workers(max(workers, 1)).map(run, tasks):
            del done

    def _convolve(self, pixels: torch.Tensor, kernels: slice) -> torch.Tensor:
        weight, bias = self.weight[kernels], self.bias[kernels]
        if pixels.device.type == "cuda":
            # Tensor cores: bf16 where the GPU has it, else fp16 (pre-Ampere GPUs such as the T4
            # report bf16 only with emulation counted). Channels-last: on an H100, cuDNN's NCHW
            # bf16 kernels ran slower than fp32 for 10 or 13 bands, NHWC ones 1.0-3.1x faster
            # than NCHW (BENCHMARKS.md, RCF). Pooling stays float32.
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            dtype = torch.bfloat16 if native_bf16 else torch.float16
            pixels = pixels.contiguous(memory_format=torch.channels_last)
            weight = weight.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=dtype):
                return F.conv2d(pixels, weight, bias)
        if torch.backends.mkldnn.is_available():
            # oneDNN for every chip size: `F.conv2d` takes it only for inputs of more than 20,480
            # values and sends smaller ones through MKL's GEMM, whose thread count is process-wide
            # (not the worker's one thread), so a small chip's last bits would depend on it.
            return torch.mkldnn_convolution(pixels, weight.contiguous(), bias, [0, 0], [1, 1], [1, 1], 1)
        return F.conv2d(pixels, weight, bias)

    def _chunk_sizes(self, batch: int, positions: int, device: torch.device) -> tuple[int, int]:
        on_gpu = device.type == "cuda"
        budget = self.cuda_chunk_bytes if on_gpu else self.cpu_chunk_bytes
        per_kernel_chip = max(1, positions * (2 if on_gpu else 4))
        half = self.features // 2
        kernels_step = max(1, min(half, budget // per_kernel_chip))
        chips_step = max(1, min(max(batch, 1), budget // (per_kernel_chip * kernels_step)))
        return chips_step, kernels_step

    def _checked_pixels(self, pixels: torch.Tensor, waves_um: torch.Tensor | None,
                        what: str) -> torch.Tensor:
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
            shape = (tuple(pixels.shape) if isinstance(pixels, torch.Tensor)
                     else type(pixels).__name__)
            raise EncoderError(
                f"{self.name}.{what} expects pixels of shape (B, C, H, W), got {shape}"
            )
        if not pixels.is_floating_point():
            raise EncoderError(
                f"{self.name}.{what} expects reflectance as floats (~0..1), got {pixels.dtype}; "
                f"scale the digital numbers first"
            )
        batch, channels, height, width = pixels.shape
        if channels != self.in_channels:
            raise EncoderError(
                f"pixels have {channels} band(s) but this {self.name} encoder's kernels take "
                f"{self.in_channels}; use the band set it was built (and fitted) with"
            )
        if height < self.kernel_size or width < self.kernel_size:
            raise EncoderError(
                f"chips of {height}x{width} px are smaller than the {self._window} kernels"
            )
        if what == "fit" and batch == 0:
            raise EncoderError("fit needs at least one chip")
        if waves_um is not None and waves_um.numel() != channels:
            raise EncoderError(
                f"got {waves_um.numel()} wavelength(s) for {channels} band(s)"
            )
        if pixels.device != self.weight.device:
            raise EncoderError(
                f"pixels are on {pixels.device} but the encoder is on {self.weight.device}; "
                f"move one of them (encoder.to(device))"
            )
        return pixels.float()

    @staticmethod
    def _checked_mask(valid_mask: torch.Tensor | None, pixels: torch.Tensor) -> torch.Tensor | None:
        if valid_mask is None:
            return None
        expected = (pixels.shape[0], *pixels.shape[2:])
        if not isinstance(valid_mask, torch.Tensor) or tuple(valid_mask.shape) != expected:
            shape = tuple(valid_mask.shape) if isinstance(valid_mask, torch.Tensor) else valid_mask
            raise EncoderError(f"valid_mask must have shape (B, H, W) = {expected}, got {shape}")
        if valid_mask.dtype != torch.bool:
            raise EncoderError(f"valid_mask must be a bool tensor, got {valid_mask.dtype}")
        valid_mask = valid_mask.to(pixels.device)
        return None if bool(valid_mask.all()) else valid_mask
