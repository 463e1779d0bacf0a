import math

import pytest
import torch
import torch.nn.functional as F

from sparse_attention import (
    SparseSelfAttention,
    attention_mask,
    block_layout,
    dense_attention,
    edge_count,
    sparse_attention,
)


def relative_bias(num_heads, seed=0):
    """A bias function of the shape model.py uses: a learned scalar per (head, position offset)."""
    table = torch.randn(num_heads, 2 * 64 + 1, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)

    def bias(query_pos, key_pos):
        return table[:, (key_pos - query_pos).clamp(-64, 64) + 64][None]  # (1, H, ...)
    return bias


def dense_reference(q, k, v, mask, bias=None):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        pos = torch.arange(q.shape[2])
        logits = logits + bias(pos[:, None], pos[None, :])
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    return probs @ v, probs[:, :, 0, 1:]


@pytest.mark.parametrize("num_tokens,block_size,local_blocks,random_blocks", [
    (32, 4, 1, 3),   # N divisible by G
    (30, 4, 1, 3),   # last block padded
    (40, 4, 3, 2),   # K_l = 3
    (33, 8, 3, 1),   # K_l = 3, padded
    (10, 4, 1, 3),   # fewer blocks (3) than K_l + K_r
])
@pytest.mark.parametrize("impl", ["einsum", "sdpa", "bmm"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_equals_masked_dense(num_tokens, block_size, local_blocks, random_blocks, impl,
                                    with_bias):
    g = torch.Generator().manual_seed(1)
    layout = block_layout(math.ceil(num_tokens / block_size), local_blocks, random_blocks, g)
    mask = attention_mask(num_tokens, block_size, layout)
    bias = relative_bias(3) if with_bias else None
    q, k, v = (torch.randn(2, 3, 1 + num_tokens, 8, dtype=torch.float64, generator=g,
                           requires_grad=True)
               for _ in range(3))
    out, cls_attn = sparse_attention(q, k, v, block_size, layout, bias, impl=impl)
    ref, ref_cls = dense_reference(q, k, v, mask, bias)
    assert out.shape == q.shape and cls_attn.shape == (2, 3, num_tokens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(cls_attn, ref_cls, atol=1e-5, rtol=0)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["einsum", "sdpa", "bmm"])
@pytest.mark.parametrize("num_tokens,per_item_bias", [(32, False), (30, True)])
def test_gradients_of_bias_and_class_attention(impl, num_tokens, per_item_bias):
    """The bias table and the class row's weights (Eq. 10) get the dense reference's gradients."""
    g = torch.Generator().manual_seed(2)
    B, H, G = 2, 3, 4
    layout = block_layout(math.ceil(num_tokens / G), 1, 2, g)
    mask = attention_mask(num_tokens, G, layout)
    table = torch.randn(B if per_item_bias else 1, H, 2 * 64 + 1, generator=g, dtype=torch.float64,
                        requires_grad=True)

    def bias(query_pos, key_pos):  # (B or 1, H, ...)
        return table[:, :, (key_pos - query_pos).clamp(-64, 64) + 64]
    q, k, v = (torch.randn(B, H, 1 + num_tokens, 8, dtype=torch.float64, generator=g,
                           requires_grad=True)
               for _ in range(3))
    w, w_cls = torch.randn(B, H, 1 + num_tokens, 8, generator=g, dtype=torch.float64), torch.randn(
        B, H, num_tokens, generator=g, dtype=torch.float64)
    out, cls_attn = sparse_attention(q, k, v, G, layout, bias, impl=impl)
    ref, ref_cls = dense_reference(q, k, v, mask, bias)
    grads = torch.autograd.grad((out * w).sum() + (cls_attn * w_cls).sum(), (q, k, v, table))
    ref_grads = torch.autograd.grad((ref * w).sum() + (ref_cls * w_cls).sum(), (q, k, v, table))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-6)


def test_impls_agree_on_strided_inputs():
    """q, k, v as SparseSelfAttention makes them (views into one qkv tensor) give equal results."""
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 60, 24, requires_grad=True)
    results = []
    for impl in ("einsum", "bmm"):
        torch.manual_seed(1)
        attn = SparseSelfAttention(dim=24, num_heads=3, block_size=8, local_blocks=1,
                                   random_blocks=2, impl=impl)
        out, cls_attn = attn(x, generator=torch.Generator().manual_seed(3))
        grad_x, grad_w = torch.autograd.grad(out.square().sum() + cls_attn.sum(),
                                             (x, attn.qkv.weight))
        results.append((out, cls_attn, grad_x, grad_w))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_layout_rows():
    g = torch.Generator().manual_seed(0)
    layout = block_layout(10, 3, 4, g)
    assert layout.shape == (10, 7)
    for k, row in enumerate(layout.tolist()):
        start = min(max(k - 1, 0), 10 - 3)  # Eq. 7 window, shifted inward at the ends
        assert row[:3] == list(range(start, start + 3))
        assert len(set(row)) == 7 and not set(row[3:]) & set(row[:3])  # Eq. 8: distinct, outside
    # different draws differ; the same seed repeats
    assert not torch.equal(block_layout(10, 1, 3, torch.Generator().manual_seed(0)),
                           block_layout(10, 1, 3, torch.Generator().manual_seed(1)))
    assert torch.equal(block_layout(10, 1, 3, torch.Generator().manual_seed(5)),
                       block_layout(10, 1, 3, torch.Generator().manual_seed(5)))


