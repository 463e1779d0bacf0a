import torch

from cpu_speedups import Dropout, Mlp, cpu_dropout
from model import BertAttention, extended_mask


def test_mlp_recomputing_gelu_matches_autograd():
    """Mlp keeps only the hidden pre-activation for backward; outputs and gradients are
    unchanged."""
    torch.manual_seed(0)
    mlp = Mlp(6, 12).double()
    reference = torch.nn.Sequential(*mlp)  # the same modules, plain autograd
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 6, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        out = mlp(x)
    grads = torch.autograd.grad((out * w).sum(), (x, *mlp.parameters()))
    ref = reference(x)
    ref_grads = torch.autograd.grad((ref * w).sum(), (x, *mlp.parameters()))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    hidden = 2 * 5 * 12
    # one (B, N, 4d) tensor, then a weight
    assert sorted(saved, reverse=True)[:2] == [hidden, 12 * 6]
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref)


def test_cpu_dropout_drops_p_of_each_lane_and_keeps_the_mean():
    """Each of the four 16-bit slices of a random word drops with probability p' = round(p 2^16) /
    2^16; the kept elements are scaled by 1 / (1 - p'); the gradient is the same mask and scale."""
    torch.manual_seed(0)
    p, n = 0.1, 1 << 22
    p_eff = round(p * 65536) / 65536
    x = torch.ones(n, requires_grad=True)
    out = cpu_dropout(x, p)
    dropped = out == 0
    sigma = (p_eff * (1 - p_eff) / n) ** 0.5
    assert abs(dropped.double().mean().item() - p_eff) < 5 * sigma
    for lane in dropped.view(-1, 4).T:  # a draw that left a slice's top bit fixed would show here
        assert abs(lane.double().mean().item() - p_eff) < 5 * 2 * sigma
    torch.testing.assert_close(out[~dropped], torch.full_like(out[~dropped], 1 / (1 - p_eff)))
    assert abs(out.double().mean().item() - 1) < 5 * sigma / (1 - p_eff)
    grad = torch.randn(n)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad * out.detach())  # out is the mask times the scale
    assert torch.equal(cpu_dropout(torch.ones(5), 1.0), torch.zeros(5))


def test_dropout_module_is_seeded_and_off_in_eval():
    drop = Dropout(0.3)
    x = torch.randn(64, 48)
    torch.manual_seed(1)
    a = drop(x)
    b = drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a)  # torch.manual_seed reproduces the masks
    assert not torch.equal(a, b)  # a fresh mask each call
    assert 0.2 < (a == 0).float().mean().item() < 0.4
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_bert_attention_cpu_dropout_path():
    """Training on the CPU: softmax(q k^T / sqrt(d) + mask), dropout, times v, projection, dropout,
    residual and norm: the math scaled_dot_product_attention does with dropout, with `Dropout`'s
    sampler. In eval, the fused path and the weights path agree."""
    torch.manual_seed(0)
    attn = BertAttention(32, 4, dropout=0.1)
    x = torch.randn(2, 5, 32)
    mask = extended_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), x.dtype)
    torch.manual_seed(7)
    out, probs = attn.train()(x, mask=mask)
    assert probs is None
    torch.manual_seed(7)
    q, k, v = (layer(x).view(2, 5, 4, 8).transpose(1, 2) for layer in (attn.query, attn.key,
                                                                       attn.value))
    weights = (q @ k.transpose(-1, -2) / 8 ** 0.5 + mask).softmax(dim=-1)
    heads = (cpu_dropout(weights, 0.1) @ v).transpose(1, 2).reshape(2, 5, 32)
    expected = attn.norm(x + cpu_dropout(attn.dense(heads), 0.1))
    torch.testing.assert_close(out, expected)
    attn.eval()
    fused, _ = attn(x, mask=mask)
    plain, weights = attn(x, mask=mask, return_probs=True)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
