"""Edge sparsity: block-sparse local + random + global attention (SViTT Sec. 3.2, Eq. 5-9, 17).

A video of T frames is a sequence of 1 + N tokens: a class token at position 0 and N regional
(patch) tokens flattened time-major. Attention is a graph over these tokens (Eq. 5-6): query i
mixes the values of the keys j with (i, j) in the edge set E. Dense attention uses every pair;
SViTT keeps only

* local edges (Eq. 7): regional tokens are cut into N_b = ceil(N / G) blocks of G tokens, and block
  k attends to its K_l neighbouring blocks;
* random edges (Eq. 8): block k also attends to K_r blocks drawn at random from the others;
* global edges (Eq. 9): the class token attends to every token, and every token to the class token.

Each regional token then has (K_l + K_r) G + 1 keys instead of 1 + N, so time and memory grow
linearly with N (Eq. 17). Only `attention_mask` (the edge set drawn densely, for teaching and
tests) and `dense_attention` (the dense baseline, given a bias) build a (1 + N) x (1 + N) tensor.

Usage::

    layout = block_layout(num_blocks=14, local_blocks=1, random_blocks=3)   # (14, 4)
    out, cls_attn = sparse_attention(q, k, v, block_size=56, layout=layout)  # q: (B, H, 1 + N, D)
    attn = SparseSelfAttention(dim=768, num_heads=12, block_size=56)          # K_l = 1, K_r = 3
    out, cls_attn = attn(x)                                                   # x: (B, 1 + N, 768)

`plain_sparse_attention` is the whole computation in einsum and softmax; the rest of the file
computes the same faster (tested equal), and `sparse_attention_cpu.py` faster still for training on
a CPU. Imports: torch and einops only, so the file can be copied alone (with the CPU file beside
it where CPUs train); it needs no process-wide setting. ``python sparse_attention.py`` prints a
small edge set.
"""
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def block_layout(num_blocks, local_blocks, random_blocks, generator=None, *, device=None):
    """The key blocks of every query block: K_l local ones (Eq. 7), then K_r random ones (Eq. 8).

    Returns a LongTensor (num_blocks, local_blocks + random_blocks); row k lists the key blocks of
    query block k. The local window {k - D, ..., k + D}, D = (K_l - 1) // 2, shifts inward at the
    ends of the sequence so every row has K_l local blocks. The K_r random blocks are distinct,
    drawn from the blocks outside the window by one sort of uniform scores (local blocks pushed to
    the front); `generator` (on `device`) makes a draw reproducible. With fewer blocks than
    K_l + K_r every row lists every block once (shape (num_blocks, num_blocks)), local ones first.
    """
    assert local_blocks >= 1, "each block must attend at least to itself (K_l >= 1)"
    width = min(local_blocks + random_blocks, num_blocks)
    rows = torch.arange(num_blocks, device=device)
    # Eq. 7: window start, shifted inward so it stays inside [0, num_blocks)
    start = (rows - (local_blocks - 1) // 2).clamp(0, max(num_blocks - local_blocks, 0))
    offset = rows[None, :] - start[:, None]  # (query block, key block)
    is_local = (offset >= 0) & (offset < local_blocks)
    # Eq. 8: a random priority for every non-local block; local ones sort first, in their order
    priority = torch.rand(num_blocks, num_blocks, generator=generator, device=device)
    priority = torch.where(is_local, offset.to(priority.dtype) - local_blocks, priority)
    return priority.argsort(dim=1)[:, :width]


def attention_mask(num_tokens, block_size, layout):
    """The edge set E of `layout` as a dense (1 + N, 1 + N) boolean matrix, for teaching and tests;
    `num_tokens` is N, the number of regional tokens (position 0 is the class token)."""
    num_blocks = math.ceil(num_tokens / block_size)
    assert layout.shape[0] == num_blocks, f"layout has {layout.shape[0]} rows, N / G: {num_blocks}"
    block_of = torch.arange(num_tokens, device=layout.device) // block_size  # (N,)
    # block_edges[k, k'] is True when query block k attends key block k' (Eq. 7-8)
    block_edges = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=layout.device)
    block_edges.scatter_(1, layout, True)
    mask = torch.ones(1 + num_tokens, 1 + num_tokens, dtype=torch.bool, device=layout.device)
    mask[1:, 1:] = block_edges[block_of][:, block_of]  # the class row and column stay True (Eq. 9)
    return mask


