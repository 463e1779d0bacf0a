"""Evaluation: zero-shot retrieval, test-time sparsity, temporal probing, pictures (Sec. 5).

    python eval.py                                   # newest checkpoint, its data's test split
    python eval.py --checkpoint checkpoints/frames8/last.pt --output results.json
    python eval.py --keep-rate-v 0.5 --keep-rate-m 1 # test-time node sparsity (Table 1, Fig. 5)
    python eval.py --blocks 1 5 14                   # test-time edge sparsity (K_l, K_r, G), Fig. 4
    python eval.py --dense                           # everything kept, full attention
    python eval.py --shuffle-frames                  # frames in random order (Table 14)
    python eval.py --sweep keep-rate-v               # recall against q_v, drawn as a PNG (Fig. 5)
    python eval.py --sweep keep-rate-m 1 0.5 0.1     # ... against q_m, at these values
    python eval.py --visualize pictures/             # kept patches of a few clips (Figs. 6, 8)
    python eval.py --task qa [--shuffle-frames]      # video QA accuracy (Table 6; finetune.py)
    python eval.py --paragraph --data didemo_test.json --video-root ...   # paragraph retrieval

Retrieval follows Singularity: VTC similarity for every (text, video) pair ranks all videos, then
the top --k of each text (and of each video, for video-to-text) are re-scored by the VTM head; both
rankings are reported. Metrics: R@1, R@5, R@10 and their mean, in percent. A tie with the right
item counts against it (a constant score gets no credit). Where the annotation groups videos
(`group`), group accuracy and the spread of the joint space are reported too; on the synthetic
scenes also each caption's clip against each single rival of its scene (its reversal, its events
swapped, both), which tells whether the video or the text encoder reads order. Random attention
blocks are drawn from a seeded generator so a score can be reproduced.

Searching one's own videos is `search.py`'s command; the cost table (Table 2) is
`benchmarks/cost.py`'s.
"""
import argparse
import json
from pathlib import Path

import torch

import collate
import curriculum
import data
import downstream_data
import qa
from checkpoint import latest_checkpoint, load_model
from cpu_speedups import use_bf16
from metrics import group_accuracy, group_pairs, retrieval_metrics, rival_wins, spread, token_spread
from pictures import draw_kept_patches, draw_sweep
from pretrained import text_model_path
from synthetic import ensure_synthetic, scene_rivals

SWEEPS = {"keep-rate-v": "keep_rate_v", "keep-rate-m": "keep_rate_m"}  # --sweep: config fields
SWEEP_VALUES = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
PICTURES = 4  # clips --visualize draws


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint (default: the newest */last.pt under checkpoints/)")
    p.add_argument("--checkpoints-dir", default="checkpoints",
                   help="where to look for the newest checkpoint")
    p.add_argument("--data", default=None,
                   help="test annotation JSON (default: the test split of the training data)")
    p.add_argument("--video-root", default=None,
                   help="folder the annotation's video paths are relative to")
    p.add_argument("--k", type=int, default=128,
                   help="videos (texts) per text (video) re-scored by VTM (default 128)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--keep-rate-v", type=float, default=None,
                   help="override q_v (visual keep rate)")
    p.add_argument("--keep-rate-m", type=float, default=None,
                   help="override q_m (cross-modal keep rate)")
    p.add_argument("--blocks", type=int, nargs=3, default=None, metavar=("K_l", "K_r", "G"),
                   help="override the attention blocks")
    p.add_argument("--dense", action="store_true", help="dense attention and every token kept")
    p.add_argument("--shuffle-frames", action="store_true",
                   help="also evaluate with frames in a random order")
    p.add_argument("--reverse-frames", action="store_true",
                   help="also evaluate with frames in reverse order")
    p.add_argument("--sweep", nargs="+", default=None, metavar=("NAME", "VALUE"),
                   help="keep-rate-v or keep-rate-m, then the keep rates (default 1.0 0.9 ... "
                        "0.4): evaluate each and draw recall against keep rate")
    p.add_argument("--visualize", default=None, metavar="DIR",
                   help=f"write PNGs of the kept patches of {PICTURES} clips")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random attention blocks and of --shuffle-frames")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="fp32 (default: the README's figures), or the encoders under bf16 autocast "
                        "(about half the time on GPUs and on CPUs with bf16 instructions; auto: "
                        "bf16 there); train.py's end-of-stage check uses the stage's precision")
    p.add_argument("--task", default="retrieval", choices=["retrieval", "qa"],
                   help="retrieval, or video QA accuracy of a `train.py --task qa` checkpoint")
    p.add_argument("--answer-list", default=None,
                   help="QA: JSON list of the answers to choose from (default: the run's)")
    p.add_argument("--paragraph", action="store_true",
                   help="retrieval: join a video's caption list into one text (default: the run's)")
    args = p.parse_args(argv)
    if args.sweep:
        name, *values = args.sweep
        if name not in SWEEPS:
            p.error(f"--sweep {name}: choose one of {', '.join(SWEEPS)}")
        try:
            args.sweep, args.sweep_values = name, [float(v) for v in values] or SWEEP_VALUES
        except ValueError:
            p.error(f"--sweep {name} {' '.join(values)}: keep rates are numbers")
    return args


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------

