"""The exact low-pass operator phi_N = up_N(down_N(.)) of the official ILVR code.

The official code resizes with a MATLAB-style ``imresize``: a cubic kernel (Keys, a = -0.5),
antialiased on the downscale (the kernel is stretched by N and scaled by 1/N), MATLAB pixel
centres, weights normalised to sum to one per output pixel, and mirror reflection at the
borders. That operation is linear and separable, so per axis it is one small matrix:

    down_N(x) = D @ x @ D.T      D: (H/N, H)
    up_N(z)   = U @ z @ U.T      U: (H, H/N)

The matrices are built here from that definition, once, in float64, and applied as plain
matmuls. ``torch.nn.functional.interpolate`` is *not* this operator (other cubic, other
borders), and up(down(.)) is not idempotent (D @ U != I).
"""

import math
import numbers

import torch

__all__ = ["cubic_kernel", "resize_matrix", "LowPass"]


def cubic_kernel(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with parameter ``a`` (support [-2, 2])."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (a + 2) * ax3 - (a + 3) * ax2 + 1
    far = a * ax3 - 5 * a * ax2 + 8 * a * ax - 4 * a
    return torch.where(ax <= 1, near, torch.where(ax <= 2, far, torch.zeros_like(ax)))


def _mirror(index: torch.Tensor, length: int) -> torch.Tensor:
    """Symmetric reflection (edge pixel repeated) of integer indices into [0, length)."""
    index = index.remainder(2 * length)
    return torch.where(index >= length, 2 * length - 1 - index, index)


def resize_matrix(in_length: int, out_length: int, antialias: bool = True) -> torch.Tensor:
    """Matrix (out_length, in_length), float64, of the MATLAB-style cubic resize along one axis.

    Output pixel i sits at input coordinate u_i = (i + 0.5) / s - 0.5 (MATLAB pixel centres,
    s = out_length / in_length). When downscaling with ``antialias`` the kernel becomes
    s * k(s * x) with support widened to 4 / s. Each row is normalised to sum to one, and
    taps that fall outside [0, in_length) are reflected back (mirror borders).
    """
    scale = out_length / in_length
    stretch = scale if (antialias and scale < 1) else 1.0
    width = 4.0 / stretch
    u = (torch.arange(out_length, dtype=torch.float64) + 0.5) / scale - 0.5  # (out,)
    taps = int(math.ceil(width)) + 2
    left = torch.floor(u - width / 2)  # (out,)
    j = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # (out, taps)
    w = stretch * cubic_kernel(stretch * (u[:, None] - j))
    w = w / w.sum(dim=1, keepdim=True)
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    return matrix.scatter_add_(1, _mirror(j.long(), in_length), w)


class LowPass(torch.nn.Module):
    """phi_N for square images of side ``image_size``: ``LowPass(256, 32)(x)``.

    Holds the down matrix D (H/N, H) and the up matrix U (H, H/N) as buffers, so ``.to()``
    moves them to the device once; calls allocate nothing but their outputs. N may be any
    divisor of the image size (the official code accepted only powers of two).
    """

    down_matrix: torch.Tensor
    up_matrix: torch.Tensor

    def __init__(
        self,
        image_size: int,
        factor: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        named = {"image_size": image_size, "factor": factor}
        if wrong := [f"{k}={v!r}" for k, v in named.items() if not isinstance(v, numbers.Integral)]:
            raise TypeError(f"LowPass: {', '.join(wrong)} must be an int (factor N: a divisor of image_size)")
        if factor < 1 or image_size % factor != 0:
            raise ValueError(
                f"low-pass factor N={factor} must be a positive divisor of the image size {image_size}"
            )
        self.image_size, self.factor = image_size, factor
        small = image_size // factor
        down, up = resize_matrix(image_size, small), resize_matrix(small, image_size)
        self.register_buffer("down_matrix", down.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("up_matrix", up.to(device=device, dtype=dtype), persistent=False)

    @staticmethod
    def _resize(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """M @ x @ M.T for x (..., S, S), S the columns of M (out, S): (..., out, out)."""
        side = matrix.shape[1]
        if x.shape[-2:] != (side, side):
            raise ValueError(f"low-pass expects (..., {side}, {side}) images, got {tuple(x.shape)}")
        m = matrix.to(x.dtype)
        return m @ x @ m.T

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """down_N: (..., H, W) -> (..., H/N, W/N)."""
        return self._resize(self.down_matrix, x)

    def up(self, z: torch.Tensor) -> torch.Tensor:
        """up_N: (..., H/N, W/N) -> (..., H, W)."""
        return self._resize(self.up_matrix, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """phi_N(x) = up_N(down_N(x)) for x (..., H, W); same shape out."""
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, factor={self.factor}"
