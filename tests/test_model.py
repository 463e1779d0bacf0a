
import pytest
import torch
from transformers import AutoTokenizer, BeitConfig, BeitModel

from curriculum import count_edges
from model import (BertAttention, Dropout, Mlp, SViTT, RelativePositionBias, cpu_dropout, extended_mask, load_beit,
                   preset, text_model_path)

SPARSITY = {  # (block_size, keep_rate_v, keep_rate_m)
    "dense": dict(block_size=None, keep_rate_v=1.0, keep_rate_m=1.0),
    "edge": dict(block_size=14, keep_rate_v=1.0, keep_rate_m=1.0),
    "node": dict(block_size=None, keep_rate_v=0.7, keep_rate_m=0.1),
    "hybrid": dict(block_size=14, keep_rate_v=0.7, keep_rate_m=0.1),
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(text_model_path("all-MiniLM-L6-v2"))


def make_batch(tokenizer, config, batch_size=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a red square moves left", "a blue circle moves up, then a green triangle moves right",
                "a yellow circle moves down"][:batch_size]
    enc = tokenizer(captions, padding="max_length", max_length=config.text_len, truncation=True, return_tensors="pt")
    labels = torch.full_like(enc.input_ids, -100)
    labels[:, 2] = enc.input_ids[:, 2]  # one masked word per caption
    mlm_ids = enc.input_ids.clone()
    mlm_ids[:, 2] = tokenizer.mask_token_id
    size = config.image_size
    return {"video": torch.randn(batch_size, config.frames, 3, size, size, generator=g),
            "input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": labels, "video_id": torch.arange(batch_size)}


@pytest.mark.parametrize("frames", [1, 4, 8])
@pytest.mark.parametrize("mode", list(SPARSITY))
def test_forward_backward(tokenizer, mode, frames):
    torch.manual_seed(0)
    config = preset("tiny", frames=frames, **SPARSITY[mode])
    model = SViTT(config)
    out = model(make_batch(tokenizer, config))
    for name in ("loss", "loss_vtc", "loss_vtm", "loss_mlm"):
        assert torch.isfinite(out[name]), f"{name} is not finite"
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    # the record follows Eq. 17-19 for the same configuration
    edges = count_edges(frames, config.local_blocks, config.random_blocks, config.block_size,
                        config.keep_rate_v, config.keep_rate_m, patches_per_frame=config.grid ** 2,
                        text_len=config.text_len, prune_after=config.prune_after)
    record = out["record"]
    assert record["visual_tokens"] == edges.visual_tokens
    assert record["visual"] == edges.visual
    assert record["multimodal_tokens"] == edges.multimodal_tokens
    assert record["multimodal"] == edges.multimodal


def test_dense_equals_hybrid_with_everything_kept(tokenizer):
    torch.manual_seed(0)
    dense_config = preset("tiny", frames=4, **SPARSITY["dense"])
    # 196 regional tokens in blocks of 14: 14 blocks; K_l + K_r = 14 covers them all
    hybrid_config = preset("tiny", frames=4, block_size=14, local_blocks=1, random_blocks=13,
                           keep_rate_v=1.0, keep_rate_m=1.0)
    dense, hybrid = SViTT(dense_config).eval(), SViTT(hybrid_config).eval()
    hybrid.load_state_dict(dense.state_dict())
    batch = make_batch(tokenizer, dense_config)
    with torch.no_grad():
        torch.manual_seed(1)  # the same VTM negatives for both
        a = dense(batch)
        torch.manual_seed(1)
        b = hybrid(batch, generator=torch.Generator().manual_seed(2))
        ta, _, fa = dense.encode_video(batch["video"])
        tb, _, fb = hybrid.encode_video(batch["video"])
    torch.testing.assert_close(tb, ta, atol=1e-4, rtol=1e-4)
    for name in ("loss_vtc", "loss_vtm", "loss_mlm"):
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-4)
    # and sparsity does change the result when it is on
    sparse = SViTT(preset("tiny", frames=4, **SPARSITY["hybrid"])).eval()
    sparse.load_state_dict(dense.state_dict())
    with torch.no_grad():
        tc, _, _ = sparse.encode_video(batch["video"])
    assert tc.shape[1] < ta.shape[1]


def test_relative_bias_follows_eq26():
    T, S, H = 2, 3, 2
    rel = RelativePositionBias(T, S, H)
    with torch.no_grad():
        rel.relative_position_bias_table.normal_()
        rel.cls_bias.normal_()
    N = T * S * S
    index = torch.arange(1 + N)[None]
    pos = torch.arange(1 + N)
    got = rel.bias(index)(pos[:, None], pos[None, :])[0]  # (H, 1 + N, 1 + N)
    coords = [(t, h, w) for t in range(T) for h in range(S) for w in range(S)]
    table = rel.relative_position_bias_table
    for i in range(1 + N):
        for j in range(1 + N):
            if i == 0 and j == 0:
                want = rel.cls_bias[2]
            elif i == 0:
                want = rel.cls_bias[0]
            elif j == 0:
                want = rel.cls_bias[1]
            else:
                (t, h, w), (t2, h2, w2) = coords[i - 1], coords[j - 1]
                want = table[t - t2 + T - 1, h - h2 + S - 1, w - w2 + S - 1]
            torch.testing.assert_close(got[:, i, j], want)
    # after pruning, the bias follows the kept tokens through their original numbers
    kept = torch.tensor([[0, 2, 7, 11]])
    sub = rel.bias(kept)(torch.arange(4)[:, None], torch.arange(4)[None, :])[0]
    torch.testing.assert_close(sub, got[:, kept[0]][:, :, kept[0]])


