import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import eval as evaluation
import pictures
import search
import synthetic
from checkpoint import load_model
from model import SViTT, preset

RED, GREEN, BLUE = (220, 40, 40), (40, 180, 70), (40, 90, 235)


def write_clip(path, rgb, num_frames=6, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.broadcast_to(np.array(rgb, dtype=np.uint8), (num_frames, size, size, 3)).copy()
    synthetic.write_mp4(str(path), frames, fps=8)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    with open(path, "rb") as file:
        head = file.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def tokenizer():
    return data.default_tokenizer()


@pytest.fixture(scope="module")
def model():
    """2 frames of 4 x 4 patches, 2 layers, with random blocks and visual pruning."""
    torch.manual_seed(0)
    config = preset("tiny", frames=2, image_size=64, vision_layers=2, prune_after=[1],
                    random_blocks=1)
    return SViTT(config).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "last.pt"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "step": 0,
                "run": {}}, path)
    return path


@pytest.fixture()
def folder(tmp_path):
    """Two clips (one in a subfolder, in another container), a file that is not a video, and a
    text file."""
    root = tmp_path / "videos"
    write_clip(root / "red.mp4", RED)
    write_clip(root / "more" / "green.MKV", GREEN)
    (root / "broken.mp4").write_text("this is not a video\n")
    (root / "notes.txt").write_text("not a video name\n")
    return root


def count_clips(model, monkeypatch):
    """Counts the clips f_v encodes."""
    seen = []
    encode = model.encode_video

    def counting(video, *args, **kwargs):
        seen.append(video.shape[0])
        return encode(video, *args, **kwargs)
    monkeypatch.setattr(model, "encode_video", counting)
    return seen


def test_index_lists_the_unreadable_file_and_indexes_the_rest(folder, checkpoint, tmp_path, capsys):
    output = tmp_path / "index.pt"
    search.main(["--index", str(folder), "--checkpoint", str(checkpoint),
                     "--output", str(output), "--workers", "0", "--batch-size", "2"])
    index = torch.load(output, weights_only=True)
    assert index["paths"] == [str(folder / "more" / "green.MKV"), str(folder / "red.mp4")]
    assert [path for path, _ in index["unreadable"]] == [str(folder / "broken.mp4")]
    assert "not a readable video" in index["unreadable"][0][1]
    assert "broken.mp4" in capsys.readouterr().out
    assert index["video_feat"].shape == (2, 256)
    torch.testing.assert_close(index["video_feat"].norm(dim=1), torch.ones(2))
    assert index["checkpoint"] == str(checkpoint) and index["frames"] == 2 and index["seed"] == 0
    assert index["sparsity"]["keep_rate_v"] == 0.7 and index["sparsity"]["block_size"] == 14
    assert index["sizes"] == [os.path.getsize(p) for p in index["paths"]]


def test_grown_folder_reads_only_the_new_files(model, folder, monkeypatch):
    first = search.index_videos(model, search.video_paths(folder), progress=False)
    write_clip(folder / "blue.webm.mp4", BLUE)
    (folder / "broken.mp4").unlink()
    seen = count_clips(model, monkeypatch)
    grown = search.index_videos(model, search.video_paths(folder), existing=first, progress=False)
    assert sum(seen) == 1 and grown["unreadable"] == []
    assert grown["paths"] == [str(folder / "blue.webm.mp4"), *first["paths"]]
    assert torch.equal(grown["video_feat"][1:], first["video_feat"])
    # a feature does not depend on the batch: the new clip read alone matches a fresh index of all
    fresh = search.index_videos(model, search.video_paths(folder), progress=False, batch_size=3)
    torch.testing.assert_close(grown["video_feat"], fresh["video_feat"], atol=1e-5, rtol=0)

    seen.clear()  # a changed file is read again; another seed reads everything again
    write_clip(folder / "red.mp4", BLUE, num_frames=8)
    search.index_videos(model, search.video_paths(folder), existing=grown, progress=False)
    assert sum(seen) == 1
    seen.clear()
    search.index_videos(model, search.video_paths(folder), existing=grown, seed=1, progress=False)
    assert sum(seen) == 3


def test_annotation_lists_its_videos_once(tmp_path):
    write_clip(tmp_path / "clips" / "a.mp4", RED)
    annotation = tmp_path / "test.json"
    annotation.write_text(json.dumps([{"video": "clips/a.mp4", "caption": "x"},
                                      {"video": "clips/b.mp4", "caption": "y"},
                                      {"video": "clips/a.mp4", "caption": "z"}]))
    clips = tmp_path / "clips"
    assert search.video_paths(annotation) == [str(clips / "a.mp4"), str(clips / "b.mp4")]
    elsewhere = search.video_paths(annotation, tmp_path / "elsewhere")
    assert elsewhere[0] == str(tmp_path / "elsewhere" / "clips" / "a.mp4")


def hand_made_index(model, tokenizer, folder, query):
    """An index of three real clips whose features are set by hand: the query's own feature at
    position 1, the others orthogonal to it."""
    paths = [str(folder / f"{name}.mp4") for name in ("a", "b", "c")]
    for name, rgb in zip(("a", "b", "c"), (RED, GREEN, BLUE)):
        write_clip(folder / f"{name}.mp4", rgb)
    index = search.index_videos(model, paths, progress=False)
    q = search.encode_captions(model, tokenizer, [query])[2][0]
    others = torch.randn(2, q.shape[0], generator=torch.Generator().manual_seed(0))
    others = torch.nn.functional.normalize(others - (others @ q)[:, None] * q, dim=1)
    index["video_feat"] = torch.stack([others[0], q, others[1] * 0.5 + q * 0.1])
    return index


