"""Multi-process training under torchrun (gloo on the CPU): the three tasks, a random stream per
process, and a SIGTERM that stops every process after the same step with a checkpoint from which
the run continues as an unbroken one would."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun, after a training run
ROOT = Path(__file__).resolve().parent.parent
PORTS = iter(range(29540, 29560))  # one rendezvous port a launch, so launches never collide


def torchrun(*args, out, wait=True):
    """train.py under `torchrun --nproc_per_node=2` on the CPU, its output in files."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={next(PORTS)}", str(ROOT / "train.py"), "--output-dir", str(out),
               "--batch-size", "4", "--workers", "0", "--no-eval", "--device", "cpu", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    if not wait:
        return process
    assert process.wait(timeout=600) == 0, (out / "log.txt").read_text()[-3000:]
    return (out / "log.txt").read_text()


def load(path):
    return torch.load(path, weights_only=True)


def test_pretraining_two_processes_with_a_random_stream_each(pretrained, tmp_path):
    log = torchrun("--data", pretrained["pretrain"], "--video-root", pretrained["video_root"],
                   "--max-steps", "2", out=tmp_path)
    ckpt = load(tmp_path / "frames4" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["run"]["batch_size"] == 4
    assert "2 process(es)" in log
    # seed + rank: each process its own dropout masks and random attention blocks (Eq. 8)
    assert len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])


@pytest.mark.parametrize("task", ["retrieval", "qa"])
def test_finetuning_two_processes(pretrained, tmp_path, task):
    """Fine-tuning's losses leave parameters unused (the MLM head; QA's VTC and VTM heads), which
    DistributedDataParallel would wait for at the second step: finetune.freeze_unused."""
    extra = (["--data", pretrained["train"], "--answer-list", pretrained["answer_list"]]
             if task == "qa" else ["--data", pretrained["pretrain"]])
    torchrun("--task", task, "--init", str(pretrained["checkpoint"]), "--video-root",
             pretrained["video_root"], "--max-steps", "3", *extra, out=tmp_path)
    ckpt = load(tmp_path / f"{task}_frames4" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["run"]["task"] == task


def test_sigterm_under_torchrun_stops_with_a_checkpoint_and_resume_continues(pretrained, tmp_path):
    args = ["--data", pretrained["pretrain"], "--video-root", pretrained["video_root"],
            "--max-steps", "6", "--epochs", "3"]
    torchrun(*args, out=tmp_path / "unbroken")
    whole = load(tmp_path / "unbroken" / "frames4" / "last.pt")

    out = tmp_path / "stopped"
    process = torchrun(*args, "--save-every", "2", out=out, wait=False)
    last = out / "frames4" / "last.pt"
    try:
        deadline = time.monotonic() + 300
        while not last.exists():
            assert process.poll() is None, (out / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {last} after 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # torchrun hands it to both processes
        process.wait(timeout=300)
    finally:
        process.kill()
        process.wait()
    log = (out / "log.txt").read_text()
    stopped = load(last)
    assert 2 < stopped["step"] < 6, log[-3000:]
    assert f"SIGTERM: stopped after step {stopped['step']} of 6" in log
    assert len(stopped["rng"]) == 2

    torchrun("--resume", str(last), *args, out=out)
    resumed = load(last)
    assert resumed["step"] == whole["step"] == 6
    for key in whole["model"]:  # each process's random stream continued
        torch.testing.assert_close(resumed["model"][key], whole["model"][key], rtol=1e-5,
                                   atol=1e-5)