def test_split(args, run):
    """(annotation, video root) of the evaluation: --data, else the training run's test split."""
    if args.data:
        if not args.video_root:
            raise SystemExit("--data needs --video-root")
        return args.data, args.video_root
    if run.get("test_data"):
        return run["test_data"], run["video_root"]
    if not run.get("data"):  # trained on the synthetic data set
        paths = ensure_synthetic()
        return paths["test"], paths["video_root"]
    raise SystemExit(f"the checkpoint was trained on {run['data']} without a test split: pass "
                     f"--data and --video-root")


def evaluate_qa_checkpoint(args, checkpoint, device, overrides):
    """Video QA accuracy (Table 6) of a `train.py --task qa` checkpoint on its test split, and
    with --shuffle-frames the same with frames out of order (Table 14)."""
    model, config, run = load_model(checkpoint, device, task="qa", **overrides)
    annotation, video_root = test_split(args, run)
    answer_list = args.answer_list or run.get("answer_list")
    if not answer_list:
        raise SystemExit("QA evaluation needs --answer-list (a JSON list of answers)")

    def shuffle(video, first):  # Table 14: the same clips with frames out of order
        return torch.stack([v[shuffled_order(v.shape[0], args.seed, first + i)]
                            for i, v in enumerate(video)])

    with autocast(device, args.bf16):  # answers are scored in fp32 (qa.rank_answers)
        return qa.evaluate_qa_split(model, config, checkpoint, annotation, video_root,
                                    answer_list, device, batch_size=args.batch_size,
                                    workers=args.workers, seed=args.seed, k=args.k,
                                    shuffle=shuffle if args.shuffle_frames else None)


def shuffled_order(frames, seed, index):
    """A random order of `frames` frames for clip `index`, never the identity when frames > 1."""
    g = torch.Generator().manual_seed(seed * 100003 + index)
    while True:
        order = torch.randperm(frames, generator=g)
        if frames == 1 or not torch.equal(order, torch.arange(frames)):
            return order