def plain_sparse_attention(q, k, v, block_size, layout, bias=None, *, check_layout=True):
    """Block-sparse attention (Eq. 5-9), written out: the reading copy of `sparse_attention`.

    q, k, v (B, H, 1 + N, D), class token first; layout (N_b, K) from `block_layout`; `bias` as in
    `sparse_attention` (and its `check_layout`). Returns ``(out, cls_attn)``: out (B, H, 1 + N, D),
    cls_attn (B, H, N).
    """
    check_inputs(q, k, v, block_size, layout, check_layout=check_layout)
    L, D = q.shape[2:]
    N, G = L - 1, block_size
    num_blocks = math.ceil(N / G)
    scale = D ** -0.5
    positions = torch.arange(L, device=q.device)

    # Eq. 9, the class token's row: it attends to all 1 + N tokens. Its weights are Eq. 10's scores.
    cls_logits = torch.einsum("bhd,bhjd->bhj", q[:, :, 0] * scale, k)  # (B, H, 1 + N)
    if bias is not None:
        cls_logits = cls_logits + bias(positions[:1, None], positions[None, :])[:, :, 0].to(q.dtype)
    cls_probs = cls_logits.softmax(dim=-1)
    cls_out = torch.einsum("bhj,bhjd->bhd", cls_probs, v)  # (B, H, D)

    # Eq. 7-9, the regional rows: query block n attends to the class token (Eq. 9) and to the G
    # tokens of each of its K blocks layout[n] (Eq. 7-8): X = 1 + K G keys per query block.
    block_keys = 1 + layout[:, :, None] * G + torch.arange(G, device=q.device)  # (N_b, K, G)
    key_pos = F.pad(rearrange(block_keys, "n k g -> n (k g)"), (1, 0))  # (N_b, X), class first
    keys = key_pos.clamp(max=N)  # the last block's padding reads token N and is masked below
    k_rows, v_rows = k[:, :, keys], v[:, :, keys]  # (B, H, N_b, X, D)
    pad = num_blocks * G - N  # queries: zero rows that complete the last block
    q_blocks = rearrange(F.pad(q[:, :, 1:], (0, 0, 0, pad)), "b h (n g) d -> b h n g d", g=G)
    logits = torch.einsum("bhngd,bhnxd->bhngx", q_blocks * scale, k_rows)  # Eq. 6 on the edges
    if bias is not None:  # (B or 1, H, N_b, G, X): the bias of these edges only
        query_pos = F.pad(positions[1:], (0, pad), value=N).view(num_blocks, G, 1)  # pad reads N
        logits = logits + bias(query_pos, keys[:, None, :]).to(q.dtype)
    if pad:  # padding is never attended (footnote 2)
        logits = logits.masked_fill(key_pos[:, None, :] > N, float("-inf"))
    out = torch.einsum("bhngx,bhnxd->bhngd", logits.softmax(dim=-1), v_rows)  # Eq. 5
    out = rearrange(out, "b h n g d -> b h (n g) d")[:, :, :N]  # drop the padded queries
    return torch.cat([cls_out[:, :, None], out], dim=2), cls_probs[:, :, 1:]


