"""Speed-ups of SViTT's training step that change no result: what a CPU run needs to be quick.

The model (`model.py`) reads as the paper's equations; the pieces here do the same arithmetic
faster or in less memory, and tests hold each to the plain computation
(`tests/test_cpu_speedups.py`):

* `Mlp`: the block's Linear -> GELU -> Linear, with GELU recomputed in backward instead of kept
  (on every device: it halves the largest activation of a block once attention is sparse);
* `Dropout` and `attention_with_dropout`: dropout whose masks come from a faster CPU sampler, and
  BERT attention with dropout computed by the plain softmax on the CPU so that it uses that sampler
  (other devices use PyTorch's own kernels);
* `keep_freed_memory`: a process-wide allocator setting (glibc) that `train.py` and the attention
  benchmark make once at start-up;
* `native_bf16`: whether this CPU multiplies bfloat16 matrices in hardware, where `train.py`
  trains under bf16 autocast as on a GPU (`--precision`, `use_bf16`).

What each buys is stated in its docstring; `python benchmarks/speedups.py` measures the tiny
preset's training step with and without them, side by side in one process (figures in
`benchmarks/README.md`).
"""
import ctypes

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def keep_freed_memory():
    """On Linux/glibc, keep freed tensor memory in the process instead of returning it to the OS.

    A process-wide setting: call it once, at the start of a script. glibc serves large allocations
    with mmap and unmaps them on free, so every training step page-faults its activations back in:
    ~320 MB a step for the tiny preset at T = 4 (2-3 MB with this setting). Since the sparse
    attention works a few heads at a time and no longer needs it, what it buys is small: the tiny
    preset's step (batch 16, T = 4, forward + backward + AdamW) took 1.01 s with it against 1.02 and
    1.07 s without, two rounds on a quiet 2-core CPU. train.py keeps it for that; a copied
    `sparse_attention.py` is as fast without it. M_MMAP_MAX = 0 and a large M_TRIM_THRESHOLD make
    freed blocks reusable. Elsewhere (no glibc) it does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def native_bf16():
    """True where the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX).

    There oneDNN multiplies bf16 matrices at 2.5 to 4 times the fp32 rate (the tiny preset's
    linear layers on a 2-core AVX512-BF16 CPU), and a training step under bf16 autocast takes 0.6
    of the fp32 one (`python benchmarks/speedups.py --precision`); elsewhere bf16 is emulated and
    slower than fp32. Unlike the rest of this file, autocast changes the arithmetic (bf16 products,
    fp32 weights and sums), as it does on a GPU; `train.py --precision fp32` turns it off.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)



def use_bf16(precision, device):
    """--precision ("auto", "bf16" or "fp32") -> whether the forward runs under bf16 autocast:
    with "auto", on GPUs and on CPUs with bf16 instructions (train.py and eval.py alike)."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and native_bf16())
    return precision == "bf16"

# --------------------------------------------------------------------------------------------
# The MLP with GELU recomputed in backward
# --------------------------------------------------------------------------------------------

class _GeluLinear(torch.autograd.Function):
    """y = GELU(h) W^T + b that keeps only h for backward and recomputes GELU(h) there.

    Autograd would keep both h (for GELU's backward) and GELU(h) (for the product's): two
    (N, 4 d) tensors, the largest activations of a block once attention is sparse. Recomputing
    the elementwise GELU left the MLP's forward+backward as fast at d = 768 (3137 tokens) and 6%
    slower at d = 128, on a 2-core CPU.
    """

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        hidden = F.gelu(h)
        grad_h = torch.ops.aten.gelu_backward(grad @ weight.to(grad.dtype), h)
        grad_weight = grad.flatten(0, -2).T @ hidden.flatten(0, -2).to(grad.dtype)
        return grad_h, grad_weight.to(weight.dtype), grad.flatten(0, -2).sum(0).to(weight.dtype)


class Mlp(nn.Sequential):
    """The block's feed-forward network, Linear -> GELU -> Linear (parameters named 0 and 2, as an
    nn.Sequential), with GELU recomputed in backward (`_GeluLinear`).

    It keeps one (N, 4 d) tensor for backward instead of two: the whole model's activation memory
    in the cost table (`benchmarks/cost.py`) is counted with it.
    """

    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        if not torch.is_grad_enabled():
            return super().forward(x)
        return _GeluLinear.apply(self[0](x), self[2].weight, self[2].bias)


# --------------------------------------------------------------------------------------------
# Dropout with a faster CPU sampler
# --------------------------------------------------------------------------------------------

def cpu_dropout(x, p):
    """Dropout with the mask drawn from 16-bit slices of 64-bit random integers (see `Dropout`)."""
    if p >= 1:
        return x * 0
    threshold = round(p * 65536)  # drop where a uniform 16-bit u < threshold: probability p'
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-2 ** 63, None)
    # four uniform 16-bit draws a word, minus 2^15
    u = words.view(torch.int16)[:x.numel()].view(x.shape)
    keep = u >= threshold - 32768
    return x.mul(65536 / (65536 - threshold)).mul_(keep)  # kept ones scaled by 1 / (1 - p')


class Dropout(nn.Dropout):
    """nn.Dropout with a faster sampler on the CPU: the same distribution, p rounded to 16 bits.

    PyTorch's CPU Bernoulli sampler costs ~10 ns a number: a fifth of the tiny preset's training
    step went to the text encoders' dropout masks. One 64-bit random integer (~5 ns) holds four
    uniform 16-bit ones u; an element is dropped where u < round(p 2^16), so with probability
    p' = round(p 2^16) / 2^16 (0.1 -> 0.1000061), and the kept ones are scaled by 1 / (1 - p'): the
    expectation is the input's, as in nn.Dropout. The draws come from torch's default generator, so
    torch.manual_seed reproduces them. Other devices use nn.Dropout's own kernel.
    """

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return cpu_dropout(x, self.p)


def attention_with_dropout(q, k, v, mask, dropout):
    """softmax(q k^T / sqrt(D) + mask) v with `dropout` (a `Dropout`) on the weights.

    q (B, H, L, D), k and v (B, H, M, D), mask additive (B, 1, 1, M) or None. While training on the
    CPU this is the math `scaled_dot_product_attention` falls back to there anyway, with `Dropout`'s
    sampler; otherwise the fused kernel.
    """
    p = dropout.p if dropout.training else 0.0
    if p > 0 and q.device.type == "cpu":
        probs = torch.einsum("bhld,bhmd->bhlm", q, k) * q.shape[-1] ** -0.5
        probs = (probs if mask is None else probs + mask).softmax(dim=-1)
        return torch.einsum("bhlm,bhmd->bhld", dropout(probs), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