def autocast(device, bf16):
    """The encoders under bf16 autocast (--precision bf16), or as they are; the similarities
    and scores they give are compared in fp32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def extract(model, dataset, tokenizer, device, *, batch_size, workers, seed, frame_order=None,
            bf16=False):
    """Video tokens and features of every test video, text states and features of every caption.
    frame_order: None, "shuffled" (a random order per clip) or "reversed"."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    generator = torch.Generator(device).manual_seed(seed)  # the random attention blocks
    tokens, indices, video_feats, seen = [], [], [], 0
    for items in loader:
        video = torch.stack([item["video"] for item in items])  # (B, T, 3, S, S)
        if frame_order == "shuffled":  # Table 14: the same clips with frames out of order
            video = torch.stack([v[shuffled_order(v.shape[0], seed,
                                                  seen + i)] for i, v in enumerate(video)])
        elif frame_order == "reversed":
            video = video.flip(1)  # (B, T, 3, S, S), time reversed
        seen += len(items)
        with autocast(device, bf16):
            tok, index, feat = model.encode_video(video.to(device), generator)
        tokens.append(tok.cpu())
        indices.append(index.cpu())
        video_feats.append(feat.float().cpu())
    captions = [caption for caption, _ in dataset.captions]
    text = collate.tokenize_captions(tokenizer, captions, model.config.text_len)
    states, text_feats = [], []
    for start in range(0, len(captions), 128):
        ids = text["input_ids"][start:start + 128].to(device)
        mask = text["attention_mask"][start:start + 128].to(device)
        with autocast(device, bf16):
            s, f = model.encode_text(ids, mask)
        states.append(s.cpu())
        text_feats.append(f.float().cpu())
    return {"video_tokens": torch.cat(tokens), "video_index": torch.cat(indices),
            "video_feat": torch.cat(video_feats), "text_states": torch.cat(states),
            "text_mask": text["attention_mask"], "text_feat": torch.cat(text_feats),
            "text_video": torch.tensor([video_id for _, video_id in dataset.captions])}


