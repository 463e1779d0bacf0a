"""Block-sparse attention (SViTT Eq. 5-9) fast on the CPU: `sparse_attention`'s "bmm"
implementation, the one "auto" takes to train on a CPU. It computes `plain_sparse_attention`'s
result (tested equal) as batched matrix products with a hand-written backward, a few heads at a
time. Imports: torch and `sparse_attention.py`, which it extends; copy the two together.

    out, cls_attn = block_sparse_attention(q, k, v, block_size, layout, *biases)
    # biases: sparse_attention._edge_biases(q, block_size, layout, bias)
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparse_attention import _blocks


def block_sparse_attention(q, k, v, block_size, layout, row_bias=None, column_bias=None,
                           block_bias=None):
    """(out, cls_attn) of `sparse_attention` with the edges' biases (`_edge_biases`)."""
    chunk = _heads_per_chunk(*layout.shape, block_size, q.shape[-1], q.element_size())
    return _BlockSparseAttention.apply(q, k, v, layout, block_size, chunk, row_bias, column_bias,
                                       block_bias)


CHUNK_BYTES = 8 * 2**20
"""Largest temporary the CPU path allocates for a group of heads: glibc hands freed blocks over
32 MB back to the OS, so bigger temporaries are page-faulted in anew at every call
(benchmarks/README.md: ~285 MB a call at T = 16 with all heads at once, ~30 MB with 8 MB chunks)."""


