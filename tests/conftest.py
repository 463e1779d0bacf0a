"""Puts the repository root on sys.path, so that `pytest` (not only `python -m pytest`) imports
the top-level modules; and the fixture of the tests that fine-tune."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """8 synthetic clips with their QA set, and a 1-step pre-training checkpoint to fine-tune:
    {"train", "test", "answer_list", "video_root" (the QA split's), "root", "pretrain" (the
    pre-training annotation), "checkpoint"}."""
    import synthetic
    import train
    root = tmp_path_factory.mktemp("synthetic")
    clips = synthetic.ensure_synthetic_qa(root, num_train=8, num_test=4, workers=1)
    out = tmp_path_factory.mktemp("pretrain")
    train.main(["--data", str(root / "train.json"), "--video-root", clips["video_root"],
                "--output-dir", str(out), "--batch-size", "4", "--workers", "0", "--no-eval",
                "--frames", "4", "--max-steps", "1"])
    return {**clips, "root": root, "pretrain": str(root / "train.json"),
            "checkpoint": out / "frames4" / "last.pt"}
