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
from torch.autograd.function import once_differentiable


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
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return rearrange(x, "b h (n g) d -> b h n g d", g=block_size)


def _padded(x, length):
    """(M, L, D) -> (M, length, D), zero rows appended (x itself when L == length)."""
    return x if x.shape[1] == length else F.pad(x, (0, 0, 0, length - x.shape[1]))


def _edges(num_tokens, block_size, layout):
    """Token positions of the block keys of every query block: (N_b, K G), the G tokens of each
    block of layout[n]. Positions past N are the padding of the last block."""
    G = block_size
    blocks = 1 + layout[:, :, None] * G + torch.arange(G, device=layout.device)  # (N_b, K, G)
    return rearrange(blocks, "n k g -> n (k g)")


def sparse_attention(q, k, v, block_size, layout, bias=None, *, impl="auto"):
    """Block-sparse attention over a class token and N regional tokens (Eq. 5-9).

    q, k, v: (B, H, 1 + N, D), class token at position 0. `layout` (N_b, K) from `block_layout`.
    `bias`: None, or a relative position bias given as a function ``bias(query_pos, key_pos)`` that
    maps two broadcastable LongTensors of token positions (0 = class token, 1..N regional) to a
    float tensor (B or 1, H, *broadcast shape) added to the attention logits (Eq. 24). Asking for
    the bias of the edges only keeps it in the sparse shape: no N x N table exists.

    Returns ``(out, cls_attn)``: out (B, H, 1 + N, D); cls_attn (B, H, N), the class token's
    attention weights over the regional tokens (Eq. 10), which node pruning ranks.

    `impl` picks one of three spellings of the same computation (the tests hold each to dense
    attention under `attention_mask`):

    * ``"einsum"``: the equations written out with einsum and softmax; autograd does the rest.
      Read this one.
    * ``"sdpa"``: the blocks folded into the batch, one 4-D ``scaled_dot_product_attention`` call:
      the shape the fused CUDA kernels (FlashAttention) take.
    * ``"bmm"``: `_BlockSparseAttention`, batched matrix products with a hand-written backward:
      the fast one on the CPU.
    * ``"auto"`` (default): ``"sdpa"`` on CUDA and for inference, ``"bmm"`` for training on the
      CPU (the CPU's fused kernel is the faster forward, the hand-written backward the faster
      training step).
    """
    B, H, L, D = q.shape
    N, G = L - 1, block_size
    num_blocks = math.ceil(N / G)
    assert layout.shape[0] == num_blocks, f"layout has {layout.shape[0]} rows, ceil(N / G) = {num_blocks}"
    if impl == "auto":
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        impl = "bmm" if training and q.device.type != "cuda" else "sdpa"
    assert impl in ("einsum", "sdpa", "bmm"), f"unknown impl {impl!r}"
    layout = layout.to(q.device)
    key_pos = _edges(N, G, layout)  # (N_b, K G)
    key_tokens = key_pos.clamp(max=N)  # padding reads token N; its logits are masked below

    # Additive logit biases, each None or a tensor: the class row (B or 1, H, 1 + N), the class
    # token's column (B or 1, H, N_b, G, 1) and the block edges (B or 1, H, N_b, G, K G).
    row_bias = column_bias = block_bias = None
    if bias is not None:
        positions = torch.arange(L, device=q.device)
        row_bias = bias(positions[:1, None], positions[None, :])[:, :, 0].to(q.dtype)
        query_pos = 1 + torch.arange(num_blocks * G, device=q.device).view(num_blocks, G, 1)
        query_pos = query_pos.clamp(max=N)  # padded queries are dropped at the end
        column_bias = bias(query_pos, torch.zeros_like(query_pos)).to(q.dtype)
        block_bias = bias(query_pos, key_tokens[:, None, :]).to(q.dtype)
    if num_blocks * G != N:  # padding is never attended (footnote 2)
        pad_bias = torch.zeros(key_pos.shape, dtype=q.dtype, device=q.device)
        pad_bias = pad_bias.masked_fill(key_pos > N, float("-inf"))[:, None, :]  # (N_b, 1, K G)
        block_bias = pad_bias if block_bias is None else block_bias + pad_bias

    if impl == "bmm":
        return _BlockSparseAttention.apply(q, k, v, layout, G, row_bias, column_bias, block_bias)

    scale = D ** -0.5
    # --- Eq. 9, the class token's row: it attends to all 1 + N tokens. O(N) and computed apart,
    # which also yields the scores of Eq. 10.
    cls_logits = torch.einsum("bhd,bhjd->bhj", q[:, :, 0] * scale, k)  # (B, H, 1 + N)
    if row_bias is not None:
        cls_logits = cls_logits + row_bias
    cls_probs = cls_logits.softmax(dim=-1)
    cls_out = torch.einsum("bhj,bhjd->bhd", cls_probs, v)  # (B, H, D)

    # --- Eq. 7-9, the regional rows: query block n attends to the class token (Eq. 9) and to the K
    # blocks layout[n] (Eq. 7-8), X = 1 + K G keys. One gather per tensor: (B, H, N_b, X, D)
    key_tokens = F.pad(key_tokens, (1, 0))  # the class token (position 0) first
    X = key_tokens.shape[1]
    k_rows = k.index_select(2, key_tokens.flatten()).view(B, H, num_blocks, X, D)
    v_rows = v.index_select(2, key_tokens.flatten()).view(B, H, num_blocks, X, D)
    q_blocks = _blocks(q[:, :, 1:], G)  # (B, H, N_b, G, D)
    logit_bias = None
    if column_bias is not None:
        logit_bias = torch.cat([column_bias, block_bias], dim=-1)
    elif block_bias is not None:  # padding only: (N_b, 1, K G) -> (N_b, 1, X)
        logit_bias = F.pad(block_bias, (1, 0))

    if impl == "sdpa":
        # fold heads and blocks into one batch axis: 4-D inputs, one kernel call
        fold = "b h n x d -> b (h n) x d"
        mask = None
        if logit_bias is not None:
            if logit_bias.dim() == 3:  # padding only: (N_b, 1, X) -> (1, H, N_b, 1, X)
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