def test_search_puts_the_matching_video_first(model, tokenizer, tmp_path):
    query = "a red square moves up"
    index = hand_made_index(model, tokenizer, tmp_path, query)
    results = search.search(model, index, query, k=0, tokenizer=tokenizer)
    assert [r["path"] for r in results] == [index["paths"][i] for i in (1, 2, 0)]
    assert results[0]["vtc"] == pytest.approx(1.0, abs=1e-5) and results[0]["vtm"] is None
    assert abs(results[2]["vtc"]) < 1e-5


def test_rerank_scores_the_top_k_as_eval_does(model, tokenizer, tmp_path):
    query = "a green circle moves left"
    index = hand_made_index(model, tokenizer, tmp_path, query)
    results = search.search(model, index, query, k=2, tokenizer=tokenizer, top=3)
    assert {r["path"] for r in results[:2]} == set(index["paths"][1:])  # the VTC top 2
    assert results[0]["vtm"] >= results[1]["vtm"] and results[2]["vtm"] is None
    assert results[2]["path"] == index["paths"][0]

    # eval.rerank on the same features and tokens ranks the videos the same way, with the same
    # scores (a second caption beside the query: eval.rerank takes k no larger than the texts)
    texts = [query, "a white triangle moves down"]
    states, mask, feat = search.encode_captions(model, tokenizer, texts)
    clips = torch.stack([search.read_clip(p, 2, 64) for p in index["paths"]])
    tokens, _ = search.encode_clips(model, clips, 0, "cpu")
    feats = {"text_states": states, "text_mask": mask, "video_tokens": tokens}
    t2v, _ = evaluation.rerank(model, feats, feat @ index["video_feat"].T, 2, "cpu")
    order = t2v[0].argsort(descending=True).tolist()
    assert [r["path"] for r in results] == [index["paths"][i] for i in order]
    for r, i in zip(results[:2], order):
        assert r["vtm"] == pytest.approx(t2v[0, i].item(), abs=1e-4)


def test_contact_sheet_has_one_row_per_result(tmp_path):
    write_clip(tmp_path / "red.mp4", RED, size=64)
    write_clip(tmp_path / "blue.mp4", BLUE, size=64)
    results = [{"rank": 1, "path": str(tmp_path / "red.mp4"), "vtc": 0.9, "vtm": -0.1},
               {"rank": 2, "path": str(tmp_path / "blue.mp4"), "vtc": 0.8, "vtm": -0.5},
               {"rank": 3, "path": str(tmp_path / "gone.mp4"), "vtc": 0.1, "vtm": None}]
    row = round(pictures.SHEET_ROW_HEIGHT * pictures.SHEET_DPI)
    width = round(pictures.SHEET_WIDTH * pictures.SHEET_DPI)
    sheet = pictures.contact_sheet(results, tmp_path / "sheet.png", frames=4)
    assert png_size(sheet) == (width, 3 * row)
    assert png_size(pictures.contact_sheet(results[:1], tmp_path / "one.png")) == (width, row)
    # each row shows its own video: the frame strip of row 1 is red, of row 2 blue
    import matplotlib.image
    pixels = matplotlib.image.imread(sheet)[..., :3]  # (H, W, 3) in [0, 1]
    for r, rgb in ((0, RED), (1, BLUE)):
        band = pixels[r * row + row // 3: r * row + 2 * row // 3, : width // 2].reshape(-1, 3)
        hits = np.abs(band * 255 - np.array(rgb)).max(1) < 30
        assert hits.mean() > 0.3


def test_cli_search_embed_text_and_bad_files(folder, checkpoint, tokenizer, tmp_path):
    index_path = tmp_path / "index.pt"
    search.main(["--index", str(folder), "--checkpoint", str(checkpoint),
                     "--output", str(index_path), "--workers", "0"])
    out, sheets = tmp_path / "results.json", tmp_path / "pictures"
    result = search.main(["--search", "a red square", "--index", str(index_path), "--k", "1",
                              "--top", "2", "--output", str(out), "--visualize", str(sheets)])
    written = json.loads(out.read_text())
    assert written["results"] == result["results"] and len(written["results"]) == 2
    assert written["results"][0]["vtm"] is not None and written["results"][1]["vtm"] is None
    row = round(pictures.SHEET_ROW_HEIGHT * pictures.SHEET_DPI)
    assert png_size(result["picture"])[1] == 2 * row

    captions = tmp_path / "captions.txt"
    captions.write_text("a red square moves up\n\na blue circle moves left\n")
    search.main(["--embed-text", str(captions), "--checkpoint", str(checkpoint)])
    features = torch.load(tmp_path / "captions.pt", weights_only=True)
    assert features["captions"] == ["a red square moves up", "a blue circle moves left"]
    model, _, _ = load_model(checkpoint, "cpu")
    expected = search.encode_captions(model, tokenizer, features["captions"])[2]
    torch.testing.assert_close(features["text_feat"], expected, atol=1e-5, rtol=0)

    with pytest.raises(SystemExit, match="not a video_index"):
        search.main(["--search", "x", "--index", str(tmp_path / "captions.pt")])
    with pytest.raises(SystemExit, match="not of"):
        search.main(["--search", "x", "--index", str(index_path),
                         "--checkpoint", str(captions)])
    with pytest.raises(SystemExit, match="no such folder"):
        search.main(["--index", str(tmp_path / "nowhere"), "--checkpoint", str(checkpoint),
                         "--output", str(tmp_path / "other.pt")])


@pytest.mark.slow
def test_search_benchmark_prints_its_time(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "search.py")
    result = subprocess.run([sys.executable, script, "--videos", "1000", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert "1000 videos" in result.stdout and "median" in result.stdout
