"""Where the evaluation CLIs run and what they show: device=auto, faiss on the GPU, progress bars, logging
of the results table, the output folder next to an evaluated run."""
import io
import logging
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from conftest import TinyBackbone
from densessl.evaluation import runtime
from densessl.evaluation.features import extract_dense_features
from densessl.evaluation.runtime import eval_folder, progress_bar, resolve_device, resolve_faiss_gpu


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    no_gpu(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    one_gpu(monkeypatch)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("AUTO ") == torch.device("cuda")


def test_explicit_devices_are_kept(monkeypatch):
    one_gpu(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_cuda_without_gpu_and_unknown_values_name_the_key_and_fix(monkeypatch):
    no_gpu(monkeypatch)
    with pytest.raises(ValueError, match=r"device=cuda but torch sees no CUDA GPU.*device=auto or device=cpu"):
        resolve_device("cuda")
    for bad in ("gpu", "tpu", "cuda:x"):
        with pytest.raises(ValueError, match=rf"device='{bad}'.*auto"):
            resolve_device(bad)
    with pytest.raises(ValueError, match=r"trainer\.device='mps'"):
        resolve_device("mps", key="trainer.device")
    one_gpu(monkeypatch)
    with pytest.raises(ValueError, match=r"device=cuda:1 but only 1 GPU.*cuda:0"):
        resolve_device("cuda:1")


def test_faiss_gpu_follows_the_device(monkeypatch, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "faiss_gpus", lambda: 1)
    assert resolve_faiss_gpu("auto", cuda) is True and resolve_faiss_gpu(None, cuda) is True
    assert resolve_faiss_gpu("auto", cpu) is False
    assert resolve_faiss_gpu(False, cuda) is False and resolve_faiss_gpu(True, cpu) is True  # explicit wins
    monkeypatch.setattr(runtime, "faiss_gpus", lambda: 0)  # faiss-cpu on a GPU machine: CPU faiss, said so
    with caplog.at_level(logging.INFO, logger="densessl.evaluation.runtime"):
        assert resolve_faiss_gpu("auto", cuda) is False
    assert "faiss runs on the CPU" in caplog.text and "faiss-gpu" in caplog.text
    with pytest.raises(ValueError, match=r"eval\.options\.gpu='yes'"):
        resolve_faiss_gpu("yes", cpu)


def test_progress_bar_only_on_a_terminal_and_when_enabled(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(progress_bar(range(3), desc="work")) == [0, 1, 2]
    assert "work" in tty.getvalue() and "/3" in tty.getvalue()  # leave=False: the bar clears itself at the end
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(progress_bar(range(3), enabled=False, desc="work")) == [0, 1, 2]
    assert tty.getvalue() == ""
    pipe = io.StringIO()  # a log file or CI: no bar even when enabled
    monkeypatch.setattr(sys, "stderr", pipe)
    list(progress_bar(range(3), desc="work"))
    assert pipe.getvalue() == ""


def test_feature_extraction_bar_is_opt_in(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.zeros(4, 16, 16, dtype=torch.int64)),
                        batch_size=2)
    extract_dense_features(TinyBackbone(), loader)  # the library default (in-training callbacks): no bar
    assert tty.getvalue() == ""
    features = extract_dense_features(TinyBackbone(), loader, progress=True)
    assert features.num_images == 4 and "features" in tty.getvalue() and "/2" in tty.getvalue()


def test_overclustering_bar_counts_k_and_seed_runs(monkeypatch):
    from test_overcluster import NUM_CLASSES, planted_features

    from densessl.evaluation.overcluster import overcluster

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    overcluster(planted_features(), NUM_CLASSES, ks=(NUM_CLASSES, 8), seeds=(0, 1), pca_dim=4, niter=2, nredo=1,
                progress=True)
    assert "k-means" in tty.getvalue() and "/4" in tty.getvalue() and "K=8 seed=1" in tty.getvalue()


def test_results_table_is_logged_not_printed(tmp_path, capsys, caplog):
    from densessl.evaluation.protocols import write_results

    with caplog.at_level(logging.INFO, logger="densessl.evaluation.protocols"):
        write_results(tmp_path, "probe", {"miou": 0.5}, "miou      50.00")
    assert capsys.readouterr().out == ""
    assert "miou      50.00" in caplog.text and str(tmp_path / "probe.json") in caplog.text
    assert (tmp_path / "probe.csv").read_text().splitlines() == ["metric,value", "miou,0.5"]


def test_results_go_next_to_an_evaluated_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("backbone: {}\n")
    cfg = OmegaConf.create({"weights": str(run), "eval": {"name": "retrieval"}})
    stamp = "2026-01-01_10-00-00"
    assert eval_folder("runs/eval/x", stamp, _root_=cfg) == str(run / "eval" / "retrieval" / stamp)
    for weights in (None, "hub", str(tmp_path / "model.pth"), str(tmp_path)):  # not a run folder: the default
        cfg.weights = weights
        assert eval_folder("runs/eval/x", "stamp", _root_=cfg) == "runs/eval/x"


def test_hummingbird_bars_for_memory_and_search(synthetic, monkeypatch):
    from densessl.evaluation.retrieval import hummingbird

    train, val = synthetic
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    kwargs = dict(image_size=64, memory_size=8 * 2 * 20, augmentation_epochs=2, k=5, batch_size=4, num_threads=1)
    quiet = hummingbird(TinyBackbone(), train, val, **kwargs)
    assert tty.getvalue() == ""
    shown = hummingbird(TinyBackbone(), train, val, progress=True, **kwargs)
    assert "memory" in tty.getvalue() and "/4" in tty.getvalue()  # 8 train images, batch 4, 2 epochs
    assert "search" in tty.getvalue() and "/1" in tty.getvalue()
    assert shown.memory_rows == quiet.memory_rows == 8 * 2 * 20
