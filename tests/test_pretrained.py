import pytest
import torch
from transformers import BeitConfig, BeitImageProcessor, BeitModel

from model import SViTT, preset
from pretrained import beit_normalisation, load_beit


def test_load_beit_inflates_2d_weights(tmp_path):
    torch.manual_seed(0)
    beit_config = BeitConfig(image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=2,
                             intermediate_size=256, use_relative_position_bias=True,
                             use_absolute_position_embeddings=True, use_mean_pooling=False,
                             layer_scale_init_value=0.1)
    beit = BeitModel(beit_config, add_pooling_layer=False).eval()
    with torch.no_grad():  # make the relative bias and layer scale matter
        for name, p in beit.named_parameters():
            if any(k in name for k in ("relative_position_bias_table", "lambda",
                                       "position_embeddings")):
                p.normal_()
    beit.save_pretrained(tmp_path / "beit")
    common = dict(image_size=32, vision_width=64, vision_layers=2, vision_heads=2, prune_after=[],
                  block_size=None, keep_rate_v=1.0, abs_pos_embed=True, rel_pos_bias=True)
    # T = 1: the video encoder is the image model
    encoder = SViTT(preset("tiny", frames=1, beit_checkpoint=str(tmp_path / "beit"),
                           **common)).video_encoder.eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, _, _ = encoder(image[:, None])
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


def test_mean_pooling_takes_beits_pooler_and_the_normalisation_follows_it(tmp_path):
    """A mean-pooling BEiT (the layout of beit-base-patch16-224-pt22k-ft22k): video_pooling="mean"
    gives its pooler output (LayerNorm of the mean of the regional tokens); the pooler's norm goes
    nowhere else. The model's normalisation is the checkpoint's preprocessor config's."""
    torch.manual_seed(0)
    beit_config = BeitConfig(image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=256,
                             use_relative_position_bias=True, use_mean_pooling=True)
    beit = BeitModel(beit_config, add_pooling_layer=True).eval()
    with torch.no_grad():
        for name, p in beit.named_parameters():
            if "pooler" in name:
                p.normal_()
    beit.save_pretrained(tmp_path / "beit")
    common = dict(image_size=32, vision_width=64, vision_layers=2, vision_heads=2,
                  prune_after=[], block_size=None, keep_rate_v=1.0, abs_pos_embed=False,
                  beit_checkpoint=str(tmp_path / "beit"))
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = beit(pixel_values=image).pooler_output
    pooled = {}
    for pooling in ("cls", "mean"):
        encoder = SViTT(preset("tiny", frames=1, video_pooling=pooling, **common)).video_encoder
        with torch.no_grad():
            tokens, _, pooled[pooling] = encoder.eval()(image[:, None])
        # no final norm in this BEiT: the norm over the tokens starts as a plain LayerNorm
        torch.testing.assert_close(encoder.norm.weight, torch.ones(64))
    torch.testing.assert_close(pooled["mean"], theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled["cls"], tokens[:, 0])
    assert not torch.allclose(pooled["cls"], theirs, atol=1e-2)
    # normalisation: the preset's without a preprocessor config, the checkpoint's with one
    assert beit_normalisation(str(tmp_path / "beit")) is None
    offline = {**common, "text_model": "all-MiniLM-L6-v2", "text_layers": 3}  # no download
    config = preset("base", **offline)
    SViTT(config)
    assert (config.image_mean, config.image_std) == ([0.5] * 3, [0.5] * 3)
    BeitImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(
        tmp_path / "beit")
    config = preset("base", **offline)
    SViTT(config)
    assert config.image_mean == pytest.approx([0.4, 0.5, 0.6])
    assert config.image_std == pytest.approx([0.2, 0.3, 0.4])


def test_the_text_encoder_loads_with_one_line_of_our_own(capfd, caplog):
    """all-MiniLM-L6-v2 holds no MLM head: transformers would print a warning and a table of
    missing keys; the project says in one line what started fresh, and nothing else is printed."""
    import logging
    with caplog.at_level(logging.INFO, logger="train"):
        SViTT(preset("tiny"))
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == "", printed
    lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert len(lines) == 1 and "no MLM head, which starts fresh" in lines[0]
    assert "LOAD REPORT" not in caplog.text and "corrupted" not in caplog.text


def test_beit_loads_with_one_line_of_our_own(tmp_path, capfd, caplog):
    """A BEiT classifier checkpoint (the hub's layout) holds a head SViTT does not use:
    transformers would print a table of unexpected keys; the project says what it loaded."""
    import logging

    from transformers import BeitForImageClassification
    config = BeitConfig(image_size=32, patch_size=16, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=256, num_labels=5,
                        use_relative_position_bias=True, use_mean_pooling=True)
    BeitForImageClassification(config).save_pretrained(tmp_path / "beit")
    capfd.readouterr()
    encoder = SViTT(preset("tiny", frames=2, image_size=32, vision_width=64, vision_layers=2,
                           prune_after=[]), pretrained=False).video_encoder
    with caplog.at_level(logging.INFO, logger="train"):
        load_beit(encoder, str(tmp_path / "beit"))
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == "", printed
    assert [r.getMessage() for r in caplog.records] == [
        f"video encoder from BEiT {tmp_path / 'beit'}: patch_embed, cls_token, 2 blocks with "
        f"relative bias (inflated)"]
