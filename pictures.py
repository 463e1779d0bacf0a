"""Pictures of what a trained model does: the patches node sparsity keeps (Figs. 6 and 8),
recall against a keep rate (Fig. 5), and a contact sheet of search results. eval.py (`--visualize`,
`--sweep`) and search.py (`--visualize`) draw them with matplotlib.

    draw_kept_patches(model, dataset, tokenizer, "cpu", "pictures/", count=4, seed=0)
    draw_sweep([1.0, 0.7, 0.4], results, "keep-rate-v", "sweep.png")
    contact_sheet(results, "answers.png")            # results of search.search
"""
import re
from pathlib import Path

import torch

import collate
import data

SHEET_DPI = 100
SHEET_WIDTH = 10.0      # inches: the frame strip and the score beside it
SHEET_ROW_HEIGHT = 1.2  # inches a result


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_sweep(values, results, name, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for metric in ("t2v_R@1", "t2v_R@5", "t2v_mean"):
        ax.plot(values, [r["vtm"][metric] for r in results], marker="o", label=metric)
    ax.set_xlabel({"keep-rate-v": "visual keep rate q_v",
                   "keep-rate-m": "cross-modal keep rate q_m"}[name])
    ax.set_ylabel("recall (%)")
    ax.invert_xaxis()
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def draw_kept_patches(model, dataset, tokenizer, device, folder, *, count, seed):
    """Figs. 6 and 8: per clip, the sampled frames with the patches dropped by visual pruning
    dimmed (top row), and with only the patches kept by cross-modal pruning lit (bottom row)."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    mean = torch.tensor(config.image_mean).view(3, 1, 1)
    std = torch.tensor(config.image_std).view(3, 1, 1)
    generator = torch.Generator(device).manual_seed(seed)
    written = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        video = item["video"][None].to(device)
        tokens, index, _ = model.encode_video(video, generator)
        text = collate.tokenize_captions(tokenizer, [item["caption"]], config.text_len)
        states, _ = model.encode_text(text["input_ids"].to(device),
                                      text["attention_mask"].to(device))
        _, kept = model.fuse(states, text["attention_mask"].to(device), tokens, return_kept=True)
        visual = index[0, 1:].cpu() - 1  # regional token numbers kept by visual pruning
        multimodal = index[0].gather(0, kept[0]).cpu()
        multimodal = multimodal[multimodal > 0] - 1
        frames = (item["video"] * std + mean).clamp(0, 1)  # (T, 3, S, S)
        T, S, P = config.frames, config.grid, config.patch_size
        fig, axes = plt.subplots(2, T, figsize=(1.6 * T, 3.6), squeeze=False)
        for row, keep in enumerate((visual, multimodal)):
            lit = torch.zeros(T * S * S)
            lit[keep] = 1
            lit = lit.view(T, 1, S, S).repeat_interleave(P, 2).repeat_interleave(P, 3)
            shown = frames * (0.25 + 0.75 * lit)
            for t in range(T):
                axes[row, t].imshow(shown[t].permute(1, 2, 0).numpy())
                axes[row, t].axis("off")
            axes[row, 0].set_title(["visual pruning (kept lit)",
                                    "cross-modal pruning (kept lit)"][row],
                                   fontsize=7, loc="left")
        fig.suptitle(item["caption"], fontsize=8)
        fig.tight_layout()
        path = folder / f"clip{i:03d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


def frame_strip(path, frames=8, height=96):
    """uint8 (height, W, 3): `frames` frames of the video side by side (the middle frames of equal
    segments), 2 px apart; VideoReadError if the file cannot be read."""
    reader = data.open_video(path)
    indices = data.sample_frame_indices(len(reader), frames, train=False)
    clip = data.read_frames(reader, indices, path)  # (T, H, W, 3)
    video = torch.from_numpy(clip).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    width = max(1, round(video.shape[3] * height / video.shape[2]))
    video = torch.nn.functional.interpolate(video, size=(height, width), mode="bilinear",
                                            antialias=True)
    video = torch.nn.functional.pad(video, (0, 2), value=255.0)  # a white gap after each frame
    strip = video.permute(2, 0, 3, 1).reshape(height, -1, 3)  # (h, T (w + 2), 3)
    return strip.clamp(0, 255).byte().numpy()


def contact_sheet(results, path, *, frames=8) -> str:
    """A PNG with one row per result: a strip of its frames, its rank and scores beside it.
    The picture is SHEET_WIDTH x (SHEET_ROW_HEIGHT per row) inches at SHEET_DPI."""
    plt = _pyplot()
    rows = max(1, len(results))
    fig = plt.figure(figsize=(SHEET_WIDTH, SHEET_ROW_HEIGHT * rows), dpi=SHEET_DPI)
    grid = fig.add_gridspec(rows, 2, width_ratios=[3, 1], left=0.01, right=0.99, top=0.99,
                            bottom=0.01, wspace=0.02, hspace=0.08)
    for row, result in enumerate(results):
        ax = fig.add_subplot(grid[row, 0])
        ax.set_axis_off()
        ax.set_anchor("W")
        try:
            ax.imshow(frame_strip(result["path"], frames), aspect="equal")
        except data.VideoReadError as error:
            ax.text(0.5, 0.5, f"cannot be read: {error.reason}"[:80], ha="center", va="center",
                    transform=ax.transAxes)
        ax = fig.add_subplot(grid[row, 1])
        ax.set_axis_off()
        vtm = "-" if result["vtm"] is None else f"{result['vtm']:.3f}"
        name = Path(result["path"]).name
        label = f"#{result['rank']}  VTM {vtm}\nVTC {result['vtc']:.3f}\n{name}"
        ax.text(0.0, 0.5, label, va="center", fontsize=9, family="monospace",
                transform=ax.transAxes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=SHEET_DPI)
    plt.close(fig)
    return str(path)


def sheet_name(query: str) -> str:
    """A file name for the contact sheet of a query: search_<its words>.png."""
    words = re.sub(r"[^a-z0-9]+", "_", query.lower()).strip("_")[:60].rstrip("_")
    return f"search_{words or 'query'}.png"
