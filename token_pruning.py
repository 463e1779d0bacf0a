"""Node sparsity: keep the tokens the class token attends to most (SViTT Sec. 3.3, Eq. 10-13).

Visual pruning (Eq. 10-11): after a video encoder layer, rank the N regional tokens by the class
token's attention a(z_i) (Eq. 10) and keep ceil(qN) tokens. Cross-modal pruning (Eq. 12-13): in the
multimodal encoder, rank the video tokens by the attention of the *text* class token instead,
which lets the caption choose the patches that matter.

Conventions (see DESIGN.md): N counts the class token, the class token is always kept and counts
in ceil(qN), and kept tokens stay in their original order so that blocks of the sparse attention
stay local in space and time. The index of the kept tokens is returned so that positions,
coordinates and masks can follow them.

Usage::

    x, index = keep_tokens(x, cls_attn.mean(1), keep_rate=0.7)        # Eq. 11, x: (B, 1 + N, C)
    scores = text_to_video_scores(cross_probs)                        # Eq. 12
    video, index = keep_tokens(video, scores, keep_rate=0.1)          # Eq. 13

The file imports only torch, so it can be copied into another project alone.
"""
import math

import torch


def num_kept(num_tokens, keep_rate):
    """ceil(q N) for N tokens (class token included); guards against q N = 7.000000000000001."""
    return min(num_tokens, max(1, math.ceil(keep_rate * num_tokens - 1e-6)))


def check_keep_rate(keep_rate):
    """A keep rate q is a share of the tokens, 0 < q <= 1 (Table 9: 0.7, 0.6, 0.5 and 0.1);
    anything else (70 for 70%, 0, a negative number) is a ValueError naming it."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) \
            or not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate {keep_rate!r}: must be a share of the tokens, "
                         f"0 < keep_rate <= 1 (0.7 keeps 70%)")


def keep_tokens(x, scores, keep_rate):
    """Eq. 11 / 13: keep the class token and the highest-scoring regional tokens, in order.

    x: (B, 1 + N, C) with the class token at 0; scores: (B, N), one per regional token.
    Keeps ceil(keep_rate * (1 + N)) tokens in all, the class token among them. (Eq. 11 read alone
    would keep ceil(q N) regional tokens plus the class token; counting the class token in N, as
    Eq. 17 does, reproduces Table 1's 3.97M edges, the other reading gives 3.98M.)

    Returns (kept, index): kept (B, K, C) and index (B, K), the positions of the kept tokens in x
    (index[:, 0] == 0), sorted so the kept tokens keep their original order.
    """
    check_keep_rate(keep_rate)
    if x.ndim != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}: keep_tokens takes (B, 1 + N, C) tokens, "
                         f"the class token first")
    B, L, C = x.shape
    if tuple(scores.shape) != (B, L - 1):
        raise ValueError(f"scores has shape {tuple(scores.shape)}: one score per regional token, "
                         f"(B, N) = {(B, L - 1)} for x of shape {tuple(x.shape)}")
    keep = num_kept(L, keep_rate)
    if keep == L:
        index = torch.arange(L, device=x.device).expand(B, L)
        return x, index
    with torch.no_grad():  # the choice of tokens is not differentiated
        top = scores.topk(keep - 1, dim=1).indices + 1  # regional positions in x: (B, K - 1)
        index = torch.cat([top.new_zeros(B, 1), top.sort(dim=1).values], dim=1)  # (B, K)
    kept = x.gather(1, index[:, :, None].expand(B, keep, C))
    return kept, index


def class_attention_scores(cls_attn):
    """Eq. 10: the class token's attention over the regional tokens, averaged over heads.

    cls_attn: (B, H, N) attention weights of the class-token query -> (B, N). The softmax in Eq. 10
    runs over the regional tokens only; weights normalised over 1 + N keys differ from it by one
    positive factor per head, which leaves the ranking of a single head unchanged.
    """
    return cls_attn.mean(dim=1)


def text_to_video_scores(cross_probs):
    """Eq. 12: the text class token's cross-attention over the video tokens, averaged over heads.

    cross_probs: (B, H, L_text, 1 + N) attention probabilities of text queries over video keys
    (video class token at key position 0) -> (B, N) scores of the regional video tokens.
    """
    return cross_probs[:, :, 0, 1:].mean(dim=1)


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.arange(11.0).view(1, 11, 1)  # a class token and 10 regional tokens
    scores = torch.rand(1, 10)
    kept, index = keep_tokens(x, scores, keep_rate=0.5)
    print("scores:", [round(s, 2) for s in scores[0].tolist()])
    print(f"keep ceil(0.5 * 11) = {num_kept(11, 0.5)} tokens:", index[0].tolist())
