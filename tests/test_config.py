import pytest

from config import REMOVED, SViTTConfig, preset


def test_recipe_fields_of_the_presets():
    base, tiny = preset("base"), preset("tiny")
    assert tiny == SViTTConfig()  # the defaults are the tiny preset's
    # MLM masking rate: the authors' 0.5 for base (the paper does not say), 0.15 for tiny
    assert (base.mlm_probability, tiny.mlm_probability) == (0.5, 0.15)
    assert (base.image_mean, base.image_std) == ([0.5] * 3, [0.5] * 3)  # BEiT's
    assert tiny.image_mean == [0.485, 0.456, 0.406] and tiny.image_std == [0.229, 0.224, 0.225]
    assert base.video_pooling == tiny.video_pooling == "cls"  # the paper's VTC feature
    assert not base.vtm_negative_videos and not tiny.vtm_negative_videos  # Eq. 30: 2B pairs
    # crops: Singularity's half-to-whole area for base; tiny's synthetic captions describe whole
    # frames. VTM negatives by similarity for base (the authors'), uniform for tiny
    assert (base.crop_scale, tiny.crop_scale) == ([0.5, 1.0], [1.0, 1.0])
    assert (base.hard_negatives, tiny.hard_negatives) == (True, False)
    # the paper's patch embedding alone for base (BEiT's); tiny, trained from scratch, adds the
    # residual space-time convolution over the patch tokens
    assert (base.space_time_conv, tiny.space_time_conv) == (0, 64)
    assert (base.text_pooling, tiny.text_pooling) == ("cls", "mean")  # MiniLM was trained on means
    with pytest.raises(ValueError, match="video_pooling"):
        preset("tiny", video_pooling="max")


def test_a_checkpoints_config_reads_back_as_it_was():
    for name in ("base", "tiny"):
        config = preset(name, frames=8, keep_rate_v=0.6)
        assert SViTTConfig.from_dict(config.to_dict()) == config


def test_old_checkpoints_read_what_they_trained_with():
    """A config written before version 2: fields it lacks take what it was trained with, removed
    options holding the value the code now always uses are dropped."""
    base = preset("base").to_dict()
    old = {k: v for k, v in base.items() if k not in (
        "version", "image_mean", "image_std", "mlm_probability", "drop_path", "video_pooling",
        "horizontal_flip", "crop_scale", "space_time_conv", "text_pooling", "hard_negatives")}
    old.update(stem="patch", space_time_kernel=[3, 3, 3], vtm_group_share=0.0, mlp_ratio=4.0,
               pos_embed_init="normal")  # without vtm_pooling: VTM read text_pooling's summary
    restored = SViTTConfig.from_dict(old)
    assert restored.image_mean == [0.485, 0.456, 0.406]  # ImageNet's, as they were trained
    assert (restored.mlm_probability, restored.drop_path) == (0.15, 0.0)
    assert restored.crop_scale == [0.5, 1.0] and restored.space_time_conv == 0
    assert restored.text_pooling == "cls" and restored.hard_negatives
    # a checkpoint whose VTM read MiniLM's mean (before vtm_pooling) no longer loads
    with pytest.raises(ValueError, match="predates vtm_pooling"):
        SViTTConfig.from_dict({**old, "text_pooling": "mean"})


@pytest.mark.parametrize("name,value", [("stem", "conv"), ("vtm_group_share", 0.5),
                                        ("space_time_kernel", [3, 5, 5]), ("mlp_ratio", 2.0),
                                        ("vtm_pooling", None)])
def test_removed_options_are_refused_by_name(name, value):
    assert name in REMOVED
    old = {**preset("tiny").to_dict(), "version": 1, "vtm_pooling": "cls", name: value}
    if name == "vtm_pooling":  # None: VTM read text_pooling's summary, MiniLM's mean
        with pytest.raises(ValueError, match="vtm_pooling"):
            SViTTConfig.from_dict(old)
        return
    with pytest.raises(ValueError, match=f"trained with {name}=.*an option this version no longer"):
        SViTTConfig.from_dict(old)
    SViTTConfig.from_dict({**old, name: REMOVED[name]})  # the value kept loads


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"does not know: \['surprise'\]"):
        SViTTConfig.from_dict({**preset("tiny").to_dict(), "surprise": 1})