def test_layout_with_few_blocks_lists_every_block_once():
    layout = block_layout(3, 1, 3)
    assert layout.shape == (3, 3)
    assert all(sorted(row) == [0, 1, 2] and row[0] == k for k, row in enumerate(layout.tolist()))


@pytest.mark.parametrize("num_tokens,block_size,local_blocks,random_blocks",
                         [(784, 56, 1, 3), (48, 4, 3, 2)])
def test_mask_edges_follow_eq17(num_tokens, block_size, local_blocks, random_blocks):
    layout = block_layout(num_tokens // block_size, local_blocks, random_blocks)
    mask = attention_mask(num_tokens, block_size, layout)
    # Eq. 17 without the class token
    regional = num_tokens * (local_blocks + random_blocks) * block_size
    assert int(mask.sum()) == regional + 2 * num_tokens + 1  # plus the class token's row and column
    assert edge_count(1 + num_tokens, block_size, layout.shape[1]) == (1 + num_tokens) * (
        local_blocks + random_blocks) * block_size


@pytest.mark.parametrize("impl", ["einsum", "bmm"])
def test_no_square_tensor_is_built(impl):
    """Every tensor kept for backward stays O(N (K_l + K_r) G): nothing has N x N elements."""
    N, G = 2048, 16
    layout = block_layout(N // G, 1, 3)
    q, k, v = (torch.randn(1, 1, 1 + N, 4, requires_grad=True) for _ in range(3))
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse_attention(q, k, v, G, layout, relative_bias(1), impl=impl)
    assert largest < N * N / 4
    assert largest <= (N + G) * (1 + 4 * G) * 4


def test_module_shapes_edges_and_class_row():
    torch.manual_seed(0)
    sparse = SparseSelfAttention(dim=32, num_heads=4, block_size=4, local_blocks=1, random_blocks=2)
    dense = SparseSelfAttention(dim=32, num_heads=4, block_size=None)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 1 + 30, 32)
    out, cls_attn = sparse(x, generator=torch.Generator().manual_seed(0))
    dense_out, dense_cls = dense(x)
    assert out.shape == x.shape and cls_attn.shape == (2, 4, 30)
    assert sparse.edges(31) == 31 * 3 * 4 and dense.edges(31) == 31 * 31
    assert sparse.edges(1 + 8) == 9 * 2 * 4  # two blocks: the layout is only two wide
    # the class token attends to every token in both modes (Eq. 9)
    torch.testing.assert_close(out[:, 0], dense_out[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cls_attn, dense_cls, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(out[:, 1:], dense_out[:, 1:], atol=1e-3)  # regional rows are sparse


def test_dense_attention_matches_full_mask():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    bias = relative_bias(2)
    out, cls_attn = dense_attention(q, k, v, bias)
    ref, ref_cls = dense_reference(q, k, v, torch.ones(9, 9, dtype=torch.bool), bias)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(cls_attn, ref_cls)


def test_sparse_with_all_blocks_equals_dense():
    q, k, v = (torch.randn(1, 2, 1 + 24, 8, dtype=torch.float64) for _ in range(3))
    layout = block_layout(6, 1, 5)
    out, cls_attn = sparse_attention(q, k, v, 4, layout)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref)
    assert cls_attn.shape == (1, 2, 24)


def test_auto_trains_with_bmm_and_infers_with_sdpa(monkeypatch):
    import sparse_attention as module
    import sparse_attention_cpu as cpu
    calls = []
    apply, sdpa = cpu._BlockSparseAttention.apply, module.F.scaled_dot_product_attention
    monkeypatch.setattr(cpu._BlockSparseAttention, "apply",
                        lambda *a: calls.append("bmm") or apply(*a))
    monkeypatch.setattr(module.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append("sdpa") or sdpa(*a, **k))
    q, k, v = (torch.randn(1, 2, 1 + 16, 8, requires_grad=True) for _ in range(3))
    layout = block_layout(4, 1, 2)
    sparse_attention(q, k, v, 4, layout)
    with torch.no_grad():
        sparse_attention(q, k, v, 4, layout)
    assert calls == ["bmm", "sdpa"]


@pytest.mark.parametrize("batch,heads,heads_per_chunk", [(2, 5, 2), (3, 3, 7), (2, 3, 1)])
def test_chunks_cover_every_head_once_in_order(batch, heads, heads_per_chunk):
    import sparse_attention_cpu as module
    covered = []
    for b0, b1, h0, h1 in module._chunks(batch, heads, heads_per_chunk):
        assert b1 - b0 == 1 or (h0, h1) == (0, heads)  # within one item, or whole items
        assert (b1 - b0) * (h1 - h0) <= max(heads_per_chunk, 1)
        covered += range(b0 * heads + h0, (b1 - 1) * heads + h1)
    assert covered == list(range(batch * heads))


@pytest.mark.parametrize("heads_per_chunk", [2, 7])  # 2 does not divide the 5 heads; 7 spans items
@pytest.mark.parametrize("per_item_bias", [False, True])
def test_chunked_bmm_equals_plain_path(monkeypatch, heads_per_chunk, per_item_bias):
    """The CPU path, run a few heads at a time, gives the plain path's output, class weights and
    gradients of q, k, v and the bias table."""
    import sparse_attention_cpu as module
    B, H, N, G, D, K = 3, 5, 30, 4, 8, 3
    per_head = math.ceil(N / G) * K * G * max(G, D) * 8  # float64 bytes of one head's temporaries
    monkeypatch.setattr(module, "CHUNK_BYTES", heads_per_chunk * per_head)
    assert module._heads_per_chunk(math.ceil(N / G), K, G, D, 8) == heads_per_chunk
    g = torch.Generator().manual_seed(4)
    layout = block_layout(math.ceil(N / G), 1, K - 1, g)
    table = torch.randn(B if per_item_bias else 1, H, 2 * 64 + 1, generator=g, dtype=torch.float64,
                        requires_grad=True)

    def bias(query_pos, key_pos):
        return table[:, :, (key_pos - query_pos).clamp(-64, 64) + 64]
    q, k, v = (torch.randn(B, H, 1 + N, D, dtype=torch.float64, generator=g, requires_grad=True)
               for _ in range(3))
    w, w_cls = torch.randn(B, H, 1 + N, D, generator=g, dtype=torch.float64), torch.randn(
        B, H, N, generator=g, dtype=torch.float64)
    results = []
    for impl in ("bmm", "einsum"):
        out, cls_attn = sparse_attention(q, k, v, G, layout, bias, impl=impl)
        grads = torch.autograd.grad((out * w).sum() + (cls_attn * w_cls).sum(), (q, k, v, table))
        results.append((out, cls_attn, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("impl", ["einsum", "sdpa", "bmm"])
@pytest.mark.parametrize("num_tokens", [28, 30])  # N a multiple of G, and not
def test_a_batch_of_one_clip(impl, num_tokens):
    """One clip (B = 1) through the module, forward and backward, as two clips give it: the CPU
    path once took a view its strides could not give when G divided N."""
    torch.manual_seed(0)
    attn = SparseSelfAttention(dim=16, num_heads=2, block_size=7, impl=impl).double()
    x = torch.randn(2, 1 + num_tokens, 16, dtype=torch.float64)
    one = x[:1].clone().requires_grad_()
    both = x.clone().requires_grad_()
    out_one, _ = attn(one, generator=torch.Generator().manual_seed(3))
    out_both, _ = attn(both, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_one, out_both[:1])
    out_one.sum().backward()
    out_both[:1].sum().backward()
    torch.testing.assert_close(one.grad, both.grad[:1])


def bad_inputs(case):
    """(q, k, v, block_size, layout) with one thing wrong, and the words the error must hold."""
    g = torch.Generator().manual_seed(0)
    B, H, N, D, G = 2, 3, 30, 8, 4
    q, k, v = (torch.randn(B, H, 1 + N, D, generator=g) for _ in range(3))
    layout = block_layout(math.ceil(N / G), 1, 2, g)  # (8, 3)
    if case == "past the last block":
        layout[2, 1] = 8
        return (q, k, v, G, layout), "layout holds block 8: key blocks are numbered 0 to 7"
    if case == "negative block":
        layout[5, 2] = -1
        return (q, k, v, G, layout), "layout holds block -1"
    if case == "repeated block":
        layout[3] = torch.tensor([3, 4, 3])
        return (q, k, v, G, layout), r"layout row 3 \[3, 4, 3\] lists a block twice"
    if case == "tokens before heads":
        t = q.transpose(1, 2).contiguous()  # (B, 1 + N, H, D)
        return (t, t, t, G, layout), r"q looks like \(B, 1 \+ N, H, D\)"
    if case == "no regional token":
        t = q[:, :, :1]
        return (t, t, t, G, layout[:0]), "needs the class token and at least one regional token"
    if case == "k of another shape":
        return (q, k[:, :, :-1], v, G, layout), "q, k and v have shapes"
    if case == "block size 0":
        return (q, k, v, 0, layout), "block_size 0"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["past the last block", "negative block", "repeated block",
                                  "tokens before heads", "no regional token",
                                  "k of another shape", "block size 0"])
def test_bad_input_is_one_error_from_every_implementation(case):
    args, words = bad_inputs(case)
    messages = set()
    for impl in ("einsum", "sdpa", "bmm"):
        with pytest.raises(ValueError, match=words) as error:
            sparse_attention(*args, impl=impl)
        messages.add(str(error.value))
    assert len(messages) == 1, messages


def test_layout_values_unchecked_when_asked():
    """check_layout=False leaves the values alone (SparseSelfAttention's own layouts), the shape
    is still checked."""
    args, _ = bad_inputs("repeated block")
    sparse_attention(*args, impl="sdpa", check_layout=False)
    q, k, v, G, layout = args
    with pytest.raises(ValueError, match="one row per query block"):
        sparse_attention(q, k, v, G, layout[1:], check_layout=False)


def test_copied_alone_the_file_trains_with_sdpa(monkeypatch):
    """Without sparse_attention_cpu.py beside it (a project that copied sparse_attention.py alone)
    "auto" trains with the sdpa path, to the same result."""
    import sys
    q, k, v = (torch.randn(1, 2, 1 + 16, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    layout = block_layout(4, 1, 2)
    fast, _ = sparse_attention(q, k, v, 4, layout)
    monkeypatch.setitem(sys.modules, "sparse_attention_cpu", None)  # import fails
    alone, _ = sparse_attention(q, k, v, 4, layout)
    torch.testing.assert_close(alone, fast)
    with pytest.raises(AssertionError, match="needs sparse_attention_cpu.py"):
        sparse_attention(q, k, v, 4, layout, impl="bmm")
