import pytest
import torch
from transformers import BeitConfig, BeitModel

from model import SViTT, preset
from pretrained import load_beit


def test_load_beit_inflates_2d_weights(tmp_path):
    torch.manual_seed(0)
    beit_config = BeitConfig(image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=2,
                             intermediate_size=128, use_relative_position_bias=True,
                             use_absolute_position_embeddings=True, use_mean_pooling=False,
                             layer_scale_init_value=0.1)
    beit = BeitModel(beit_config, add_pooling_layer=False).eval()
    with torch.no_grad():  # make the relative bias and layer scale matter
        for name, p in beit.named_parameters():
            if any(k in name for k in ("relative_position_bias_table", "lambda",
                                       "position_embeddings")):
                p.normal_()
    beit.save_pretrained(tmp_path / "beit")
    common = dict(image_size=32, vision_width=64, vision_layers=2, vision_heads=2, mlp_ratio=2.0,
                  prune_after=[],
                  block_size=None, keep_rate_v=1.0, abs_pos_embed=True, rel_pos_bias=True)
    # T = 1: the video encoder is the image model
    encoder = SViTT(preset("tiny", frames=1, beit_checkpoint=str(tmp_path / "beit"),
                           **common)).video_encoder.eval()
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
        torch.testing.assert_close(table[dt],
                                   encoder.blocks[0].rel_pos.relative_position_bias_table[0])


def test_load_beit_rejects_other_shapes(tmp_path):
    beit = BeitModel(BeitConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))
    beit.save_pretrained(tmp_path / "beit")
    encoder = SViTT(preset("tiny", frames=1, image_size=32, vision_layers=2, prune_after=[]),
                    pretrained=False).video_encoder
    with pytest.raises(ValueError, match="width 32"):
        load_beit(encoder, str(tmp_path / "beit"))
