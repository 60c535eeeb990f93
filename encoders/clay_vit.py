"""The Clay v1 / v1.5 encoder network (inference path): dynamic patch embedding + ViT.

Module and parameter names mirror the encoder of Clay's `claymodel` package, so the
`model.encoder.*` tensors of a released checkpoint load here with `strict=True` once the
prefix is stripped. Written from Clay's code (claymodel/model.py, factory.py, backbone.py,
utils.py as released with v1.5) and the DOFA paper (Xiong et al. 2024, arXiv:2403.15356);
every numerical detail that changes the vectors is kept, including the odd ones (see
`position_encoding`). Training-only parts (masking, decoder, teacher) are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Width of the wavelength encoding and of the small transformer that makes the kernels.
WAVE_DIM = 128
#: Learnable tokens that sit beside the band tokens in that transformer.
NUM_WEIGHT_TOKENS = 128
#: Clay multiplies the generated patch kernels by this constant before the convolution.
KERNEL_SCALE = 0.02
#: The last 8 dims of every patch's position code carry time (4) and lat/lon (4).
METADATA_DIMS = 8
_TEMPERATURE = 10000


def wavelength_encoding(waves_um: torch.Tensor, dim: int = WAVE_DIM) -> torch.Tensor:
    """(C,) band central wavelengths in micrometres -> (C, dim) sin | cos code."""
    half = dim // 2
    exponent = torch.arange(half, device=waves_um.device) / (half - 1)
    freqs = 1.0 / (_TEMPERATURE ** exponent)
    angles = waves_um.float()[:, None] * freqs[None, :]  # (C, dim/2)
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def position_encoding(rows: int, cols: int, dim: int, gsd_m: float) -> torch.Tensor:
    """(rows*cols, dim) 2-D sin/cos code of the patch grid in raster order, scaled by GSD.

    Built in float32 on the CPU, the way Clay builds it, so the angles (which reach the
    thousands for coarse sensors) round the same. Clay's exponent is `2*i/(n-1)/dim`, not the
    usual `i/(n-1)`: every frequency lies between gsd/1.02 and gsd. Kept as trained.
    Clay assumes a square grid; a rectangular one uses the same formula per axis.
    """
    if dim % 4:
        raise ValueError(f"position code width {dim} is not a multiple of 4")
    quarter = dim // 4
    exponent = torch.arange(quarter) / (quarter - 1)
    gsd = torch.tensor(gsd_m, dtype=torch.float32)
    freqs = 1.0 / (_TEMPERATURE ** (2 * exponent / dim)) * gsd
    row_idx, col_idx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    x = col_idx.flatten()[:, None] * freqs[None, :]
    y = row_idx.flatten()[:, None] * freqs[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1)


class ResidualMLP(nn.Module):
    """x + gelu(l2(gelu(l1(x)))): refines the wavelength code (Clay's `FCBlock`)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(width, width)
        self.l2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.l2(F.gelu(self.l1(x))))


