"""SViTT's settings: `SViTTConfig`, a commented field for each choice, and the presets.

`preset("base")` is the paper's model (Sec. 5.1, A.3; Table 9), `preset("tiny")` the CPU default
at the paper's ratios; the defaults of `SViTTConfig` are the tiny preset's. Every field is saved in
a checkpoint (`to_dict`) and read back from it (`from_dict`), so evaluation and a resumed run use
what the model was trained with; docs/recipe.md sets each field against the paper and the
authors' code.

Usage::

    config = preset("tiny", frames=4)                   # a preset, fields overridden by keyword
    config = SViTTConfig.from_dict(checkpoint["config"])
"""
from dataclasses import asdict, dataclass, field, fields, replace


@dataclass
class SViTTConfig:
    preset: str = "tiny"               # name of the preset this config came from
    # video encoder f_v (BEiT-style ViT)
    frames: int = 4                    # T, frames per clip
    image_size: int = 112              # input side in pixels
    patch_size: int = 16               # patches of 16 x 16 pixels (BEiT's patch embedding, Eq. 1)
    space_time_conv: int = 64          # hidden width of a residual 3 x 3 x 3 convolution over the
                                       # patch tokens (model.SpaceTimeConv) for a ViT trained from
                                       # scratch; 0: none (the paper's, base)
    vision_width: int = 128            # d, token width (MLP hidden width 4 d)
    vision_layers: int = 12            # L_v
    vision_heads: int = 2              # attention heads (64 wide each)
    layer_scale: float = 0.1           # BEiT's LayerScale initial value (0 disables it)
    abs_pos_embed: bool = True         # absolute 3D position embedding (Eq. 20-22); trained from
                                       # scratch it starts as sine-cosine (model.sincos_pos_embed)
    rel_pos_bias: bool = True          # relative position bias over (t, h, w) (Eq. 24-27)
    drop_path: float = 0.0             # stochastic depth of the last block (0 at the first, linear
                                       # between, as BEiT); the BEiT checkpoint's config has 0.1
    video_pooling: str = "cls"         # the video's VTC feature: its class token ("cls", Sec. A.3),
                                       # or BEiT's pooler, a LayerNorm of the mean of the regional
                                       # tokens ("mean", the authors' code)
    # input normalisation of the frames, per RGB channel: the vision backbone's (ImageNet's here)
    image_mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])
    horizontal_flip: bool = False      # flip training clips at random (contradicts left/right)
    # training crops: a random resized crop covering this range of the frame's area (Singularity's
    # (0.5, 1)); [1.0, 1.0] trains on whole frames, resized as at test time
    crop_scale: list = field(default_factory=lambda: [1.0, 1.0])
    # edge sparsity (Sec. 3.2); block_size None means dense attention
    block_size: int = 14               # G, tokens per block
    local_blocks: int = 1              # K_l
    random_blocks: int = 3             # K_r
    # node sparsity (Sec. 3.3)
    keep_rate_v: float = 0.7           # q_v
    # visual layers (1-based) that prune
    prune_after: list = field(default_factory=lambda: [4, 7, 10])
    keep_rate_m: float = 0.1           # q_m
    multimodal_prune_after: int = 1    # multimodal layer (1-based) after which q_m prunes; 0: never
    # text and multimodal encoders (BERT)
    text_model: str = "all-MiniLM-L6-v2"  # from_pretrained name or folder; see pretrained.py
    text_layers: int = 3               # BERT layers of f_t
    multimodal_layers: int = 3         # L_m, BERT layers of f_m (get cross-attention)
    text_len: int = 32                 # N_t, tokens per caption
    text_pooling: str = "mean"         # what stands for a caption in VTC and Eq. 12: its class
                                       # token ("cls"), or the mean of its tokens ("mean") for text
                                       # encoders trained that way (MiniLM). VTM reads f_m's class
                                       # token either way (Sec. A.3)
    text_config: dict = field(default_factory=dict)  # the BERT config, filled in when built
    # heads and losses
    embed_dim: int = 256               # joint space of VTC
    temperature: float = 0.07          # initial tau of Eq. 29 (learned)
    vtc_directions: str = "sum"        # Eq. 28 sums video-to-text and text-to-video; "mean": their
                                       # mean (the authors' code: half the VTC weight)
    vtc_gather: bool = True            # VTC negatives from all ranks' clips (Eq. 29 over the batch
                                       # B of Table 9); False: each GPU's own (the authors' code)
    hard_negatives: bool = False       # VTM negatives drawn by VTC similarity (Singularity, ALBEF)
                                       # or uniformly (False)
    vtm_negative_videos: bool = False  # Eq. 30: each clip with a negative caption (2B pairs); True
                                       # adds each caption with a negative clip (3B, authors' code)
    vtm_score: str = "log_softmax"     # retrieval re-ranking by log p(match) ("log_softmax") or the
                                       # match logit ("logit", the authors' code)
    mlm_probability: float = 0.15      # share of caption tokens masked for MLM (Eq. 31)
    lr_floor: float = 0.0              # the cosine schedule ends at lr_floor x the peak rate
    # transformers BEiT folder to initialise f_v from ("" = random)
    beit_checkpoint: str = ""

    def __post_init__(self):
        for name, allowed in (("text_pooling", ("cls", "mean")), ("video_pooling", ("cls", "mean")),
                              ("vtc_directions", ("sum", "mean")),
                              ("vtm_score", ("log_softmax", "logit"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"config {name}={getattr(self, name)!r}: choose one of {allowed}")

    @property
    def grid(self):
        return self.image_size // self.patch_size  # H' = W'

    @property
    def num_tokens(self):
        return self.frames * self.grid ** 2 + 1  # N = T H' W' + 1 (Eq. 1)

    def to_dict(self):
        return {**asdict(self), "version": VERSION}

    @classmethod
    def from_dict(cls, d):
        """The config of a checkpoint. In one written before VERSION 2, fields it lacks take what
        it was trained with (WRITTEN_BEFORE); fields this version no longer has are dropped where
        the checkpoint holds what the code now always does (REMOVED), and refused otherwise."""
        d = dict(d)
        if d.pop("version", 1) < 2:
            d = {**WRITTEN_BEFORE, **d}
            if "vtm_pooling" not in d and d["text_pooling"] != "cls":
                raise ValueError("the checkpoint predates vtm_pooling: its VTM head read the mean "
                                 "of f_m's tokens, and this version reads f_m's class token "
                                 "(Sec. A.3)")
        for name, value in REMOVED.items():
            if name not in d:
                continue
            held = d.pop(name)
            if name == "vtm_pooling" and held is None:  # VTM read text_pooling's summary
                held = d.get("text_pooling")
            if value is not None and held != value:  # None: any value loads
                raise ValueError(f"the checkpoint was trained with {name}={held!r}, an option this "
                                 f"version no longer has (it always uses {value!r})")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"config has keys this version does not know: {unknown}")
        return cls(**d)


VERSION = 2  # of the fields: 2 since the tiny preset's values became the defaults
# what checkpoints written before a field (or before the tiny preset's values became the
# defaults) trained with
WRITTEN_BEFORE = {"crop_scale": [0.5, 1.0], "space_time_conv": 0, "text_pooling": "cls",
                  "hard_negatives": True}
# options tried and removed (docs/experiments.md), with the one value the code keeps; the initial
# value of the absolute embedding no longer matters once a checkpoint holds its weights
REMOVED = {"stem": "patch", "space_time_kernel": [3, 3, 3], "space_time_out_kernel": [3, 3, 3],
           "mlp_ratio": 4.0, "vtm_pooling": "cls", "vtm_group_negatives": False,
           "vtm_group_share": 0.0, "pos_embed_init": None}


def preset(name, **overrides):
    """'base': the paper's model (BEiT-B/16 at 224 px, BERT-base 9 + 3 layers, G = 56).
    'tiny' (the field defaults): the CPU default, the paper's ratios at 112 px (7 x 7 patches a
    frame, G = 14, a block 2/7 of a frame as 56 is of 14 x 14) with the pretrained MiniLM text
    encoder (3 + 3 layers). docs/recipe.md compares each choice with the paper and the authors'
    code."""
    if name == "base":
        # where the paper is silent, the authors' recipe: BEiT's normalisation (mean and std 0.5),
        # its stochastic depth, MLM masking half the tokens, flips, crops of half the frame or
        # more, VTM negatives by similarity and a cosine to 1% of the peak
        config = SViTTConfig(preset="base", image_size=224, space_time_conv=0, vision_width=768,
                             vision_heads=12, abs_pos_embed=False, block_size=56,
                             text_model="bert-base-uncased", text_layers=9, multimodal_layers=3,
                             text_pooling="cls", drop_path=0.1, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5], horizontal_flip=True,
                             crop_scale=[0.5, 1.0], hard_negatives=True, mlm_probability=0.5,
                             lr_floor=0.01, vtm_score="logit")
    elif name == "tiny":
        # all-MiniLM-L6-v2 was trained with mean pooling: its class token barely depends on the
        # caption (cosine 0.9999 between captions), so VTC reads the mean of its tokens.
        # The video encoder, trained from scratch, keeps BEiT's LayerScale (0.1): without it a
        # component shared by all tokens grows in its residual stream within 50 steps until the
        # final LayerNorm leaves every token of a clip the same vector (metrics.token_spread).
        # It trains on whole frames: a crop of half the area keeps both objects' whole paths in
        # 14% of the synthetic clips and cuts one end of a path in 40%, so the caption would say
        # what the clip no longer shows. VTM negatives are drawn uniformly (Eq. 30): once VTC
        # knows colours and shapes, similarity picks the same scene played backwards, which a few
        # minutes of training cannot yet tell apart. The residual space-time convolution lets the
        # from-scratch encoder compare each place with its neighbours in the frames before and
        # after from the first step: without it neither stage tells a clip from its reversal
        config = SViTTConfig()
    else:
        raise ValueError(f"unknown preset {name!r}: choose 'base' or 'tiny'")
    return replace(config, **overrides)
