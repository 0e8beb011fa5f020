"""python -m dlext: the sub-commands' argument handling (train has tests/test_train.py)."""
from __future__ import annotations

import pytest
import torch

import benchmarks.run
from dlext.__main__ import main


def test_bench_hands_its_options_to_the_benchmarks(monkeypatch):
    seen = []
    monkeypatch.setattr(benchmarks.run, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "--device", "cpu", "--ops", "relu", "--quick"]) == 0
    assert main(["bench"]) == 0
    assert seen == [["--device", "cpu", "--ops", "relu", "--quick"], []]


def test_other_commands_refuse_unknown_options(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gradcheck_on_cuda_without_a_gpu_says_so(capsys):
    assert main(["gradcheck", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
