"""Edge sparsity: block-sparse local + random + global attention (SViTT Sec. 3.2, Eq. 5-9, 17).

A video of T frames is a sequence of 1 + N tokens: a class token at position 0 and N regional
(patch) tokens flattened time-major. Attention is a graph over these tokens (Eq. 5-6): query i
mixes the values of the keys j with (i, j) in the edge set E. Dense attention uses every pair; SViTT
keeps only

* local edges (Eq. 7): regional tokens are cut into N_b = ceil(N / G) blocks of G tokens, and block
  k attends to its K_l neighbouring blocks;
* random edges (Eq. 8): block k also attends to K_r blocks drawn at random from the others;
* global edges (Eq. 9): the class token attends to every token, and every token to the class token.

Each regional token then has (K_l + K_r) G + 1 keys instead of 1 + N, so time and memory grow
linearly with N (Eq. 17). This file never builds a (1 + N) x (1 + N) tensor outside the teaching
helper `attention_mask`.

Usage::

    layout = block_layout(num_blocks=14, local_blocks=1, random_blocks=3)   # (14, 4)
    out, cls_attn = sparse_attention(q, k, v, block_size=56, layout=layout)  # q: (B, H, 1 + N, D)
    attn = SparseSelfAttention(dim=768, num_heads=12, block_size=56, local_blocks=1, random_blocks=3)

The file imports only torch and einops, so it can be copied into another project alone.
Run ``python sparse_attention.py`` to print the edge set of a small layout.
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
    ends of the sequence so every row has K_l local blocks. The K_r random blocks are distinct and
    drawn from the blocks outside the window. With fewer blocks than K_l + K_r every row lists every
    block once (shape (num_blocks, num_blocks)), local ones first.

    Sampling is vectorised: one uniform score per (query block, key block), local blocks pushed to
    the front, and a sort picks the rest. `generator` (on `device`) makes a draw reproducible.
    """
    assert local_blocks >= 1, "each block must attend at least to itself (K_l >= 1)"
    width = min(local_blocks + random_blocks, num_blocks)
    rows = torch.arange(num_blocks, device=device)
    # Eq. 7: window start, shifted inward so it stays inside [0, num_blocks)
    start = (rows - (local_blocks - 1) // 2).clamp(0, max(num_blocks - local_blocks, 0))
    offset = rows[None, :] - start[:, None]  # (query block, key block)
    is_local = (offset >= 0) & (offset < local_blocks)
    # Eq. 8: random priority for every non-local block; local blocks get -1 so they sort first
    # (in their natural order, thanks to the tie-breaking offset).
    priority = torch.rand(num_blocks, num_blocks, generator=generator, device=device)
    priority = torch.where(is_local, offset.to(priority.dtype) - local_blocks, priority)
    return priority.argsort(dim=1)[:, :width]


def attention_mask(num_tokens, block_size, layout):
    """The edge set E of `layout` as a dense (1 + N, 1 + N) boolean matrix (for teaching and tests).

    `num_tokens` is N, the number of regional tokens; position 0 is the class token.
    """
    num_blocks = math.ceil(num_tokens / block_size)
    assert layout.shape[0] == num_blocks, f"layout has {layout.shape[0]} rows, N / G needs {num_blocks}"
    block_of = torch.arange(num_tokens, device=layout.device) // block_size  # (N,)
    # block_edges[k, k'] is True when query block k attends key block k' (Eq. 7-8)
    block_edges = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=layout.device)
    block_edges.scatter_(1, layout, True)
    mask = torch.ones(1 + num_tokens, 1 + num_tokens, dtype=torch.bool, device=layout.device)  # Eq. 9
    mask[1:, 1:] = block_edges[block_of][:, block_of]
    return mask


def _blocks(x, block_size):
    """(B, H, N, D) regional tokens -> (B, H, N_b, G, D), zero-padding the last block."""
    pad = -x.shape[2] % block_size
    return rearrange(F.pad(x, (0, 0, 0, pad)), "b h (n g) d -> b h n g d", g=block_size)


