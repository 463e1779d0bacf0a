"""Long runs: periodic checkpoints, the previous one kept, preemption by signals, one-line errors,
and a run without a test split that ends well."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run_control
import synthetic
import train
from checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # every test trains or starts train.py
ROOT = Path(__file__).resolve().parent.parent
STEPS = 6  # batches of 2 of 8 clips: 4 steps an epoch, so step 2 and 3 are mid-epoch


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A few synthetic clips (8 train, 4 test), made once for this file."""
    return synthetic.ensure_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=8,
                                      num_test=4, workers=1)


def flags(clips, out, *extra):
    return ["--data", clips["train"], "--video-root", clips["video_root"],
            "--test-data", clips["test"], "--output-dir", str(out), "--batch-size", "2",
            "--workers", "0", "--no-eval", *extra]


def run(clips, out, *extra):
    return train.main(flags(clips, out, *extra))


@pytest.fixture(scope="module")
def unbroken(clips, tmp_path_factory):
    """STEPS steps in one go: what every interrupted and resumed run must end with."""
    out = tmp_path_factory.mktemp("unbroken")
    result = run(clips, out, "--max-steps", str(STEPS), "--save-every", "100")
    return result["losses"], torch.load(out / "frames4" / "last.pt", weights_only=True)


def start(args, out):
    """train.py in its own process, its output in files (a pipe could fill and block it)."""
    out.mkdir(parents=True, exist_ok=True)
    stdout, stderr = open(out / "stdout.txt", "w"), open(out / "stderr.txt", "w")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                            stdout=stdout, stderr=stderr)


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"train.py ended ({process.returncode}) before {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def assert_same_weights(a, b):
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-5)


def test_sigkill_after_a_periodic_checkpoint_resumes_to_the_same_weights(clips, tmp_path,
                                                                          unbroken):
    losses, whole = unbroken
    process = start(flags(clips, tmp_path, "--max-steps", str(STEPS), "--save-every", "2"),
                    tmp_path)
    last = tmp_path / "frames4" / "last.pt"
    try:
        wait_for(last, process)
    finally:
        process.kill()
        process.wait()
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["step"], ckpt["epoch"]) == (2, 0)  # mid-epoch: 4 steps an epoch
    resumed = run(clips, tmp_path, "--resume", "--max-steps", str(STEPS))
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(losses[2:]),
                               rtol=1e-5, atol=1e-5)
    assert_same_weights(whole, torch.load(last, weights_only=True))


def test_sigterm_mid_epoch_writes_a_checkpoint_and_resume_continues(clips, tmp_path, unbroken):
    losses, whole = unbroken
    args = flags(clips, tmp_path, "--max-steps", str(STEPS), "--save-every", "2")
    process = start(args, tmp_path)
    last = tmp_path / "frames4" / "last.pt"
    try:
        wait_for(last, process)
        process.send_signal(signal.SIGTERM)  # during step 3: it ends, then the run stops
        assert process.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    output = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in output
    assert f"SIGTERM: stopped after step 3 of {STEPS}" in output
    assert f"continue with: python train.py --resume {last}" in output
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["step"], ckpt["epoch"]) == (3, 0)
    assert torch.load(tmp_path / "frames4" / "prev.pt", weights_only=True)["step"] == 2
    resumed = run(clips, tmp_path, "--resume", str(last), "--max-steps", str(STEPS))
    assert len(resumed["losses"]) == STEPS - 3
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(losses[3:]),
                               rtol=1e-5, atol=1e-5)
    assert_same_weights(whole, torch.load(last, weights_only=True))


def test_run_whose_save_fails_stops_in_one_line_and_prev_is_offered(clips, tmp_path,
                                                                   monkeypatch):
    from test_checkpoint import partial_then_full
    monkeypatch.setattr(torch, "save", partial_then_full(3))
    with pytest.raises(SystemExit) as stop:
        run(clips, tmp_path, "--max-steps", "3", "--save-every", "1")
    message = str(stop.value)
    assert "\n" not in message
    assert "step 3: cannot write the periodic checkpoint" in message
    assert "No space left on device" in message and "(step 2) is unchanged" in message
    last, prev = tmp_path / "frames4" / "last.pt", tmp_path / "frames4" / "prev.pt"
    assert load_checkpoint(last)["step"] == 2 and load_checkpoint(prev)["step"] == 1
    assert not list(last.parent.glob("*.tmp"))
    # a last.pt that later turns out corrupt: --resume names the one before it
    monkeypatch.undo()
    last.write_bytes(last.read_bytes()[:1000])
    pattern = (f"{re.escape(str(last))} is not a readable SViTT checkpoint .*"
               f"--resume {re.escape(str(prev))}$")
    with pytest.raises(SystemExit, match=pattern):
        run(clips, tmp_path, "--resume")


def test_training_without_a_test_split_exits_0_and_skips_the_evaluation(clips, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--data", clips["train"], "--video-root",
         clips["video_root"], "--output-dir", str(tmp_path), "--batch-size", "4", "--workers",
         "0", "--max-steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the end-of-stage evaluation is skipped" in result.stderr
    assert torch.load(tmp_path / "frames4" / "last.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--frames", "6"], "--frames 6: no stage of 6 frames for the tiny preset; stages exist "
                        "for 4, 8, 16"),
    (["--batch-size", "0"], "--batch-size 0: must be a positive whole number"),
    (["--max-steps", "-3"], "--max-steps -3: must be a positive whole number"),
    (["--lr", "-1"], "--lr -1.0: must be a finite number, 0 or more"),
    (["--video-root", "no/such/folder"], "--video-root no/such/folder: no such folder"),
    (["--output-dir", "{tmp}/file/out"], "--output-dir {tmp}/file/out: cannot write "
                                         "checkpoints there (Not a directory)"),
    (["--data", "{tmp}/bad.json"], "{tmp}/bad.json: entry 1 {{\"video\": \"b.mp4\"}}: has no "
                                   "'caption' key"),
    (["--batch-size", "1"], "--batch-size 1: VTC and VTM draw their negatives from the batch, so "
                            "each of the 1 process(es) needs at least 2 clips"),
    (["--preset", "base"], "--preset base starts its video encoder from BEiT (Sec. 5.1): give "
                           "--beit FOLDER, a transformers BEiT such as "
                           "microsoft/beit-base-patch16-224-pt22k-ft22k, or --beit none to train "
                           "it from random weights"),
])
def test_bad_flag_is_one_line(clips, tmp_path, extra, message):
    (tmp_path / "file").write_text("")
    (tmp_path / "bad.json").write_text(json.dumps([{"video": "a.mp4", "caption": "a"},
                                                   {"video": "b.mp4"}]))
    args = ["--data", clips["train"], "--video-root", clips["video_root"],
            "--output-dir", str(tmp_path / "out"), "--workers", "0", "--max-steps", "1"]
    args += [token.format(tmp=tmp_path) for token in extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message.format(tmp=tmp_path)
    assert not (tmp_path / "out" / "frames4" / "last.pt").exists()


def test_checkpoints_every_save_every_steps_and_at_the_end(clips, tmp_path, monkeypatch):
    saved = []
    real = run_control.save_checkpoint
    monkeypatch.setattr(run_control, "save_checkpoint",
                        lambda path, state: saved.append(state["step"]) or real(path, state))
    # 4 steps an epoch: the epoch's end (step 4) is no reason to write one
    run(clips, tmp_path, "--max-steps", "7", "--epochs", "2", "--save-every", "3")
    assert saved == [3, 6, 7]
