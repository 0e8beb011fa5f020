"""The training command: LeNet-5 on the bundled digits, checkpoint, plot, native comparison."""
from __future__ import annotations

import json

import pytest
import torch

from dlext.__main__ import main
from dlext.models import lenet5


@pytest.mark.slow
def test_lenet5_reaches_97_percent_on_digits_and_writes_its_outputs(tmp_path, capsys):
    assert main(["train", "--model", "lenet5", "--data", "digits", "--epochs", "10",
                 "--compare-native", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speed ratio dlext / native" in out
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["dlext"]["test_acc"][-1] >= 0.97
    assert history["native"]["test_acc"][-1] >= 0.97
    assert len(history["dlext"]["train_loss"]) == 10
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    native = lenet5(native=True)                     # the checkpoint loads into torch.nn layers
    native.load_state_dict(torch.load(tmp_path / "checkpoint.pt"))


def test_train_rejects_what_it_cannot_do(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--amp", "fp16", "--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--data-dir"):
        main(["train", "--data", "mnist", "--out", str(tmp_path)])
    for bad in (["--batch-size", "0"], ["--batch-size", "-5"], ["--epochs", "0"],
                ["--lr", "nan"], ["--lr", "-0.1"]):
        with pytest.raises(SystemExit):  # argparse: "must be a positive number"
            main(["train", *bad, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="digits are bundled"):
        main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            main(["train", "--device", "cuda", "--out", str(tmp_path)])