def _heads_per_chunk(num_blocks, layout_width, block_size, head_dim, element_size):
    """Heads whose (N_b, G, K G) probabilities and (N_b, K G, D) gathered keys fit CHUNK_BYTES."""
    per_head = num_blocks * layout_width * block_size * max(block_size, head_dim) * element_size
    return max(1, CHUNK_BYTES // per_head)


def _chunks(batch, heads, heads_per_chunk):
    """(b0, b1, h0, h1): items b0..b1-1 and their heads h0..h1-1, consecutive in (B H) order; whole
    items when `heads_per_chunk` >= heads, otherwise up to `heads_per_chunk` heads of one item."""
    if heads_per_chunk >= heads:
        items = heads_per_chunk // heads
        for b0 in range(0, batch, items):
            yield b0, min(b0 + items, batch), 0, heads
    else:
        for b in range(batch):
            for h0 in range(0, heads, heads_per_chunk):
                yield b, b + 1, h0, min(h0 + heads_per_chunk, heads)


def _padded(x, length):
    """(M, L, D) -> (M, length, D), zero rows appended (x itself when L == length)."""
    return x if x.shape[1] == length else F.pad(x, (0, 0, 0, length - x.shape[1]))


def _whole_blocks(x, block_size):
    """x (B, H, 1 + N, D), contiguous -> (B H, N_b, G D): regional tokens as rows of G D numbers,
    which index_select picks fastest on the CPU; a view of x if G divides N, else a padded copy."""
    B, H, L, D = x.shape
    if (L - 1) % block_size:
        return _blocks(x[:, :, 1:], block_size).reshape(B * H, -1, block_size * D)
    return x.view(B * H, L, D)[:, 1:].view(B * H, -1, block_size * D)


class _BlockSparseAttention(torch.autograd.Function):
    """`plain_sparse_attention` as batched matrix products with a hand-written backward
    (impl="bmm"), arranged for speed on the CPU:

    * heads and query blocks share one batch axis: each product is one ``bmm`` of G x D queries
      against the K G keys of their K blocks;
    * a few heads at a time (`_chunks`): no temporary passes CHUNK_BYTES, so the allocator reuses
      freed blocks with no process-wide setting (~30 MB page-faulted a call at T = 16, not ~285 MB);
    * the global edges (Eq. 9) apart, for all heads at once: the class column joins the blocks'
      softmax as one more logit, so with the paper's (K, G) = (4, 56) the products run on 224
      keys rather than 225, which the CPU's matrix kernels take ~25% faster;
    * the softmax backward from delta = rowsum(dO * O), as FlashAttention, not a pass over P; the
      gathered keys' and values' gradients added back by index_add over whole G x D blocks.

    Saved for backward, O(N (K G + D)) a head: the scaled query blocks, k, v, the block edges'
    probabilities (one (heads N_b, G, K G) tensor per chunk), the class column's and row's, and the
    output; the gathered keys and values, K times the size of k, are gathered again, not kept.
    """

    @staticmethod
    def forward(ctx, q, k, v, layout, block_size, heads_per_chunk, row_bias, column_bias,
                block_bias):
        B, H, L, D = q.shape
        N, G = L - 1, block_size
        BH, (num_blocks, K) = B * H, layout.shape
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

        # Eq. 9, the class token as a key of every regional query: one more logit per query
        # contiguous: the product keeps q's strides, which the views below cannot always take
        # (a batch of one clip whose N is a multiple of G)
        q_blocks = (_blocks(q[:, :, 1:], G) * scale).reshape(BH, num_blocks, G, D).contiguous()
        col_logits = torch.bmm(q_blocks.view(BH, -1, D), k_cls.transpose(1, 2))  # (B H, N_b G, 1)
        col_logits = col_logits.view(BH, num_blocks, G, 1)
        if column_bias is not None:
            col_bias = column_bias.expand(B, H, num_blocks, G, 1).reshape(col_logits.shape)
            col_logits = col_logits + col_bias
        if block_bias is not None:
            block_bias = block_bias.expand(B, H, num_blocks, G, K * G)

        # Eq. 5-8, the regional rows, a chunk of heads at a time: one (G, D) x (D, K G) product per
        # (batch, head, query block), then the softmax over the 1 + K G logits of each query
        k_blocks, v_blocks = _whole_blocks(k, G), _whole_blocks(v, G)  # (B H, N_b, G D)
        block_out = torch.empty(BH, num_blocks, G, D, dtype=q.dtype, device=q.device)
        col_probs = torch.empty_like(col_logits)
        all_probs, index = [], layout.flatten()
        for b0, b1, h0, h1 in _chunks(B, H, heads_per_chunk):
            heads = slice(b0 * H + h0, (b1 - 1) * H + h1)
            k_rows = k_blocks[heads].index_select(1, index).view(-1, K * G, D)  # (h N_b, K G, D)
            probs = torch.bmm(q_blocks[heads].view(-1, G, D), k_rows.transpose(1, 2))  # logits yet
            del k_rows  # each gathered tensor lives only as long as its product needs it
            if block_bias is not None:
                probs.view(b1 - b0, h1 - h0, num_blocks, G, K * G).add_(block_bias[b0:b1, h0:h1])
            col = col_logits[heads].view(-1, G, 1)
            top = torch.maximum(probs.amax(dim=-1, keepdim=True), col)  # softmax, in place
            probs.sub_(top).exp_()
            col = (col - top).exp_()
            total = probs.sum(dim=-1, keepdim=True).add_(col)
            probs.div_(total)
            torch.div(col, total, out=col_probs[heads].view(-1, G, 1))
            v_rows = v_blocks[heads].index_select(1, index).view(-1, K * G, D)
            torch.bmm(probs, v_rows, out=block_out[heads].view(-1, G, D))  # (heads N_b, G, D)
            del v_rows
            all_probs.append(probs)
        block_out.view(BH, -1, D).baddbmm_(col_probs.view(BH, -1, 1), v_cls)  # + the class value

        # (B, 1 + N, H, D), as the output projection reads it: the saved tensor is the one it keeps
        out = torch.empty(B, L, H, D, dtype=q.dtype, device=q.device)
        out[:, 0] = cls_out.view(B, H, D)
        out[:, 1:] = block_out.view(B, H, -1, D)[:, :, :N].transpose(1, 2)
        out = out.transpose(1, 2)  # (B, H, 1 + N, D)
        ctx.save_for_backward(q_cls, q_blocks, k, v, layout, row_probs, col_probs, out, *all_probs)
        ctx.block_size, ctx.heads_per_chunk = G, heads_per_chunk
        ctx.bias_shapes = [getattr(b, "shape", None) for b in (row_bias, column_bias, block_bias)]
        return out, row_probs.view(B, H, L)[:, :, 1:].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_cls_attn):
        q_cls, q_blocks, k, v, layout, row_probs, col_probs, out, *all_probs = ctx.saved_tensors
        B, H, L, D = k.shape
        N, G = L - 1, ctx.block_size
        BH, (num_blocks, K) = B * H, layout.shape
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
        d_k_blocks = d_k[:, 1:].view(BH, num_blocks, G * D)
        d_v_blocks = d_v[:, 1:].view(BH, num_blocks, G * D)

        # --- the class column and the softmax's delta, for all heads at once (small tensors).
        # dO: (B H, N_b, G, D), zero on padded queries.
        d_block = _blocks(grad_out[:, :, 1:], G).reshape(BH, num_blocks, G, D).contiguous()
        d_col_probs = torch.bmm(d_block.view(BH, -1, D), v_cls.transpose(1, 2)).view_as(col_probs)
        # softmax backward: dS = P (dP - rowsum(P dP)), and rowsum(P dP) = rowsum(dO O)
        delta = (grad_out[:, :, 1:] * out[:, :, 1:]).sum(dim=-1, keepdim=True)  # (B, H, N, 1)
        delta = _blocks(delta, G).reshape(BH, num_blocks, G, 1)
        d_col_logits = d_col_probs.sub_(delta).mul_(col_probs)  # (B H, N_b, G, 1)

        # --- regional rows, chunk by chunk as in forward
        need_block_bias = ctx.needs_input_grad[8]
        if need_block_bias:
            d_block_logits = torch.empty(BH, num_blocks, G, K * G, dtype=k.dtype, device=k.device)
        k_blocks, v_blocks = _whole_blocks(k, G), _whole_blocks(v, G)
        d_q_blocks = torch.empty(BH, num_blocks, G, D, dtype=k.dtype, device=k.device)  # unscaled
        index = layout.flatten()
        for (b0, b1, h0, h1), probs in zip(_chunks(B, H, ctx.heads_per_chunk), all_probs):
            heads = slice(b0 * H + h0, (b1 - 1) * H + h1)
            d_out = d_block[heads].view(-1, G, D)
            v_rows = v_blocks[heads].index_select(1, index).view(-1, K * G, D)
            d_probs = torch.bmm(d_out, v_rows.transpose(1, 2))  # (heads N_b, G, K G)
            del v_rows
            d_v_rows = torch.bmm(probs.transpose(1, 2), d_out)  # dV = P^T dO: (heads N_b, K G, D)
            d_v_blocks[heads].index_add_(1, index, d_v_rows.view(-1, num_blocks * K, G * D))
            del d_v_rows
            d_logits = d_probs.sub_(delta[heads].view(-1, G, 1)).mul_(probs)
            if need_block_bias:
                d_block_logits[heads].view(-1, G, K * G).copy_(d_logits)
            k_rows = k_blocks[heads].index_select(1, index).view(-1, K * G, D)
            torch.bmm(d_logits, k_rows, out=d_q_blocks[heads].view(-1, G, D))
            del k_rows
            # dK = dS^T Q
            d_k_rows = torch.bmm(d_logits.transpose(1, 2), q_blocks[heads].view(-1, G, D))
            d_k_blocks[heads].index_add_(1, index, d_k_rows.view(-1, num_blocks * K, G * D))
            del d_k_rows, d_logits, d_probs

        # the class token's column: its key and value meet every regional query
        d_q_blocks.view(BH, -1, D).baddbmm_(d_col_logits.view(BH, -1, 1), k_cls)
        d_k[:, :1].baddbmm_(d_col_logits.view(BH, 1, -1), q_blocks.view(BH, -1, D))
        d_v[:, :1].baddbmm_(col_probs.view(BH, 1, -1), d_block.view(BH, -1, D))

        d_q = torch.empty_like(k)
        d_q[:, :, 0] = torch.bmm(d_row_logits, k.view(BH, L, D)).view(B, H, D) * scale
        torch.mul(d_q_blocks.view(B, H, -1, D)[:, :, :N], scale, out=d_q[:, :, 1:])

        grads = (d_row_logits, d_col_logits, d_block_logits if need_block_bias else None)
        d_biases = [g.reshape(B, H, *shape[2:]).sum_to_size(shape) if needed else None
                    for g, shape, needed in zip(grads, ctx.bias_shapes, ctx.needs_input_grad[6:])]
        return (d_q, d_k[:, :L].view(B, H, L, D), d_v[:, :L].view(B, H, L, D), None, None, None,
                *d_biases)
