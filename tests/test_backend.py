"""``--backend auto``'s rule (quantref.backend): the engine by the model's size and the device,
its thresholds' boundaries, and the command's use of it."""

from __future__ import annotations

import json

import pytest

import quantref.backend as qb
from quantref.backend import Choice, choose_backend
from quantref.cli import main
from quantref.testing import write_tiny_llama

SIZES = (0, 1, 134_515_008, 361_821_120, 1_235_814_400, 3_212_749_824, 10**11)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("backend") / "tiny.gguf", dim=64,
                            n_heads=2, n_kv_heads=1, hidden_dim=64, seed=3)


def test_every_choice_is_a_backend_and_a_step_that_exist():
    for device in qb.DEVICES:
        for n in (*SIZES, None):
            c = choose_backend(n, device)
            assert isinstance(c, Choice) and c.why
            assert (c.backend, c.step) in {("numpy", None), ("mlx", "plain"), ("mlx", "fused"),
                                           ("mlx", "persistent")}, (device, n, c)
            if device != "cuda":  # the fused and persistent steps are CUDA kernels
                assert c.step in (None, "plain"), (device, n, c)


def test_without_mlx_numpy_always():
    assert {choose_backend(n, "none").backend for n in SIZES} == {"numpy"}


def test_the_thresholds_decide_at_their_values(monkeypatch):
    monkeypatch.setattr(qb, "CPU_MLX_MIN_PARAMS", 500_000_000)
    assert choose_backend(499_999_999, "cpu").backend == "numpy"
    assert choose_backend(500_000_000, "cpu") == Choice(
        "mlx", "plain", "CPU only, 500M parameters >= CPU_MLX_MIN_PARAMS (500M)")
    monkeypatch.setattr(qb, "CPU_MLX_MIN_PARAMS", None)  # never
    assert {choose_backend(n, "cpu").backend for n in SIZES} == {"numpy"}

    monkeypatch.setattr(qb, "CUDA_MLX_MIN_PARAMS", 200_000_000)
    monkeypatch.setattr(qb, "CUDA_PERSISTENT_MAX_PARAMS", 1_000_000_000)
    assert choose_backend(199_999_999, "cuda").backend == "numpy"
    assert choose_backend(200_000_000, "cuda").step == "persistent"
    assert choose_backend(1_000_000_000, "cuda").step == "persistent"
    assert choose_backend(1_000_000_001, "cuda").step == "fused"
    monkeypatch.setattr(qb, "CUDA_PERSISTENT_MAX_PARAMS", None)  # never persistent
    assert {choose_backend(n, "cuda").step for n in SIZES[3:]} == {"fused"}  # >= 200M

    monkeypatch.setattr(qb, "METAL_MLX_MIN_PARAMS", 100)
    assert choose_backend(99, "metal").backend == "numpy"
    assert choose_backend(100, "metal") == Choice(
        "mlx", "plain", "Apple GPU, 100 parameters >= METAL_MLX_MIN_PARAMS (100)")


def test_monotone_in_size():
    """A bigger model never moves from MLX back to NumPy, nor from the fused step back to the
    persistent one: the GPU's lead grows with the bytes each token reads."""
    order = {None: 0, "persistent": 1, "fused": 2, "plain": 1}
    for device in qb.DEVICES:
        picks = [choose_backend(n, device) for n in SIZES]
        ranks = [0 if c.backend == "numpy" else order[c.step] for c in picks]
        assert ranks == sorted(ranks), (device, picks)


def test_unknown_size_and_bad_arguments():
    for device in qb.DEVICES:  # as the default model
        unknown, known = choose_backend(None, device), choose_backend(qb.UNKNOWN_PARAMS, device)
        assert (unknown.backend, unknown.step) == (known.backend, known.step)
    assert "135M parameters (size unknown)" in choose_backend(None, "cuda").why
    with pytest.raises(ValueError, match="device must be one of"):
        choose_backend(1, "gpu")
    with pytest.raises(ValueError, match="n_params must be >= 0"):
        choose_backend(-1, "cpu")


def test_the_measured_cpu_rule():
    """On a CPU-only machine the oracle decoded faster than MLX's CPU engine at every shape
    bench/crossover.py measured (docs/benchmarks.md, "Where the GPU wins")."""
    assert choose_backend(134_515_008, "cpu").backend == "numpy"
    assert choose_backend(361_821_120, "cpu").backend == "numpy"


def test_n_params_of_counts_every_tensor(tiny_path):
    from quantref import gguf

    with gguf.read(tiny_path) as gf:
        assert qb.n_params_of(tiny_path) == sum(t.n_elements for t in gf.tensors.values())


def test_the_command_follows_the_rule(tiny_path, monkeypatch, capsys):
    n = qb.n_params_of(tiny_path)
    monkeypatch.setattr(qb, "detect_device", lambda: "cpu")
    monkeypatch.setattr(qb, "CPU_MLX_MIN_PARAMS", n + 1)
    assert main(["info", "--model", str(tiny_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "numpy" and info["backend_rule"]["step"] is None
    assert "CPU_MLX_MIN_PARAMS" in info["backend_rule"]["why"]
    # an MLX-only option under auto's NumPy says which rule chose NumPy
    with pytest.raises(SystemExit) as e:
        main(["ppl", "--model", str(tiny_path), "--weights", "float"])
    assert "--backend auto chose numpy: CPU only" in str(e.value.code)

    pytest.importorskip("mlx.core")
    monkeypatch.setattr(qb, "CPU_MLX_MIN_PARAMS", n)  # the boundary: MLX
    assert main(["info", "--model", str(tiny_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "mlx" and info["backend_rule"]["step"] == "plain"
    # an explicit backend is not the rule's
    assert main(["info", "--model", str(tiny_path), "--json", "--backend", "numpy"]) == 0
    assert "backend_rule" not in json.loads(capsys.readouterr().out)