def check_inputs(q, k, v, block_size, layout, *, check_layout=True):
    """ValueError, naming the argument, for inputs that would be computed silently wrong: q, k, v
    not all (B, H, 1 + N, D) with N >= 1, G < 1, or a layout that is not one row of distinct block
    numbers in [0, N_b) per query block (a block past the last re-reads the last token; a repeated
    one counts its keys twice). `check_layout=False` skips reading the layout's values (a few
    microseconds on the CPU, a wait for the device on a GPU) for layouts from `block_layout`."""
    shapes = [tuple(t.shape) for t in (q, k, v)]
    if q.ndim != 4 or len(set(shapes)) > 1:
        raise ValueError(f"q, k and v have shapes {', '.join(map(str, shapes))}: they must be the "
                         f"same (B, H, 1 + N, D)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size {block_size!r}: must be a whole number of tokens, 1 or more")
    N, G = q.shape[2] - 1, block_size
    if N < 1:
        raise ValueError(f"q has shape {shapes[0]}: sparse attention needs the class token and at "
                         f"least one regional token on axis 2")
    num_blocks = math.ceil(N / G)
    if layout.ndim != 2 or layout.shape[0] != num_blocks or not 1 <= layout.shape[1] <= num_blocks:
        hint = ("; q looks like (B, 1 + N, H, D): put the heads before the tokens (q.transpose(1, "
                "2))" if layout.ndim == 2 and layout.shape[0] == math.ceil((q.shape[1] - 1) / G)
                else "")
        raise ValueError(f"layout has shape {tuple(layout.shape)}, q {shapes[0]}: a layout has one "
                         f"row per query block, ceil(N / G) = ceil({N} / {G}) = {num_blocks}, of "
                         f"1 to {num_blocks} key blocks{hint}")
    if not check_layout:
        return
    low, high = layout.aminmax()
    if low < 0 or high >= num_blocks:
        raise ValueError(f"layout holds block {int(low if low < 0 else high)}: key blocks are "
                         f"numbered 0 to {num_blocks - 1} (N = {N} tokens in blocks of G = {G})")
    repeats = (layout.sort(dim=1).values.diff(dim=1) == 0).any(dim=1)
    if repeats.any():
        row = int(repeats.nonzero()[0, 0])
        raise ValueError(f"layout row {row} {layout[row].tolist()} lists a block twice: each key "
                         f"block appears once a row")


def sparse_attention(q, k, v, block_size, layout, bias=None, *, impl="auto", check_layout=True):
    """Block-sparse attention over a class token and N regional tokens (Eq. 5-9).

    q, k, v: (B, H, 1 + N, D), class token at position 0. `layout` (N_b, K) from `block_layout`.
    `bias`: None, or a relative position bias given as a function ``bias(query_pos, key_pos)`` that
    maps two broadcastable LongTensors of token positions (0 = class token, 1..N regional) to a
    float tensor (B or 1, H, *broadcast shape) added to the attention logits (Eq. 24). Asking for
    the bias of the edges only keeps it in the sparse shape: no N x N table exists. Returns
    ``(out, cls_attn)``: out (B, H, 1 + N, D); cls_attn (B, H, N), the class token's attention
    weights over the regional tokens (Eq. 10), which node pruning ranks.

    `impl` spells one computation three ways, each tested equal to dense attention under
    `attention_mask`: "einsum" (`plain_sparse_attention`), "sdpa" (the blocks folded into the batch
    of one 4-D `scaled_dot_product_attention` call, the shape fused CUDA kernels take) and "bmm"
    (`sparse_attention_cpu.py`, a hand-written backward); "auto": "bmm" to train on CPU, else
    "sdpa".
    Inputs it would get wrong are refused, the same way by every implementation (`check_inputs`;
    `check_layout=False` trusts the layout's values, as for one drawn by `block_layout`).
    """
    if impl == "auto":
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        impl = "bmm" if training and q.device.type != "cuda" and _cpu_path() else "sdpa"
    assert impl in ("einsum", "sdpa", "bmm"), f"unknown impl {impl!r}"
    check_inputs(q, k, v, block_size, layout, check_layout=check_layout)
    layout = layout.to(q.device)
    if impl == "einsum":
        return plain_sparse_attention(q, k, v, block_size, layout, bias, check_layout=False)
    biases = _edge_biases(q, block_size, layout, bias)
    if impl == "sdpa":
        return _sdpa_sparse_attention(q, k, v, block_size, layout, *biases)
    cpu = _cpu_path()
    assert cpu is not None, "impl='bmm' needs sparse_attention_cpu.py beside this file"
    return cpu.block_sparse_attention(q, k, v, block_size, layout, *biases)


def _cpu_path():
    """sparse_attention_cpu, the CPU training path ("bmm"), where it was copied along; None
    where this file was copied alone ("auto" then takes "sdpa")."""
    try:
        import sparse_attention_cpu
    except ImportError:
        return None
    return sparse_attention_cpu


