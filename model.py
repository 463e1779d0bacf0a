"""SViTT: the sparse video-text transformer (Sec. 3.4, 5.1, A.1, A.3; Fig. 2).

Three encoders and three losses:

* video encoder f_v: a BEiT-style ViT over T frames (Eq. 1-4). Tokens of all frames are flattened
  time-major after one class token; an absolute position embedding inflated from 2D to 3D
  (Eq. 20-22) and a relative position bias over (t, h, w) offsets (Eq. 24-27). Its blocks attend
  with edge sparsity (`sparse_attention.py`, Eq. 5-9) and prune tokens after layers 4, 7 and 10
  (`token_pruning.py`, Eq. 10-11);
* text encoder f_t: the first layers of a BERT loaded with `transformers`;
* multimodal encoder f_m: the last L_m = 3 BERT layers, each with bidirectional self-attention,
  cross-attention from text to video tokens, and the FFN; after its first layer the video tokens
  are cut to ceil(q_m n) by the text class token's attention (Eq. 12-13);
* losses with equal weights (Sec. A.3): VTC (Eq. 28-29), VTM (Eq. 30), MLM (Eq. 31).

Usage (the config and its presets are in `config.py`)::

    config = preset("tiny", frames=4)    # or preset("base", frames=8, beit_checkpoint=...)
    model = SViTT(config)
    out = model(batch)                              # batch from collate.make_collate
    out["loss"].backward()

Pretrained BERT and BEiT weights are loaded by `pretrained.py`; the MLP, dropout and BERT attention
with dropout come from `cpu_speedups.py`, which computes them as the plain layers would, only
faster on a CPU (and the MLP in less memory).
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from config import SViTTConfig, preset  # noqa: F401 (re-exported for `from model import ...`)
from cpu_speedups import Dropout, Mlp, attention_with_dropout
from from_scratch import SpaceTimeConv, sincos_pos_embed
from pretrained import beit_normalisation, load_beit, load_bert, load_bert_layer
from sparse_attention import SparseSelfAttention
from token_pruning import class_attention_scores, keep_tokens, text_to_video_scores

# --------------------------------------------------------------------------------------------
# Video encoder f_v
# --------------------------------------------------------------------------------------------

class RelativePositionBias(nn.Module):
    """Eq. 24-27: a learned scalar per head for every (t, h, w) offset between query and key.

    The table R' (2T - 1, 2H - 1, 2W - 1, heads) is indexed by query minus key offsets, as BEiT
    indexes its 2D table (Eq. 25-26 write key minus query; the table is the same up to a flip).
    Three more scalars per head hold class-to-token, token-to-class and class-to-class, as in BEiT.
    `bias(index)` returns the function `sparse_attention` asks: given token positions of the
    current (possibly pruned) sequence it looks up their original (t, h, w) through `index` and
    returns (B, H, ...) biases, only for the edges asked.
    """

    def __init__(self, frames, grid, heads):
        super().__init__()
        self.frames, self.grid = frames, grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros(2 * frames - 1, 2 * grid - 1,
                                                                     2 * grid - 1, heads))
        self.cls_bias = nn.Parameter(torch.zeros(3, heads))  # cls->token, token->cls, cls->cls

    def bias(self, index):
        """index (B or 1, L): original token number (0 = class token) of each current token;
        (1, L) while no token has been pruned, so one bias serves the whole batch."""
        T, S = self.frames, self.grid
        # one flat table: the (t, h, w) offsets, then the three class-token entries
        # (P + 3, heads)
        table = torch.cat([self.relative_position_bias_table.flatten(0, 2), self.cls_bias])
        P = table.shape[0] - 3

        def lookup(query_pos, key_pos):
            # (B, ...) regional numbers, -1 = class
            q, k = index[:, query_pos] - 1, index[:, key_pos] - 1
            # (t, h, w) of regional token i: i = (t S + h) S + w; Eq. 26 offsets, shifted to >= 0
            dt = q // (S * S) - k // (S * S) + T - 1
            dh = (q // S) % S - (k // S) % S + S - 1
            dw = q % S - k % S + S - 1
            flat = (dt * (2 * S - 1) + dh) * (2 * S - 1) + dw
            q_cls, k_cls = q < 0, k < 0
            flat = torch.where(q_cls, P, torch.where(k_cls, P + 1, flat))
            flat = torch.where(q_cls & k_cls, P + 2, flat)
            # index_select, not F.embedding: its backward adds rows without sorting the indices
            # (B, heads, ...)
            return table.index_select(0, flat.flatten()).view(*flat.shape, -1).movedim(-1, 1)
        return lookup


def drop_path(x, rate, training):
    """Stochastic depth: each clip's residual branch x (B, ...) is dropped with probability `rate`
    and the kept ones scaled by 1 / (1 - rate), in training only."""
    if not training or rate == 0:
        return x
    keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class VisionBlock(nn.Module):
    """A pre-norm transformer block (Eq. 3) with sparse attention, BEiT's LayerScale and
    stochastic depth (`drop_path`, this block's rate)."""

    def __init__(self, config, drop_path=0.0):
        super().__init__()
        self.drop_path = drop_path
        d = config.vision_width
        self.norm1 = nn.LayerNorm(d, eps=1e-12)
        self.attn = SparseSelfAttention(dim=d, num_heads=config.vision_heads,
                                        block_size=config.block_size,
                                        local_blocks=config.local_blocks,
                                        random_blocks=config.random_blocks)
        self.norm2 = nn.LayerNorm(d, eps=1e-12)
        self.mlp = Mlp(d, 4 * d)  # Linear -> GELU -> Linear, GELU recomputed in backward
        scale = config.layer_scale if config.layer_scale > 0 else 1.0
        self.lambda_1 = nn.Parameter(torch.full((d,), scale), requires_grad=config.layer_scale > 0)
        self.lambda_2 = nn.Parameter(torch.full((d,), scale), requires_grad=config.layer_scale > 0)
        self.rel_pos = RelativePositionBias(config.frames, config.grid,
                                            config.vision_heads) if config.rel_pos_bias else None

    def forward(self, x, index, generator=None):
        bias = self.rel_pos.bias(index) if self.rel_pos is not None else None
        attn_out, cls_attn = self.attn(self.norm1(x), bias=bias, generator=generator)
        edges = self.attn.edges(x.shape[1])  # Eq. 17
        x = x + drop_path(self.lambda_1 * attn_out, self.drop_path, self.training)
        x = x + drop_path(self.lambda_2 * self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x, cls_attn, edges


class VideoEncoder(nn.Module):
    """f_v: patch embedding, 3D positions, sparse blocks with token pruning (Eq. 1-11)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d = config.vision_width
        # Eq. 1: a linear map of each frame's p x p patches (BEiT's)
        self.patch_embed = nn.Conv2d(3, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.space_time_conv = (SpaceTimeConv(d, config.space_time_conv)
                                if config.space_time_conv else None)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Eq. 21: P' (1 + T H W, d); used only when abs_pos_embed is set
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens,
                                                  d)) if config.abs_pos_embed else None
        L = config.vision_layers
        rates = [config.drop_path * i / max(L - 1, 1) for i in range(L)]  # 0 ... drop_path
        self.blocks = nn.ModuleList(VisionBlock(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(d, eps=1e-12)  # over all tokens, for f_m (and the class token)
        # BEiT's pooler: a LayerNorm of the mean of the regional tokens before `norm`
        self.pool_norm = nn.LayerNorm(d, eps=1e-12) if config.video_pooling == "mean" else None
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:  # BEiT's weights replace it where they hold one
            with torch.no_grad():
                self.pos_embed[0, 1:] = sincos_pos_embed(config.frames, config.grid, d)

    def forward(self, video, generator=None, record=None):
        """video (B, T, 3, S, S) -> tokens (B, 1 + N', d), their original numbers (B, 1 + N') and
        the clip's summary (B, d) for VTC: the class token, or the pooler's (video_pooling)."""
        B, T = video.shape[:2]
        assert T == self.config.frames, \
            f"the model takes {self.config.frames} frames, the clip has {T}"
        x = self.patch_embed(rearrange(video, "b t c h w -> (b t) c h w"))  # (B T, d, H', W')
        x = rearrange(x, "(b t) d h w -> b d t h w", b=B)
        if self.space_time_conv is not None:
            x = self.space_time_conv(x)
        x = rearrange(x, "b d t h w -> b (t h w) d")  # Eq. 1: time-major flattening
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        # (1, 1 + N): the same for every clip until pruned
        index = torch.arange(x.shape[1], device=x.device)[None]
        for layer, block in enumerate(self.blocks, start=1):
            tokens = x.shape[1]
            x, cls_attn, edges = block(x, index, generator)  # Eq. 2-9
            if record is not None:
                record["visual_tokens"].append(tokens)
                record["visual"].append(edges)
            if layer in self.config.prune_after:  # Eq. 10-11, at the end of the layer
                x, kept = keep_tokens(x, class_attention_scores(cls_attn), self.config.keep_rate_v)
                index = index.expand(B, -1).gather(1, kept)  # (B, kept)
        out = self.norm(x)
        pooled = out[:, 0] if self.pool_norm is None else self.pool_norm(x[:, 1:].mean(1))
        return out, index.expand(B, -1), pooled


# --------------------------------------------------------------------------------------------
# Text encoder f_t and multimodal encoder f_m (BERT layers with bidirectional attention)
# --------------------------------------------------------------------------------------------

class BertAttention(nn.Module):
    """BERT's multi-head attention with its post-norm residual; keys and values may come from
    another modality (cross-attention). Returns the probabilities too when asked (Eq. 12)."""

    def __init__(self, width, heads, kv_width=None, eps=1e-12, dropout=0.1):
        super().__init__()
        kv_width = kv_width or width
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key, self.value = nn.Linear(kv_width, width), nn.Linear(kv_width, width)
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, x, context=None, mask=None, return_probs=False):
        """x (B, L, C); context (B, M, C_kv) or None (self-attention); mask additive
        (B, 1, 1, M)."""
        context = x if context is None else context
        q = rearrange(self.query(x), "b l (h d) -> b h l d", h=self.heads)
        k = rearrange(self.key(context), "b m (h d) -> b h m d", h=self.heads)
        v = rearrange(self.value(context), "b m (h d) -> b h m d", h=self.heads)
        if return_probs:  # the plain path (L x M is small here): Eq. 12 needs the weights
            probs = torch.einsum("bhld,bhmd->bhlm", q, k) * q.shape[-1] ** -0.5
            probs = (probs if mask is None else probs + mask).softmax(dim=-1)
            out = torch.einsum("bhlm,bhmd->bhld", self.dropout(probs), v)
        else:  # the same with a fused kernel (the plain math while training on the CPU)
            probs = None
            out = attention_with_dropout(q, k, v, mask, self.dropout)
        out = self.dropout(self.dense(rearrange(out, "b h l d -> b l (h d)")))
        return self.norm(x + out), probs


class BertBlock(nn.Module):
    """One BERT layer: self-attention, [cross-attention to video,] FFN. Bidirectional: no causal
    mask (transformers' BertLayer with cross-attention insists on a causal decoder)."""

    def __init__(self, text_config, video_width=None):
        super().__init__()
        w, h = text_config["hidden_size"], text_config["num_attention_heads"]
        eps = text_config["layer_norm_eps"]
        p = text_config["attention_probs_dropout_prob"]
        self.attention = BertAttention(w, h, eps=eps, dropout=p)
        self.crossattention = BertAttention(w, h, kv_width=video_width, eps=eps,
                                            dropout=p) if video_width else None
        self.intermediate = nn.Linear(w, text_config["intermediate_size"])
        self.output = nn.Linear(text_config["intermediate_size"], w)
        self.output_norm = nn.LayerNorm(w, eps=eps)
        self.dropout = Dropout(text_config["hidden_dropout_prob"])

    def forward(self, x, mask, video=None, return_probs=False):
        x, _ = self.attention(x, mask=mask)
        probs = None
        if self.crossattention is not None:
            x, probs = self.crossattention(x, context=video, return_probs=return_probs)
        x = self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))
        return x, probs


def full_precision(x):
    """A block that computes in fp32 whatever autocast is on for x's device (a no-op where
    autocast does not exist, as on the meta device the cost counter uses)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def extended_mask(attention_mask, dtype):
    """(B, L) 1/0 padding mask -> additive (B, 1, 1, L) mask for attention."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class SViTT(nn.Module):
    def __init__(self, config, pretrained=True):
        """pretrained: load BERT (and BEiT, if config.beit_checkpoint) weights with from_pretrained.
        With False the architecture comes from config.text_config alone (resuming a checkpoint)."""
        super().__init__()
        bert = load_bert(config, pretrained)
        text_config = bert.config.to_dict()
        assert config.text_layers + config.multimodal_layers <= text_config["num_hidden_layers"], \
            f"{config.text_model} has {text_config['num_hidden_layers']} layers, the config asks " \
            f"for {config.text_layers} text + {config.multimodal_layers} multimodal"
        config.text_config = {k: text_config[k] for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "pad_token_id")}
        self.config = config

        self.video_encoder = VideoEncoder(config)
        self.embeddings = bert.bert.embeddings  # BERT's word, position and type embeddings
        self.embeddings.dropout = Dropout(self.embeddings.dropout.p)
        self.text_layers = nn.ModuleList(BertBlock(text_config) for _ in range(config.text_layers))
        self.multimodal_layers = nn.ModuleList(BertBlock(text_config,
                                                         video_width=config.vision_width)
                                               for _ in range(config.multimodal_layers))
        self.mlm_head = bert.cls  # BERT's MLM head, decoder tied to the word embeddings (Eq. 31)
        width = text_config["hidden_size"]
        # VTC projections (Eq. 28)
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)))  # 1 / tau
        self.vtm_head = nn.Linear(width, 2)  # Eq. 30

        # initialise BERT layers from the pretrained weights: f_t from the first layers, f_m from
        # the last (its cross-attention is new, as in Singularity)
        state = bert.bert.state_dict()
        for i, layer in enumerate([*self.text_layers, *self.multimodal_layers]):
            load_bert_layer(layer, state, f"encoder.layer.{i}.")
        if config.beit_checkpoint and pretrained:
            load_beit(self.video_encoder, config.beit_checkpoint)
            # the frames are normalised as the BEiT weights were trained: its preprocessor
            # config's statistics when it has one (the preset's otherwise); checkpoints record them
            stats = beit_normalisation(config.beit_checkpoint)
            if stats is not None:
                config.image_mean, config.image_std = stats

    # ---- encoders ------------------------------------------------------------------------
    def encode_video(self, video, generator=None, record=None):
        """-> tokens (B, 1 + N', d), their original numbers (B, 1 + N'), normalised features
        (B, e), in fp32 under any autocast (`similarity`)."""
        tokens, index, pooled = self.video_encoder(video, generator, record)
        with full_precision(pooled):
            return tokens, index, F.normalize(self.vision_proj(pooled.float()), dim=-1)

    def encode_text(self, input_ids, attention_mask):
        """f_t -> hidden states (B, L, C) and normalised features (B, e) of the class token
        (Eq. 28), in fp32 under any autocast (`similarity`)."""
        x = self.embeddings(input_ids=input_ids)
        mask = extended_mask(attention_mask, x.dtype)
        for layer in self.text_layers:
            x, _ = layer(x, mask)
        pooled = self.pool(x, attention_mask)
        with full_precision(pooled):
            return x, F.normalize(self.text_proj(pooled.float()), dim=-1)

    def similarity(self, a, b):
        """Eq. 29's logits s(a_i, b_j) / tau for unit features a (M, e) and b (N, e) -> (M, N), in
        fp32 under any autocast: at the temperature's bound (1 / tau = 100) bf16's spacing near 100
        is 0.5, so bf16 logits would be rounded to half a unit before the softmax. The features
        come in fp32 too (`encode_video`, `encode_text`): a bf16 unit vector's cosines are off by
        up to ~0.004, 0.4 of a logit at that scale."""
        with full_precision(a):
            scale = self.logit_scale.float().clamp(max=math.log(100)).exp()
            return a.float() @ b.float().T * scale

    def pool(self, x, attention_mask):
        """A caption's VTC summary: its class token, or the mean of its tokens (text_pooling)."""
        if self.config.text_pooling == "mean":
            weights = attention_mask[:, :, None].to(x.dtype)
            return (x * weights).sum(1) / weights.sum(1)
        return x[:, 0]

    def fuse(self, text, attention_mask, video, record=None, return_kept=False):
        """f_m: text states (B, L, C) attend to video tokens (B, 1 + n, d); Eq. 12-13 after the
        configured layer cut the video tokens to ceil(q_m n) by the text class token's attention.
        With return_kept, also the positions (B, n') in `video` of the tokens that were kept."""
        mask = extended_mask(attention_mask, text.dtype)
        x = text
        kept = torch.arange(video.shape[1], device=video.device).expand(video.shape[0], -1)
        for layer_number, layer in enumerate(self.multimodal_layers, start=1):
            prune = layer_number == self.config.multimodal_prune_after
            if record is not None:
                record["multimodal_tokens"].append(video.shape[1])
                record["multimodal"].append(video.shape[1] * text.shape[1])  # Eq. 18
            x, probs = layer(x, mask, video=video, return_probs=prune)
            if prune:
                # the caption's mean query stands in for its class token
                if self.config.text_pooling == "mean":
                    weights = attention_mask[:, None, :, None].to(probs.dtype)
                    probs = (probs * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True)
                video, kept = keep_tokens(video, text_to_video_scores(probs),
                                          self.config.keep_rate_m)
        return (x, kept) if return_kept else x

    def match_logits(self, text, attention_mask, video, record=None):
        """VTM logits (B, 2) for (text, video) pairs: the head on f_m's class token (Sec. A.3).
        Also where VTC reads MiniLM's mean: the mean is what the caption says, which
        cross-attention barely moves, while the class token is free to become the match summary
        (read as the mean, the tiny preset's VTM loss stayed at ln 2)."""
        return self.vtm_head(self.fuse(text, attention_mask, video, record)[:, 0])

    # ---- training forward ----------------------------------------------------------------
    def forward(self, batch, generator=None):
        """batch: video (B, T, 3, S, S), input_ids, attention_mask, mlm_input_ids, mlm_labels,
        video_id. `generator` draws the random attention blocks (evaluation seeds it so that a score
        can be reproduced); VTM negatives come from torch's global generator. Returns a dict with
        loss, loss_vtc, loss_vtm, loss_mlm and `record`, the tokens entering and edges computed (per
        clip and head) of every visual and multimodal layer."""
        record = {"visual_tokens": [], "visual": [], "multimodal_tokens": [], "multimodal": []}
        video_tokens, _, video_feat = self.encode_video(batch["video"], generator, record)
        text, text_feat = self.encode_text(batch["input_ids"], batch["attention_mask"])

        # VTC (Eq. 28-29); negatives from all ranks' clips under torch.distributed (vtc_gather)
        gather = gather_all if self.config.vtc_gather else (lambda x: x)
        all_video, all_text = gather(video_feat), gather(text_feat)
        all_ids = gather(batch["video_id"])
        sim_v2t = self.similarity(video_feat, all_text)  # (B, B_all), fp32
        sim_t2v = self.similarity(text_feat, all_video)
        # captions of one video are positives of each other, never negatives
        positive = (batch["video_id"][:, None] == all_ids[None, :]).float()
        target = positive / positive.sum(1, keepdim=True)
        # Eq. 28 sums the two directions (vtc_directions="mean" halves it); each term is averaged
        # over the batch
        loss_vtc = (-(sim_v2t.log_softmax(1) * target).sum(1).mean()
                    - (sim_t2v.log_softmax(1) * target).sum(1).mean())
        if self.config.vtc_directions == "mean":
            loss_vtc = loss_vtc / 2

        # VTM (Eq. 30): each clip with its caption, and with one other caption i' as a negative;
        # with vtm_negative_videos also each caption with one other clip as a negative
        B = video_feat.shape[0]
        assert B > 1, "VTM draws negatives from the batch: use a batch of at least 2 clips"
        with torch.no_grad():
            same_video = batch["video_id"][:, None] == batch["video_id"][None, :]
            if self.config.hard_negatives:  # drawn by VTC similarity, as Singularity and ALBEF do
                weights = self.similarity(video_feat, text_feat).softmax(1)  # (clip, caption)
                weights_t2v = self.similarity(text_feat, video_feat).softmax(1)  # (caption, clip)
            else:  # drawn uniformly
                weights = weights_t2v = torch.ones_like(same_video, dtype=video_feat.dtype)
            # never the clip's own caption nor another caption of its video, unless nothing else is
            # there
            fallback = 1e-12 * ~torch.eye(B, dtype=torch.bool, device=same_video.device)
            negative = torch.multinomial(weights.masked_fill(same_video, 0) + fallback, 1)[:, 0]
            if self.config.vtm_negative_videos:
                negative_video = torch.multinomial(
                    weights_t2v.masked_fill(same_video, 0) + fallback, 1)[:, 0]
        mask = batch["attention_mask"]
        texts, masks, videos = [text, text[negative]], [mask, mask[negative]], [video_tokens] * 2
        if self.config.vtm_negative_videos:
            texts.append(text)
            masks.append(mask)
            videos.append(video_tokens[negative_video])
        masks = torch.cat(masks)
        logits = self.match_logits(torch.cat(texts), masks, torch.cat(videos), record)
        vtm_labels = torch.zeros(len(texts) * B, dtype=torch.long, device=logits.device)
        vtm_labels[:B] = 1
        loss_vtm = F.cross_entropy(logits, vtm_labels)

        if "mlm_labels" not in batch:  # retrieval fine-tuning (Sec. 5): VTC and VTM only
            return {"loss": loss_vtc + loss_vtm, "loss_vtc": loss_vtc, "loss_vtm": loss_vtm,
                    "record": record}

        # MLM (Eq. 31): masked captions through f_t and f_m with the clip, BERT's MLM head. The
        # head's vocabulary-sized output is computed at the masked positions J only.
        masked, _ = self.encode_text(batch["mlm_input_ids"], batch["attention_mask"])
        hidden = self.fuse(masked, batch["attention_mask"], video_tokens)
        labels = batch["mlm_labels"]
        selected = labels != -100  # (B, L), the set J
        if selected.any():
            logits = self.mlm_head(hidden[selected]).float()  # (|J|, vocabulary)
            # the labels' device: the cost counter runs the model on the meta device with real
            # labels
            loss_mlm = F.cross_entropy(logits, labels[selected].to(logits.device))
        else:  # a batch with no masked token: no MLM signal, but keep the graph whole
            loss_mlm = hidden.sum() * 0.0

        loss = loss_vtc + loss_vtm + loss_mlm  # equal weights (Sec. A.3)
        return {"loss": loss, "loss_vtc": loss_vtc, "loss_vtm": loss_vtm, "loss_mlm": loss_mlm,
                "record": record}


def gather_all(x):
    """All ranks' x concatenated, with gradients to the local part; x itself when not
    distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        import torch.distributed.nn.functional as dist_nn
        return torch.cat(dist_nn.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())