@torch.no_grad()
def vtm_scores(model, feats, pairs, device, batch_size=256, bf16=False):
    """VTM match scores for (text, video) index pairs (P, 2): log p(match), or the match logit
    when the config's vtm_score is "logit" (the authors' code)."""
    scores = []
    for start in range(0, len(pairs), batch_size):
        t, v = pairs[start:start + batch_size].T
        with autocast(device, bf16):
            logits = model.match_logits(feats["text_states"][t].to(device),
                                        feats["text_mask"][t].to(device),
                                        feats["video_tokens"][v].to(device))
        logits = logits.float()
        if model.config.vtm_score == "log_softmax":
            logits = logits.log_softmax(-1)
        scores.append(logits[:, 1].cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def rerank(model, feats, sim, k, device, bf16=False):
    """Re-score the top k of each row (t2v) and of each column (v2t) by VTM (Singularity).

    Returns (t2v, v2t) score matrices (texts, videos): VTM scores on the re-scored entries, placed
    above the rest, which keep their VTC order. A pair in both top-k sets is scored once."""
    k = min(k, sim.shape[0], sim.shape[1])
    chosen = torch.zeros_like(sim, dtype=torch.bool)  # (texts, videos)
    t2v_top = chosen.clone().scatter_(1, sim.topk(k, dim=1).indices, True)
    v2t_top = chosen.clone().scatter_(0, sim.topk(k, dim=0).indices, True)
    pairs = (t2v_top | v2t_top).nonzero()  # (P, 2): (text, video)
    scores = torch.full_like(sim, float("nan"))
    scores[pairs[:, 0], pairs[:, 1]] = vtm_scores(model, feats, pairs, device, bf16=bf16)
    below = sim - 1e4  # below every re-scored entry, in VTC order
    return torch.where(t2v_top, scores, below), torch.where(v2t_top, scores, below)


def evaluate(model, dataset, tokenizer, device, *, k, batch_size, workers, seed,
             frame_order=None, bf16=False):
    """VTC-only and VTM re-ranked retrieval metrics; where videos have groups, group accuracy
    (VTM re-scores every video of each caption's group for it) and the spread of the features."""
    feats = extract(model, dataset, tokenizer, device, batch_size=batch_size, workers=workers,
                    seed=seed, frame_order=frame_order, bf16=bf16)
    sim = feats["text_feat"] @ feats["video_feat"].T  # (texts, videos), VTC (Eq. 29)
    t2v, v2t = rerank(model, feats, sim, k, device, bf16)
    truth = (dataset.ground_truth_matrix() if isinstance(dataset, downstream_data.RetrievalDataset)
             else feats["text_video"])  # several right videos per caption (SSv2 templates)
    results = {"vtc": retrieval_metrics(sim, sim, truth), "vtm": retrieval_metrics(t2v, v2t, truth),
               "token_spread": token_spread(feats["video_tokens"])}
    pairs = group_pairs(feats["text_video"], dataset.video_groups)
    if len(pairs):
        matched = torch.full_like(sim, float("nan"))
        matched[pairs[:, 0], pairs[:, 1]] = vtm_scores(model, feats, pairs, device, bf16=bf16)
        for ranking, scores in (("vtc", sim), ("vtm", matched)):
            results[ranking]["group_acc"] = group_accuracy(scores, feats["text_video"],
                                                           dataset.video_groups)
        text_groups = [dataset.video_groups[v] for v in feats["text_video"].tolist()]
        results["spread"] = {"text": spread(feats["text_feat"], text_groups),
                             "video": spread(feats["video_feat"], dataset.video_groups)}
        rivals = scene_rivals(dataset.videos, dataset.video_groups)  # synthetic scenes
        if rivals:
            results["rival_wins"] = {ranking: rival_wins(scores, feats["text_video"], rivals)
                                     for ranking, scores in (("vtc", sim), ("vtm", matched))}
    return results


def print_metrics(title, results):
    results = {ranking: results[ranking] for ranking in ("vtc", "vtm") if ranking in results}
    names = ["t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_mean", "v2t_R@1", "v2t_R@5", "v2t_R@10",
             "v2t_mean"]
    if all("group_acc" in metrics for metrics in results.values()):
        names.append("group_acc")
    print(title)
    print(f"{'':12}" + "".join(f"{n:>10}" for n in names))
    for ranking, metrics in results.items():
        print(f"{ranking:12}" + "".join(f"{metrics[n]:>10.1f}" for n in names))


def print_rival_wins(wins):
    """One line per ranking: how often a caption's clip beats each single rival of its scene."""
    print("captions whose clip scores above one rival of its scene, % (chance 50; beating the "
          "reversal needs order in f_v, beating the swapped events order in f_t):")
    for ranking, kinds in wins.items():
        print(f"  {ranking}: " + ", ".join(f"{kind.replace('_', ' ')} {value:.1f}"
                                          for kind, value in kinds.items() if value is not None))


# --------------------------------------------------------------------------------------------
# Sweep and pictures
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.bf16 = use_bf16(args.precision, device)
    pattern = "qa_frames*/last.pt" if args.task == "qa" else "*/last.pt"
    checkpoint = (Path(args.checkpoint) if args.checkpoint
                  else latest_checkpoint(args.checkpoints_dir, pattern))
    overrides = dict(keep_rate_v=args.keep_rate_v, keep_rate_m=args.keep_rate_m,
                     blocks=args.blocks, dense=args.dense)
    if args.task == "qa":
        result = evaluate_qa_checkpoint(args, checkpoint, device, overrides)
        write_result(result, args.output)
        return result
    model, config, run = load_model(checkpoint, device, **overrides)
    annotation, video_root = test_split(args, run)
    paragraph = args.paragraph or run.get("paragraph", False)
    dataset = downstream_data.RetrievalDataset(annotation, video_root, paragraph=paragraph,
                                    frames=config.frames, image_size=config.image_size,
                                    train=False, mean=config.image_mean, std=config.image_std)
    if paragraph:  # paragraphs are longer than captions (Table 9: 64 tokens for DiDeMo)
        config.text_len = max(config.text_len, downstream_data.PARAGRAPH_TEXT_LEN)
    tokenizer = data.default_tokenizer(text_model_path(config.text_model))
    common = dict(k=args.k, batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                  bf16=args.bf16)
    edges = curriculum.count_config_edges(config)
    result = {"checkpoint": str(checkpoint), "split": str(annotation),
              "precision": "bf16" if args.bf16 else "fp32",
              "videos": len(dataset.videos),
              "captions": len(dataset.captions), "k": args.k,
              "sparsity": {"frames": config.frames, "block_size": config.block_size,
                           "local_blocks": config.local_blocks,
                           "random_blocks": config.random_blocks,
                           "keep_rate_v": config.keep_rate_v, "keep_rate_m": config.keep_rate_m,
                           "edges": edges.total, "dense_edges": edges.dense, "S": edges.sparsity}}
    print(f"{checkpoint}: T={config.frames}, (K_l, K_r, G)=({config.local_blocks}, "
          f"{config.random_blocks}, {config.block_size}), (q_v, q_m)=({config.keep_rate_v}, "
          f"{config.keep_rate_m}), {edges.total / 1e6:.3f}M edges, S={edges.sparsity:.2f}; "
          f"{annotation}: {len(dataset.videos)} videos, {len(dataset.captions)} captions"
          + ("; encoders under bf16 autocast" if args.bf16 else ""))

    if args.sweep:
        values, results = args.sweep_values, []
        key = SWEEPS[args.sweep]
        for value in values:
            swept, _, _ = load_model(checkpoint, device, **{**overrides, key: value})
            results.append(evaluate(swept, dataset, tokenizer, device, **common))
            print_metrics(f"{args.sweep} = {value}", results[-1])
        json_path = Path(args.output or checkpoint.with_name("retrieval.json"))
        png = json_path.with_name(f"sweep_{args.sweep}.png")
        draw_sweep(values, results, args.sweep, png)
        result["sweep"] = {"name": args.sweep, "values": values, "results": results,
                           "png": str(png)}
        print(f"wrote {png}")
    else:
        result.update(evaluate(model, dataset, tokenizer, device, **common))
        kind = "zero-shot" if run.get("task", "pretrain") == "pretrain" else "fine-tuned"
        print_metrics(f"{kind} retrieval, {len(dataset.captions)} captions x "
                      f"{len(dataset.videos)} videos "
                      f"(VTC; VTM re-ranking of the top {args.k})", {"vtc": result["vtc"],
                                                                     "vtm": result["vtm"]})
        print(f"spread of the video tokens within a clip: {result['token_spread']:.3f} "
              "(near 0: f_v gives every token of a clip the same vector)")
        if "spread" in result:
            print("cosine similarity of the joint space's features, within a group / across "
                  "groups: " + ", ".join(f"{side} {s['within']:.3f} / {s['across']:.3f}"
                                         for side, s in result["spread"].items()))
        if "rival_wins" in result:
            print_rival_wins(result["rival_wins"])
        for order, wanted in (("shuffled", args.shuffle_frames),
                              ("reversed", args.reverse_frames)):
            if not wanted:
                continue
            other = evaluate(model, dataset, tokenizer, device, frame_order=order, **common)
            result[order] = other
            result[f"{order}_difference"] = {r: {m: result[r][m] - other[r][m] for m in other[r]}
                                             for r in ("vtc", "vtm")}
            print_metrics(f"frames {order}" + (" (Table 14)" if order == "shuffled" else ""),
                          {r: other[r] for r in ("vtc", "vtm")})
            print_metrics(f"normal - {order}", result[f"{order}_difference"])
    if args.visualize:
        result["pictures"] = draw_kept_patches(model, dataset, tokenizer, device, args.visualize,
                                       count=PICTURES, seed=args.seed)
        print(f"wrote {len(result['pictures'])} pictures to {args.visualize}")
    write_result(result, args.output)
    return result


def write_result(result, output):
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2))
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