class KernelGenerator(nn.Module):
    """Band codes -> conv kernels and bias (Clay's `WavesTransformer`, encoder side).

    One post-norm transformer layer (d=128, 4 heads, FF 2048, GELU) mixes the band tokens
    with 128 learnable weight tokens and one bias token; each band token (plus its input,
    a skip) becomes a p*p*D kernel slice, the bias token becomes the D conv biases.
    """

    def __init__(self, embed_dim: int, patch_size: int, wave_dim: int = WAVE_DIM,
                 num_weight_tokens: int = NUM_WEIGHT_TOKENS, num_heads: int = 4) -> None:
        super().__init__()
        self.num_weight_tokens = num_weight_tokens
        layer = nn.TransformerEncoderLayer(
            d_model=wave_dim, nhead=num_heads, activation="gelu", dropout=0.0,
            norm_first=False, batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.fc_weight = nn.Linear(wave_dim, patch_size * patch_size * embed_dim)
        self.fc_bias = nn.Linear(wave_dim, embed_dim)
        self.weight_tokens = nn.Parameter(torch.randn(num_weight_tokens, wave_dim) * 0.02)
        self.bias_token = nn.Parameter(torch.randn(1, wave_dim) * 0.02)

    def forward(self, band_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One unbatched sequence: [weight tokens (128) | bands (C) | bias token (1)].
        tokens = torch.cat((self.weight_tokens, band_codes, self.bias_token), dim=0)
        mixed = self.encoder(tokens)
        bands = slice(self.num_weight_tokens, -1)
        kernels = self.fc_weight(mixed[bands] + tokens[bands])  # (C, D*p*p)
        bias = self.fc_bias(mixed[-1])  # (D,)
        return kernels, bias


class DynamicPatchEmbedding(nn.Module):
    """Wavelength-conditioned stride-p convolution: any band set -> (B, L, D) patch tokens."""

    def __init__(self, embed_dim: int, patch_size: int, wave_dim: int = WAVE_DIM) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.wave_dim = wave_dim
        self.weight_generator = KernelGenerator(embed_dim, patch_size, wave_dim)
        self.fclayer = ResidualMLP(wave_dim)
        self._init_like_clay()

    def _init_like_clay(self) -> None:
        # Only matters for untrained models (tests, benchmarks): Clay's xavier init.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def conv_params(self, waves_um: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel (D, C, p, p) and bias (D,) for bands at `waves_um` (C,)."""
        # Coded on the CPU, as Clay does, then moved: same rounding on every device.
        codes = wavelength_encoding(waves_um.detach().cpu(), self.wave_dim)
        band_codes = self.fclayer(codes.to(self.fclayer.l1.weight.device))
        kernels, bias = self.weight_generator(band_codes)
        p = self.patch_size
        # Per band the D*p*p outputs are laid out (D, p, p).
        weight = kernels.reshape(-1, self.embed_dim, p, p).transpose(0, 1)
        return weight * KERNEL_SCALE, bias

    def forward(self, pixels: torch.Tensor, waves_um: torch.Tensor) -> torch.Tensor:
        weight, bias = self.conv_params(waves_um)
        patches = F.conv2d(pixels, weight, bias, stride=self.patch_size)  # (B, D, rows, cols)
        return patches.flatten(2).transpose(1, 2)  # (B, L, D), raster order


class Attention(nn.Module):
    """Pre-norm multi-head self-attention, no biases (lucidrains simple-ViT layout)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.to_qkv(self.norm(x))  # (B, N, 3*h*d), chunked q | k | v
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d), scale d**-0.5
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """`depth` residual (attention, MLP) pairs, then a final LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return self.norm(x)


class ClayViTEncoder(nn.Module):
    """Clay's MAE encoder without masking: datacube -> (B, 1+L, D) tokens, CLS first."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_ratio: float,
                 patch_size: int = 8) -> None:
        super().__init__()
        if dim <= METADATA_DIMS or (dim - METADATA_DIMS) % 4:
            raise ValueError(f"dim {dim} must exceed 8 and dim - 8 be a multiple of 4")
        self.dim = dim
        self.patch_size = patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.patch_embedding = DynamicPatchEmbedding(dim, patch_size)
        self.transformer = Transformer(dim, depth, heads, dim_head, int(dim * mlp_ratio))

    def forward(self, pixels: torch.Tensor, waves_um: torch.Tensor, gsd_m: float,
                time: torch.Tensor, latlon: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, H, W), waves_um (C,), time/latlon (B, 4) -> (B, 1 + L, D)."""
        batch, _, height, width = pixels.shape
        rows, cols = height // self.patch_size, width // self.patch_size
        patches = self.patch_embedding(pixels, waves_um)  # (B, L, D)
        grid_code = position_encoding(rows, cols, self.dim - METADATA_DIMS, gsd_m)
        grid_code = grid_code.to(patches.device).expand(batch, -1, -1)  # (B, L, D-8)
        metadata = torch.cat((time, latlon), dim=1).float()  # (B, 8)
        metadata = metadata[:, None, :].expand(-1, rows * cols, -1)
        patches = patches + torch.cat((grid_code, metadata), dim=-1)
        cls = self.cls_token.expand(batch, -1, -1)
        return self.transformer(torch.cat((cls, patches), dim=1))  # (B, 1 + L, D)
