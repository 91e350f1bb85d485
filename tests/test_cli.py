"""The ``quantref`` command, run as a user runs it (a subprocess) and in-process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from quantref import gguf
from quantref.cli import main
from quantref.testing import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("cli") / "tiny.gguf", dim=128, n_heads=2,
                            n_kv_heads=1, hidden_dim=128, context_length=8192, seed=5)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantref.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_info(tiny_path, capsys):
    assert main(["info", "--model", str(tiny_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama"
    assert info["hyperparameters"]["n_layers"] == 2
    assert info["tensor_types"] == {"F32": 2 * 2 + 1 + 2 * 7 + 1}
    with gguf.read(tiny_path) as gf:
        assert info["n_params"] == sum(int(np.prod(t.shape)) for t in gf.tensors.values())
    assert info["kv_bytes_per_token"]["fp32"] == 2 * 2 * 1 * 64 * 4
    assert main(["info", "--model", str(tiny_path)]) == 0
    assert "KV bytes/token" in capsys.readouterr().out


def test_ppl_json_on_the_default_text(tiny_path):
    p = run("ppl", "--model", str(tiny_path), "--json", "--ctx", "1000")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in ("tokens", "n_scored", "ppl", "mean_nll", "kv", "tok_per_s", "kv_bytes_per_token"):
        assert key in r
    # the tiny vocabulary is mostly single bytes: one token per character or so
    assert r["tokens"] > 10_000 and r["n_scored"] == r["tokens"] - math.ceil(r["tokens"] / 1000)
    assert r["text"].startswith("quantref default text")


def test_ppl_table_of_several_kv_types(tiny_path, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("A small text about rivers and ferries, told twice. " * 8)
    assert main(["ppl", "--model", str(tiny_path), "--text", str(text),
                 "--kv", "fp16,turbo_kv_4b", "--perturb", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["KV", "K"]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert list(rows) == ["fp32", "fp16", "turbo_kv_4b"]  # fp32, the reference, runs first
    assert main(["ppl", "--model", str(tiny_path), "--text", str(text), "--kv", "fp16,q8_0",
                 "--csv"]) == 0
    csv_lines = capsys.readouterr().out.strip().splitlines()
    assert csv_lines[0].startswith("tokens,") and len(csv_lines) == 4


def test_convert_through_the_cli(tiny_path, tmp_path):
    out = tmp_path / "q8.gguf"
    p = run("convert", str(tiny_path), str(out), "--type", "q8_0")
    assert p.returncode == 0, p.stderr
    with gguf.read(out) as gf:
        assert gf.tensors["blk.0.attn_q.weight"].qtype.name == "Q8_0"


def test_clear_errors(tmp_path, tiny_path):
    p = run("ppl", "--model", str(tmp_path / "missing.gguf"))
    assert p.returncode != 0 and "does not exist" in p.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + bytes(64))
    p = run("info", "--model", str(bad))
    assert p.returncode == 1 and "bad.gguf" in p.stderr and "magic" in p.stderr
    assert "Traceback" not in p.stderr
    p = run("ppl", "--model", str(tiny_path), "--kv", "q3")
    assert p.returncode != 0 and "unknown --kv 'q3'" in p.stderr
    p = run("ppl", "--model", str(tiny_path), "--text", str(tmp_path / "nope.txt"))
    assert p.returncode != 0 and "nope.txt does not exist" in p.stderr


@pytest.mark.model
def test_main_job_on_the_default_model(default_model_path):
    """`quantref ppl` with no arguments: the default model on the default text."""
    p = run("ppl", "--json", "--model", str(default_model_path))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["kv"] == "fp32" and r["n_scored"] == r["tokens"] - 1 > 3000
    # A 135M model on plain, well-formed English: perplexity in the tens, not the hundreds.
    assert 3 < r["ppl"] < 40, r["ppl"]