def _gather_blocks(x, layout, block_size):
    """x (B, H, 1 + N, D), layout (N_b, K) -> (B H N_b, K G, D): the K key blocks of every query block.

    The regional tokens are copied once into whole blocks, (B H N_b, G D), and one index_select
    picks the blocks (rows of G D numbers: the fastest gather on the CPU).
    """
    B, H, L, D = x.shape
    num_blocks, K = layout.shape
    blocks = _blocks(x[:, :, 1:], block_size).reshape(B * H * num_blocks, block_size * D)
    index = torch.arange(B * H, device=x.device)[:, None] * num_blocks + layout.flatten()  # (B H, N_b K)
    return blocks.index_select(0, index.flatten()).view(B * H * num_blocks, K * block_size, D)


class _BlockSparseAttention(torch.autograd.Function):
    """`sparse_attention` as batched matrix products with a hand-written backward (impl="bmm").

    The einsum path's equations, arranged for speed on the CPU:

    * heads and query blocks share one batch axis, so each product is one ``bmm`` over (B H N_b)
      small matrices: G x D queries against the K G keys of the query block's K blocks;
    * the global edges (Eq. 9), the class token's row and its column, are computed apart: the
      column joins the blocks' softmax as one more logit per query. With the paper's (K, G) =
      (4, 56) the products then run on 224 keys rather than 225, which the CPU's matrix kernels
      take ~25% faster;
    * the softmax backward uses delta = rowsum(dO * O), as FlashAttention does, not a pass over P;
    * gradients of the gathered keys and values are added back block by block (index_add over
      whole G x D blocks), into buffers that the class row's outer products start: no zero fill,
      no autograd accumulation afterwards.

    Saved for backward: the scaled query blocks, k, v, the probabilities P of the block edges
    (B H N_b, G, K G), the class column's and the class row's probabilities, and the output, laid
    out as the output projection keeps it: O(N (K G + D)) per head. The gathered keys and values
    are gathered again in backward rather than kept: they are K times the size of k.
    """

    @staticmethod
    def forward(ctx, q, k, v, layout, block_size, row_bias, column_bias, block_bias):
        B, H, L, D = q.shape
        N, G = L - 1, block_size
        BH, num_blocks = B * H, layout.shape[0]
        scale = D ** -0.5
        k, v = k.contiguous(), v.contiguous()
        k_cls, v_cls = k[:, :, :1].reshape(BH, 1, D), v[:, :, :1].reshape(BH, 1, D)

        # Eq. 9, the class row: (B H, 1, D) x (B H, D, 1 + N)
        q_cls = (q[:, :, :1] * scale).reshape(BH, 1, D)
        row_logits = torch.bmm(q_cls, k.view(BH, L, D).transpose(1, 2))  # (B H, 1, 1 + N)
        if row_bias is not None:
            row_logits = row_logits + row_bias.expand(B, H, L).reshape(BH, 1, L)
        row_probs = row_logits.softmax(dim=-1).to(q.dtype)  # autocast may return float32
        cls_out = torch.bmm(row_probs, v.view(BH, L, D))  # (B H, 1, D)

        # Eq. 5-8, the regional rows: one (G, D) x (D, K G) product per (batch, head, query block)
        q_blocks = (_blocks(q[:, :, 1:], G) * scale).reshape(BH * num_blocks, G, D)
        k_rows = _gather_blocks(k, layout, G)  # (B H N_b, K G, D)
        probs = torch.bmm(q_blocks, k_rows.transpose(1, 2))  # logits for now: (B H N_b, G, K G)
        del k_rows  # each gathered tensor lives only as long as its product needs it
        # Eq. 9, the class token as a key of every regional query: one more logit per query
        col_logits = torch.bmm(q_blocks.view(BH, -1, D), k_cls.transpose(1, 2))  # (B H, N_b G, 1)
        col_logits = col_logits.view(BH * num_blocks, G, 1)
        if block_bias is not None:
            probs.view(B, H, num_blocks, G, -1).add_(block_bias)
        if column_bias is not None:
            col_logits = col_logits + column_bias.expand(B, H, num_blocks, G, 1).reshape(col_logits.shape)
        # softmax over the 1 + K G logits of each query, in place
        top = torch.maximum(probs.amax(dim=-1, keepdim=True), col_logits)
        probs.sub_(top).exp_()
        col_probs = (col_logits - top).exp_()
        total = probs.sum(dim=-1, keepdim=True).add_(col_probs)
        probs.div_(total)
        col_probs.div_(total)
        block_out = torch.bmm(probs, _gather_blocks(v, layout, G))  # (B H N_b, G, D)
        block_out.view(BH, -1, D).baddbmm_(col_probs.view(BH, -1, 1), v_cls)  # + the class token's value

        # the output is laid out (B, 1 + N, H, D), the layout the output projection reads, so the
        # tensor saved here is the one that projection keeps
        out = torch.empty(B, L, H, D, dtype=q.dtype, device=q.device)
        out[:, 0] = cls_out.view(B, H, D)
        out[:, 1:] = block_out.view(B, H, -1, D)[:, :, :N].transpose(1, 2)
        out = out.transpose(1, 2)  # (B, H, 1 + N, D)
        ctx.save_for_backward(q_cls, q_blocks, k, v, layout, row_probs, probs, col_probs, out)
        ctx.block_size = G
        ctx.bias_shapes = [None if b is None else b.shape for b in (row_bias, column_bias, block_bias)]
        return out, row_probs.view(B, H, L)[:, :, 1:].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_cls_attn):
        q_cls, q_blocks, k, v, layout, row_probs, probs, col_probs, out = ctx.saved_tensors
        B, H, L, D = k.shape
        N, G = L - 1, ctx.block_size
        BH, num_blocks = B * H, layout.shape[0]
        scale = D ** -0.5
        k_cls, v_cls = k[:, :, :1].reshape(BH, 1, D), v[:, :, :1].reshape(BH, 1, D)

        # --- class row (Eq. 9)
        d_cls_out = grad_out[:, :, :1].reshape(BH, 1, D)
        d_row_probs = torch.bmm(d_cls_out, v.view(BH, L, D).transpose(1, 2))  # (B H, 1, 1 + N)
        if grad_cls_attn is not None:
            d_row_probs.view(B, H, L)[:, :, 1:] += grad_cls_attn
        d_row_logits = row_probs * (d_row_probs - (row_probs * d_row_probs).sum(-1, keepdim=True))
        # gradients of k and v: the class row's outer products start the buffers, padded to whole
        # blocks so that the K G rows of each query block are added back block by block
        rows = 1 + num_blocks * G
        d_k = _padded(d_row_logits.transpose(1, 2) * q_cls, rows)  # (B H, 1 + N_b G, D)
        d_v = _padded(row_probs.transpose(1, 2) * d_cls_out, rows)
        index = layout.flatten()

        def add_blocks(grad, grad_rows):  # grad_rows (B H N_b, K G, D) into grad's blocks
            grad[:, 1:].view(BH, num_blocks, G * D).index_add_(1, index, grad_rows.view(BH, -1, G * D))

        # --- regional rows. dO: (B H N_b, G, D), zero on padded queries. Each gathered or
        # (B H N_b, K G, D)-sized tensor is freed as soon as it has been used.
        d_block = _blocks(grad_out[:, :, 1:], G).reshape(BH * num_blocks, G, D)
        d_probs = torch.bmm(d_block, _gather_blocks(v, layout, G).transpose(1, 2))  # (B H N_b, G, K G)
        d_col_probs = torch.bmm(d_block.view(BH, -1, D), v_cls.transpose(1, 2)).view(col_probs.shape)
        add_blocks(d_v, torch.bmm(probs.transpose(1, 2), d_block))  # dV = P^T dO
        # softmax backward: dS = P (dP - rowsum(P dP)), and rowsum(P dP) = rowsum(dO O)
        delta = (grad_out[:, :, 1:] * out[:, :, 1:]).sum(dim=-1, keepdim=True)  # (B, H, N, 1)
        delta = _blocks(delta, G).reshape(BH * num_blocks, G, 1)
        d_logits = d_probs.sub_(delta).mul_(probs)
        d_col_logits = d_col_probs.sub_(delta).mul_(col_probs)  # (B H N_b, G, 1)
        d_q_blocks = torch.bmm(d_logits, _gather_blocks(k, layout, G))  # (B H N_b, G, D), unscaled
        d_q_blocks.view(BH, -1, D).baddbmm_(d_col_logits.view(BH, -1, 1), k_cls)
        add_blocks(d_k, torch.bmm(d_logits.transpose(1, 2), q_blocks))  # dK = dS^T Q
        # the class token's column: its key and value meet every regional query
        d_k[:, :1].baddbmm_(d_col_logits.view(BH, 1, -1), q_blocks.view(BH, -1, D))
        d_v[:, :1].baddbmm_(col_probs.view(BH, 1, -1), d_block.view(BH, -1, D))

        d_q = torch.empty_like(k)
        d_q[:, :, 0] = torch.bmm(d_row_logits, k.view(BH, L, D)).view(B, H, D) * scale
        torch.mul(d_q_blocks.view(B, H, -1, D)[:, :, :N], scale, out=d_q[:, :, 1:])

        d_biases = [None, None, None]
        for i, (grad, shape) in enumerate(zip((d_row_logits, d_col_logits, d_logits), ctx.bias_shapes)):
            if ctx.needs_input_grad[5 + i]:
                d_biases[i] = grad.reshape(B, H, *shape[2:]).sum_to_size(shape)
        return (d_q, d_k[:, :L].view(B, H, L, D), d_v[:, :L].view(B, H, L, D), None, None, *d_biases)


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
                 qkv_bias=True, impl="auto"):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.block_size = block_size
        self.local_blocks = local_blocks
        self.random_blocks = random_blocks
        self.impl = impl
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
            out, cls_attn = sparse_attention(q, k, v, self.block_size, layout, bias, impl=self.impl)
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
