import pytest

from config import SViTTConfig, preset


def test_recipe_fields_of_the_presets_and_of_old_checkpoints():
    base, tiny = preset("base"), preset("tiny")
    # MLM masking rate: the authors' 0.5 for base (the paper does not say), 0.15 for tiny
    assert (base.mlm_probability, tiny.mlm_probability) == (0.5, 0.15)
    assert (base.image_mean, base.image_std) == ([0.5] * 3, [0.5] * 3)  # BEiT's
    assert tiny.image_mean == [0.485, 0.456, 0.406] and tiny.image_std == [0.229, 0.224, 0.225]
    assert base.video_pooling == tiny.video_pooling == "cls"  # the paper's VTC feature
    assert not base.vtm_negative_videos and not tiny.vtm_negative_videos  # Eq. 30: 2B pairs
    # a checkpoint's config from before these fields: what it was trained with
    old = {k: v for k, v in base.to_dict().items() if k not in (
        "image_mean", "image_std", "mlm_probability", "drop_path", "video_pooling",
        "horizontal_flip", "vtc_directions", "vtc_gather", "vtm_negative_videos", "vtm_score",
        "lr_floor", "vtm_pooling", "crop_scale", "space_time_conv", "space_time_kernel",
        "space_time_out_kernel")}
    restored = SViTTConfig.from_dict(old)
    assert restored.image_mean == tiny.image_mean and restored.image_std == tiny.image_std
    assert (restored.mlm_probability, restored.drop_path, restored.lr_floor) == (0.15, 0.0, 0.0)
    assert (restored.horizontal_flip, restored.vtm_score) == (False, "log_softmax")
    assert restored.vtm_pooling is None  # VTM read text_pooling's summary
    # crops: Singularity's half-to-whole area for base and for old checkpoints; tiny's synthetic
    # captions describe whole frames
    assert base.crop_scale == restored.crop_scale == [0.5, 1.0] and tiny.crop_scale == [1.0, 1.0]
    assert base.vtm_pooling == tiny.vtm_pooling == "cls"  # f_m's class token (Sec. A.3)
    # the paper's patch embedding alone for base (BEiT's) and for old checkpoints; tiny, trained
    # from scratch, adds the residual space-time convolution over the patch tokens
    assert base.space_time_conv == restored.space_time_conv == 0 and tiny.space_time_conv == 64
    assert restored.space_time_kernel == restored.space_time_out_kernel == [3, 3, 3]
    with pytest.raises(ValueError, match="video_pooling"):
        preset("tiny", video_pooling="max")
