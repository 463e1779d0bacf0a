"""What the tiny preset adds to SViTT so that its video encoder can learn from scratch on a CPU,
where the paper's starts from BEiT's image weights (DESIGN.md, "The tiny preset"): a sine-cosine
start for the absolute 3D position embedding, and a residual space-time convolution over the patch
tokens. `model.VideoEncoder` uses them where the config asks (`abs_pos_embed` built from scratch,
`space_time_conv`); the `base` preset uses neither.

Imports: torch only.
"""
import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed(frames, grid, dim):
    """(T H W, dim) sine-cosine embedding of each patch's (t, h, w), as the Transformer and MAE
    start theirs: a quarter of the channels for t, three eighths each for h and w.

    A video encoder trained from scratch needs it: its patch embeddings start at an RMS of about
    0.6, a 0.02-std learned embedding 30 times smaller, and AdamW moves a weight by at most about
    lr a step (0.175 over the tiny 4-frame stage's 350 steps at 5e-4), so positions, time
    included, would stay almost invisible for the whole run."""
    def axis(positions, channels):  # (n,) -> (n, channels)
        freqs = 1.0 / 10000 ** (torch.arange(channels // 2, dtype=torch.float64) / (channels // 2))
        angles = positions[:, None].double() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    dt = dim // 4 // 2 * 2
    dh = (dim - dt) // 2 // 2 * 2
    dw = dim - dt - dh
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(grid), torch.arange(grid),
                             indexing="ij")
    table = torch.cat([axis(t.flatten(), dt), axis(h.flatten(), dh), axis(w.flatten(), dw)], dim=1)
    return table.float()  # (T H W, dim), time-major as the tokens (Eq. 1)


class SpaceTimeConv(nn.Module):
    """A residual space-time convolution over the patch tokens (`space_time_conv`, its hidden
    width): x + W2 * GELU(W1 * x), W1 and W2 3 x 3 x 3 convolutions over (t, h, w), zero-padded,
    W2 starting at zero, so that the encoder starts as the plain patch embedding.

    Not in the paper, whose ViT starts from BEiT's image weights; the tiny preset's ViT starts from
    scratch, as depth-wise 3D convolutions give UniFormer its position encoding and ST-Adapter an
    image ViT its time. A patch token alone sees one frame, and attention has to learn which token
    of the next frame to compare it with before anything in the clip's summary can say which way
    an object moved; the kernels compare each place with its neighbours in the previous and next
    frame from the first step (experiments/order_probe.py). They do not depend on T: the 4 -> 8
    frame expansion carries them over as they are."""

    def __init__(self, width, hidden):
        super().__init__()
        self.conv1 = nn.Conv3d(width, hidden, 3, padding=1)
        self.conv2 = nn.Conv3d(hidden, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):  # (B, d, T, H', W') -> the same
        return x + self.conv2(F.gelu(self.conv1(x)))