def dense_attention(q, k, v, bias=None):
    """Full attention over all 1 + N tokens with `sparse_attention`'s `bias` convention -> (out,
    cls_attn). With a bias it builds the (B or 1, H, 1 + N, 1 + N) table of every pair's bias."""
    mask = None
    if bias is not None:
        positions = torch.arange(q.shape[2], device=q.device)
        mask = bias(positions[:, None], positions[None, :]).to(q.dtype)  # (B or 1, H, 1 + N, 1 + N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # the class token's row (Eq. 10), recomputed apart: the fused kernel does not return weights
    cls_logits = torch.einsum("bhd,bhjd->bhj", q[:, :, 0] * q.shape[-1] ** -0.5, k)
    if mask is not None:
        cls_logits = cls_logits + mask[:, :, 0]
    return out, cls_logits.softmax(dim=-1)[:, :, 1:]


def edge_count(num_tokens, block_size, layout_width):
    """Eq. 17: edges one sparse layer computes for `num_tokens` tokens (class token included)."""
    return num_tokens * layout_width * block_size


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention with edge sparsity (Eq. 3-9); dense when ``block_size=None``.

    forward(x, bias=None, generator=None) -> (out, cls_attn): x and out (B, 1 + N, C); cls_attn
    (B, H, N), the class token's attention weights for node pruning (Eq. 10). A fresh random layout
    is drawn at every call (once per forward and layer, shared by batch and heads); a seeded
    `generator` makes it reproducible. `edges(num_tokens)`: the pairs per head a call computes.
    """

    def __init__(self, *, dim, num_heads, block_size=None, local_blocks=1, random_blocks=3,
                 qkv_bias=True, impl="auto"):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.num_heads, self.block_size, self.impl = num_heads, block_size, impl
        self.local_blocks, self.random_blocks = local_blocks, random_blocks
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None, generator=None):
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3,
                            h=self.num_heads)
        if self.block_size is None:
            out, cls_attn = dense_attention(q, k, v, bias)
        else:
            num_blocks = math.ceil((x.shape[1] - 1) / self.block_size)
            layout = block_layout(num_blocks, self.local_blocks, self.random_blocks, generator,
                                  device=x.device if generator is None else generator.device)
            out, cls_attn = sparse_attention(q, k, v, self.block_size, layout, bias, impl=self.impl,
                                             check_layout=False)  # block_layout's: valid
        return self.proj(rearrange(out, "b h l d -> b l (h d)")), cls_attn

    def edges(self, num_tokens):
        """Query-key pairs per head for `num_tokens` = 1 + N tokens: Eq. 17, or (1 + N)^2 dense."""
        if self.block_size is None:
            return num_tokens * num_tokens
        num_blocks = math.ceil((num_tokens - 1) / self.block_size)
        width = min(self.local_blocks + self.random_blocks, num_blocks)
        return edge_count(num_tokens, self.block_size, width)


# --------------------------------------------------------------------------------------------
# The same equations, fast: the biases of the edges, the fused-kernel shape (sdpa)
# --------------------------------------------------------------------------------------------

def _edge_biases(q, block_size, layout, bias):
    """The logit biases of the edges, each None or a tensor: the class row (B or 1, H, 1 + N), the
    class token's column (B or 1, H, N_b, G, 1) and the block edges (B or 1, H, N_b, G, K G), with
    -inf on the keys that pad the last block ((N_b, 1, K G) when there is no `bias`)."""
    N, G, num_blocks = q.shape[2] - 1, block_size, layout.shape[0]
    key_pos = _edges(G, layout)  # (N_b, K G)
    row_bias = column_bias = block_bias = None
    if bias is not None:
        positions = torch.arange(1 + N, device=q.device)
        row_bias = bias(positions[:1, None], positions[None, :])[:, :, 0].to(q.dtype)
        query_pos = 1 + torch.arange(num_blocks * G, device=q.device).view(num_blocks, G, 1)
        query_pos = query_pos.clamp(max=N)  # padded queries are dropped at the end
        column_bias = bias(query_pos, torch.zeros_like(query_pos)).to(q.dtype)
        block_bias = bias(query_pos, key_pos.clamp(max=N)[:, None, :]).to(q.dtype)
    if num_blocks * G != N:  # padding is never attended (footnote 2)
        pad_bias = torch.zeros(key_pos.shape, dtype=q.dtype, device=q.device)
        pad_bias = pad_bias.masked_fill(key_pos > N, float("-inf"))[:, None, :]  # (N_b, 1, K G)
        block_bias = pad_bias if block_bias is None else block_bias + pad_bias
    return row_bias, column_bias, block_bias


def _sdpa_sparse_attention(q, k, v, block_size, layout, row_bias, column_bias, block_bias):
    """`plain_sparse_attention` with the regional rows as one 4-D scaled_dot_product_attention
    call: heads and query blocks folded into its batch axis (impl="sdpa")."""
    B, H, L, D = q.shape
    N, G, num_blocks = L - 1, block_size, layout.shape[0]
    # Eq. 9, the class token's row
    cls_logits = torch.einsum("bhd,bhjd->bhj", q[:, :, 0] * D ** -0.5, k)  # (B, H, 1 + N)
    if row_bias is not None:
        cls_logits = cls_logits + row_bias
    cls_probs = cls_logits.softmax(dim=-1)
    cls_out = torch.einsum("bhj,bhjd->bhd", cls_probs, v)  # (B, H, D)
    # Eq. 5-9, the regional rows against the class token and their K blocks: X = 1 + K G keys
    key_tokens = F.pad(_edges(G, layout).clamp(max=N), (1, 0))  # (N_b, X)
    X = key_tokens.shape[1]
    k_rows = k.index_select(2, key_tokens.flatten()).view(B, H, num_blocks, X, D)
    v_rows = v.index_select(2, key_tokens.flatten()).view(B, H, num_blocks, X, D)
    mask = None
    if column_bias is not None:
        mask = torch.cat([column_bias, block_bias], dim=-1)  # (B or 1, H, N_b, G, X)
    elif block_bias is not None:  # padding only: (N_b, 1, K G) -> (1, H, N_b, 1, X)
        mask = F.pad(block_bias, (1, 0)).expand(1, H, num_blocks, 1, X)
    fold = "b h n x d -> b (h n) x d"
    if mask is not None:
        mask = rearrange(mask, "b h n g x -> b (h n) g x")
    q_blocks = _blocks(q[:, :, 1:], G)  # (B, H, N_b, G, D)
    out = F.scaled_dot_product_attention(rearrange(q_blocks, fold), rearrange(k_rows, fold),
                                         rearrange(v_rows, fold), attn_mask=mask)
    out = rearrange(out, "b (h n) g d -> b h (n g) d", h=H)[:, :, :N]  # drop padded queries
    return torch.cat([cls_out[:, :, None], out], dim=2), cls_probs[:, :, 1:]


def _edges(block_size, layout):
    """Token positions of the block keys of every query block: (N_b, K G), the G tokens of each
    block of layout[n]. Positions past N are the padding of the last block."""
    G = block_size
    blocks = 1 + layout[:, :, None] * G + torch.arange(G, device=layout.device)  # (N_b, K, G)
    return rearrange(blocks, "n k g -> n (k g)")


def _blocks(x, block_size):
    """(B, H, N, D) regional tokens -> (B, H, N_b, G, D), zero-padding the last block."""
    pad = -x.shape[2] % block_size
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return rearrange(x, "b h (n g) d -> b h n g d", g=block_size)


def draw_edges(num_tokens, block_size, layout):
    """The edge set as text: one line per query token, '#' for an edge, '.' for none."""
    mask = attention_mask(num_tokens, block_size, layout)
    names = ["cls"] + [f"{i:3d}" for i in range(1, num_tokens + 1)]
    lines = ["      " + "".join("c" if j == 0 else str(j % 10) for j in range(1 + num_tokens))]
    for name, row in zip(names, mask.tolist()):
        lines.append(f"{name:>4}  " + "".join("#" if e else "." for e in row))
    return "\n".join(lines)


if __name__ == "__main__":
    N, G, K_l, K_r = 30, 4, 1, 2
    layout = block_layout(math.ceil(N / G), K_l, K_r, torch.Generator().manual_seed(0))
    print(f"N={N} regional tokens, G={G}, K_l={K_l}, K_r={K_r}: {layout.shape[0]} blocks")
    print("key blocks of each query block (local first, then random):")
    for n, row in enumerate(layout.tolist()):
        print(f"  block {n}: {row}")
    print(draw_edges(N, G, layout))
    mask = attention_mask(N, G, layout)
    sparsity = 1 - mask.float().mean()
    print(f"edges: {int(mask.sum())} of {(N + 1) ** 2} (dense); sparsity {sparsity:.2f}")
