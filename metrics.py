"""Retrieval metrics (Sec. 5): recall at 1, 5 and 10, group (temporal) accuracy, and the spread
of the joint space. Pure functions of score matrices and features; `eval.py` computes those with
the model and reports these.

    recall = retrieval_metrics(sim, sim, text_video)        # {"t2v_R@1": ..., "v2t_mean": ...}
    accuracy = group_accuracy(sim, text_video, video_groups)  # percent, or None without groups
    wins = rival_wins(sim, text_video, {"reversal": rival_of_each_video})  # {"reversal": percent}

A tie with the right item counts against it, so a constant score gets no credit (in rival_wins,
a comparison of two, it counts as half: a constant score is at chance there).
"""
import torch


def retrieval_metrics(t2v, v2t, text_video):
    """R@1/5/10 and mean, in percent, from score matrices (texts, videos).

    text_video: the video of each caption (texts,), or a bool ground-truth matrix (texts, videos)
    when a caption has several right videos (downstream_data.RetrievalDataset). Text-to-video:
    a caption's rank is the number of wrong videos scoring at least its best-scored right video
    (a tie counts against it). Video-to-text: a video's rank is that of its best caption, counting
    the other captions that score at least as high."""
    if text_video.dim() == 1:
        gt = torch.zeros(t2v.shape, dtype=torch.bool)
        gt[torch.arange(len(text_video)), text_video] = True
    else:
        gt = text_video
    best_video = t2v.masked_fill(~gt, float("-inf")).max(1).values
    t2v_rank = ((t2v >= best_video[:, None]) & ~gt).sum(1)
    own, scores = gt.T, v2t.T  # (videos, texts)
    best = scores.masked_fill(~own, float("-inf")).max(1).values
    v2t_rank = ((scores >= best[:, None]) & ~own).sum(1)[own.any(1)]  # videos with a caption
    metrics = {}
    for name, rank in (("t2v", t2v_rank), ("v2t", v2t_rank)):
        recalls = [100.0 * (rank < r).float().mean().item() for r in (1, 5, 10)]
        metrics.update({f"{name}_R@1": recalls[0], f"{name}_R@5": recalls[1],
                        f"{name}_R@10": recalls[2],
                        f"{name}_mean": sum(recalls) / 3})
    return metrics


def group_pairs(text_video, video_groups):
    """(text, video) pairs of every caption with each video of its video's group, as (P, 2)."""
    members = {}
    for video, group in enumerate(video_groups):
        if group is not None:
            members.setdefault(group, []).append(video)
    return torch.tensor([(t, v) for t, own in enumerate(text_video.tolist())
                         for v in members.get(video_groups[own], [])],
                        dtype=torch.long).view(-1, 2)


def group_accuracy(scores, text_video, video_groups):
    """Percent of captions whose video scores above every other video of its group (a tie counts
    against it); None when no video has a group. scores (texts, videos).

    A group holds videos that differ only in what a temporal benchmark probes: the synthetic
    scenes' four clips are a clip, its reversal, its events swapped and that reversed. A model
    blind to order cannot tell a clip from its reversal: chance is 25%, and such a model is
    capped near 50%."""
    pairs = group_pairs(text_video, video_groups)
    if len(pairs) == 0:
        return None
    texts, videos = pairs.T
    own = scores[texts, text_video[texts]]
    beaten = (scores[texts, videos] >= own) & (videos != text_video[texts])
    lost = torch.zeros(len(text_video), dtype=torch.bool).index_put_((texts,), beaten,
                                                                     accumulate=True)
    grouped = torch.zeros(len(text_video), dtype=torch.bool)
    grouped[texts] = True
    return 100.0 * (~lost[grouped]).float().mean().item()


def rival_wins(scores, text_video, rivals):
    """Percent of captions whose video scores above one named rival video (a tie counts as half),
    for each kind of rival. scores (texts, videos); rivals maps a name to a LongTensor
    (videos,) giving each video's rival of that kind, -1 for none (its captions are not counted).

    Group accuracy asks whether a caption's clip beats all of its scene's other clips at once;
    this asks it of one rival at a time, which tells *which* side reads order (see
    synthetic.scene_rivals). 50% is chance for each kind, and what a model scores that gives the
    two clips the same score."""
    result = {}
    for name, rival in rivals.items():
        opponent = rival[text_video]
        counted = opponent >= 0
        texts = torch.arange(len(text_video))[counted]
        own, other = scores[texts, text_video[counted]], scores[texts, opponent[counted]]
        won = (own > other).float() + 0.5 * (own == other).float()
        result[name] = 100.0 * won.mean().item() if len(texts) else None
    return result


def spread(features, groups):
    """Mean cosine similarity of unit features (n, e) between items of one group and of different
    groups (one label per item, None for none). A joint space that tells a scene's clips apart
    has within-group similarities well below 1; a collapsing one has both near 1."""
    labels = {g: i for i, g in enumerate(dict.fromkeys(g for g in groups if g is not None))}
    label = torch.tensor([labels.get(g, -1) for g in groups])
    keep = label >= 0
    cos, label = features[keep] @ features[keep].T, label[keep]
    same = label[:, None] == label[None, :]
    off_diagonal = ~torch.eye(len(label), dtype=torch.bool)
    return {"within": cos[same & off_diagonal].mean().item(), "across": cos[~same].mean().item()}


def token_spread(tokens):
    """How much the tokens of one clip differ: f_v's output tokens (B, n, d) after its final
    LayerNorm, the standard deviation across a clip's regional tokens per channel, averaged over
    channels and clips. About 0.3 to 0.6 for a working encoder; near 0 when every token of a clip
    has become the same vector, which leaves f_m's cross-attention and Eq. 12's pruning nothing
    to choose between (a video encoder trained from scratch without LayerScale does this: a
    component shared by all tokens grows in the residual stream until the final LayerNorm keeps
    little else)."""
    regional = tokens[:, 1:].float()
    return regional.std(1).mean().item()