def sparse_attention(q, k, v, block_size, layout, bias=None, *, fused=True):
    """Block-sparse attention over a class token and N regional tokens (Eq. 5-9).

    q, k, v: (B, H, 1 + N, D), class token at position 0. `layout` (N_b, K) from `block_layout`.
    `bias`: None, or a relative position bias given as a function ``bias(query_pos, key_pos)`` that
    maps two broadcastable LongTensors of token positions (0 = class token, 1..N regional) to a
    float tensor (B or 1, H, *broadcast shape) added to the attention logits (Eq. 24). Asking for
    the bias of the edges only keeps it in the sparse shape: no N x N table exists.

    Returns ``(out, cls_attn)``: out (B, H, 1 + N, D); cls_attn (B, H, N), the class token's
    attention weights over the regional tokens (Eq. 10), which node pruning ranks.

    ``fused=True`` folds the blocks into the batch and makes one 4-D
    ``scaled_dot_product_attention`` call (the shape fused kernels take); ``fused=False`` is the
    same computation spelled out with einsum and softmax, for readers. Both give the same result.
    """
    B, H, L, D = q.shape
    N, G = L - 1, block_size
    num_blocks = math.ceil(N / G)
    assert layout.shape[0] == num_blocks, f"layout has {layout.shape[0]} rows, ceil(N / G) = {num_blocks}"
    layout = layout.to(q.device)
    scale = D ** -0.5

    # --- Eq. 9, the class token's row: it attends to all 1 + N tokens. O(N) and computed apart,
    # which also yields the scores of Eq. 10.
    cls_logits = torch.einsum("bhd,bhjd->bhj", q[:, :, 0] * scale, k)  # (B, H, 1 + N)
    if bias is not None:
        positions = torch.arange(L, device=q.device)
        cls_logits = cls_logits + bias(positions[:1, None], positions[None, :])[:, :, 0].to(q.dtype)
    cls_probs = cls_logits.softmax(dim=-1)
    cls_out = torch.einsum("bhj,bhjd->bhd", cls_probs, v)  # (B, H, D)

    # --- Eq. 7-8, the regional rows: query block n attends to the K blocks layout[n] and to the
    # class token, i.e. 1 + K G keys. key_pos lists them as token positions (0 = class token);
    # positions past N are the padding of the last block.
    key_pos = torch.cat([
        torch.zeros(num_blocks, 1, dtype=torch.long, device=q.device),
        rearrange(1 + layout[:, :, None] * G + torch.arange(G, device=q.device), "n k g -> n (k g)"),
    ], dim=1)  # (N_b, 1 + K G)
    X = key_pos.shape[1]
    key_tokens = key_pos.clamp(max=N)  # padding reads token N; its logits are masked below
    # one gather per tensor: (B, H, N_b (1 + K G), D), viewed as (B, H, N_b, 1 + K G, D)
    k_rows = k.index_select(2, key_tokens.flatten()).view(B, H, num_blocks, X, D)
    v_rows = v.index_select(2, key_tokens.flatten()).view(B, H, num_blocks, X, D)
    q_blocks = _blocks(q[:, :, 1:], G)  # (B, H, N_b, G, D)

    logit_bias = None
    if bias is not None:
        query_pos = 1 + torch.arange(num_blocks * G, device=q.device).view(num_blocks, G)  # (N_b, G)
        logit_bias = bias(query_pos[:, :, None].clamp(max=N), key_tokens[:, None, :])
        logit_bias = logit_bias.to(q.dtype)  # (B or 1, H, N_b, G, 1 + K G)
    if num_blocks * G != N:  # padding is never attended (footnote 2)
        pad_bias = torch.zeros(key_pos.shape, dtype=q.dtype, device=q.device)
        pad_bias = pad_bias.masked_fill(key_pos > N, float("-inf"))[:, None, :]  # (N_b, 1, 1 + K G)
        logit_bias = pad_bias if logit_bias is None else logit_bias + pad_bias

    if fused:
        # fold heads and blocks into one batch axis: 4-D inputs, one kernel call
        fold = "b h n x d -> b (h n) x d"
        mask = None
        if logit_bias is not None:
            if logit_bias.dim() == 3:  # padding only: (N_b, 1, 1 + K G) -> (1, H, N_b, 1, 1 + K G)
                logit_bias = logit_bias.expand(1, H, *logit_bias.shape)
            mask = rearrange(logit_bias, "b h n g x -> b (h n) g x")
        out = F.scaled_dot_product_attention(
            rearrange(q_blocks, fold), rearrange(k_rows, fold), rearrange(v_rows, fold), attn_mask=mask)
        out = rearrange(out, "b (h n) g d -> b h (n g) d", h=H)
    else:
        logits = torch.einsum("bhngd,bhnxd->bhngx", q_blocks * scale, k_rows)  # Eq. 6 on the edges
        if logit_bias is not None:
            logits = logits + logit_bias
        out = torch.einsum("bhngx,bhnxd->bhngd", logits.softmax(dim=-1), v_rows)  # Eq. 5
        out = rearrange(out, "b h n g d -> b h (n g) d")

    out = torch.cat([cls_out[:, :, None], out[:, :, :N]], dim=2)  # drop padded queries
    return out, cls_probs[:, :, 1:]


def dense_attention(q, k, v, bias=None):
    """Full attention over all 1 + N tokens with the same `bias` convention; returns (out, cls_attn)."""
    L = q.shape[2]
    mask = None
    if bias is not None:
        positions = torch.arange(L, device=q.device)
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

    forward(x, bias=None, generator=None) -> (out, cls_attn, edges): x (B, 1 + N, C); cls_attn
    (B, H, N) for node pruning; `edges` the number of query-key pairs per head that the layer
    computed (Eq. 17 when sparse, (1 + N)^2 when dense). A fresh random layout is drawn at every
    call (once per forward and layer, shared by batch and heads); pass a seeded `generator` to make
    it reproducible.
    """

    def __init__(self, *, dim, num_heads, block_size=None, local_blocks=1, random_blocks=3,
                 qkv_bias=True, fused=True):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.block_size = block_size
        self.local_blocks = local_blocks
        self.random_blocks = random_blocks
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None, generator=None):
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        L = x.shape[1]
        if self.block_size is None:
            out, cls_attn = dense_attention(q, k, v, bias)
            edges = L * L
        else:
            num_blocks = math.ceil((L - 1) / self.block_size)
            layout = block_layout(num_blocks, self.local_blocks, self.random_blocks, generator,
                                  device=x.device if generator is None else generator.device)
            out, cls_attn = sparse_attention(q, k, v, self.block_size, layout, bias, fused=self.fused)
            edges = edge_count(L, self.block_size, layout.shape[1])
        return self.proj(rearrange(out, "b h l d -> b l (h d)")), cls_attn, edges


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
    print(f"edges: {int(mask.sum())} of {(N + 1) ** 2} (dense); sparsity {1 - mask.float().mean():.2f}")