def test_load_beit_inflates_2d_weights(tmp_path):
    torch.manual_seed(0)
    beit_config = BeitConfig(image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=128, use_relative_position_bias=True,
                             use_absolute_position_embeddings=True, use_mean_pooling=False, layer_scale_init_value=0.1)
    beit = BeitModel(beit_config, add_pooling_layer=False).eval()
    with torch.no_grad():  # make the relative bias and layer scale matter
        for name, p in beit.named_parameters():
            if "relative_position_bias_table" in name or "lambda" in name or "position_embeddings" in name:
                p.normal_()
    beit.save_pretrained(tmp_path / "beit")
    common = dict(image_size=32, vision_width=64, vision_layers=2, vision_heads=2, mlp_ratio=2.0, prune_after=[],
                  block_size=None, keep_rate_v=1.0, abs_pos_embed=True, rel_pos_bias=True)
    # T = 1: the video encoder is the image model
    encoder = SViTT(preset("tiny", frames=1, beit_checkpoint=str(tmp_path / "beit"), **common)).video_encoder.eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, _ = encoder(image[:, None])
        theirs = beit(pixel_values=image).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # T = 3: position embedding and relative bias duplicated along time (Eq. 22, 26-27)
    encoder3 = SViTT(preset("tiny", frames=3, **common), pretrained=False).video_encoder
    loaded = load_beit(encoder3, str(tmp_path / "beit"))
    assert any("pos_embed" in name for name in loaded)
    pos = encoder3.pos_embed[0, 1:].reshape(3, 4, 64)
    for t in range(3):
        torch.testing.assert_close(pos[t], encoder.pos_embed[0, 1:])
    table = encoder3.blocks[0].rel_pos.relative_position_bias_table
    assert table.shape[0] == 5
    for dt in range(5):
        torch.testing.assert_close(table[dt], encoder.blocks[0].rel_pos.relative_position_bias_table[0])


def test_load_beit_rejects_other_shapes(tmp_path):
    beit = BeitModel(BeitConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))
    beit.save_pretrained(tmp_path / "beit")
    encoder = SViTT(preset("tiny", frames=1, image_size=32, vision_layers=2, prune_after=[]),
                    pretrained=False).video_encoder
    with pytest.raises(ValueError, match="width 32"):
        load_beit(encoder, str(tmp_path / "beit"))


def test_presets_shapes():
    base, tiny = preset("base"), preset("tiny")
    assert (base.image_size, base.vision_width, base.vision_layers, base.vision_heads) == (224, 768, 12, 12)
    assert base.num_tokens == 785 and tiny.num_tokens == 197
    assert base.block_size / base.grid ** 2 == tiny.block_size / tiny.grid ** 2  # a block is 2/7 of a frame
    with torch.device("meta"):
        model = SViTT(base, pretrained=False)
    params = sum(p.numel() for p in model.parameters())
    assert 190e6 < params < 215e6  # BEiT-B (86M) + BERT-base (110M) + cross-attention and heads


def test_mlp_recomputing_gelu_matches_autograd():
    """Mlp keeps only the hidden pre-activation for backward; outputs and gradients are unchanged."""
    torch.manual_seed(0)
    mlp = Mlp(6, 12).double()
    reference = torch.nn.Sequential(*mlp)  # the same modules, plain autograd
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 6, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = mlp(x)
    grads = torch.autograd.grad((out * w).sum(), (x, *mlp.parameters()))
    ref = reference(x)
    ref_grads = torch.autograd.grad((ref * w).sum(), (x, *mlp.parameters()))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    hidden = 2 * 5 * 12
    assert sorted(saved, reverse=True)[:2] == [hidden, 12 * 6]  # one (B, N, 4d) tensor, then a weight
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
    q, k, v = (layer(x).view(2, 5, 4, 8).transpose(1, 2) for layer in (attn.query, attn.key, attn.value))
    weights = (q @ k.transpose(-1, -2) / 8 ** 0.5 + mask).softmax(dim=-1)
    heads = (cpu_dropout(weights, 0.1) @ v).transpose(1, 2).reshape(2, 5, 32)
    expected = attn.norm(x + cpu_dropout(attn.dense(heads), 0.1))
    torch.testing.assert_close(out, expected)
    attn.eval()
    fused, _ = attn(x, mask=mask)
    plain, weights = attn(x, mask=mask, return_probs=True)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
