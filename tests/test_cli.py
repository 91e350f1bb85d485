"""The ``quantref`` command, run as a user runs it (a subprocess) and in-process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

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
    p = run("ppl", "--model", str(tiny_path), "--json", "--ctx", "1000", "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["text"].startswith("quantref default text")
    assert out["backend"] == "numpy" and out["interrupted"] is False
    [r] = out["rows"]  # one KV type: one row, in the same shape as several
    for key in ("tokens", "n_scored", "ppl", "mean_nll", "kv", "tok_per_s", "kv_bytes_per_token"):
        assert key in r
    # the tiny vocabulary is mostly single bytes: one token per character or so. Scored: every
    # token after each full window's first, then the remainder's, in the text's last 1000
    import quantref
    from quantref.perplexity import default_text

    n_text = len(quantref.load(tiny_path).tokenizer.encode(default_text(), add_special=False))
    n_full, rest = divmod(n_text, 1000)
    assert n_text > 10_000 and r["n_scored"] == n_full * 999 + rest
    assert r["tokens"] == (n_full + (rest > 0)) * 1000 and r["scoring"] == "all"
    assert out["tokens"] == r["tokens"]


def test_ppl_json_has_one_shape(tiny_path, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Boats cross the river at dawn. " * 6)
    shapes = []
    for kv in ("q8_0", "fp32,q8_0"):
        assert main(["ppl", "--model", str(tiny_path), "--text", str(text), "--kv", kv,
                     "--backend", "numpy", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        shapes.append(sorted(k for k in out if k != "rows"))
        assert [r["kv"] for r in out["rows"]] == kv.split(",")
    assert shapes[0] == shapes[1]
    # the row of q8_0 alone and the q8_0 row of the table: the same run, the same numbers
    assert main(["ppl", "--model", str(tiny_path), "--text", str(text), "--kv", "q8_0",
                 "--backend", "numpy", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["rows"][0]
    assert main(["ppl", "--model", str(tiny_path), "--text", str(text), "--kv", "fp32,q8_0",
                 "--backend", "numpy", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["rows"]
    assert table[1]["ppl"] == alone["ppl"] and "mean_kl" in table[1] and "mean_kl" not in alone


def test_ppl_streams_rows_and_ctrl_c_prints_the_finished_ones(tiny_path, tmp_path):
    """Each row prints as soon as its runs finish; SIGINT (Ctrl-C) during a later row leaves
    the finished rows printed and exits 130."""
    text = tmp_path / "t.txt"
    text.write_text("The ferry leaves at nine and returns before the tide turns. " * 60)
    proc = subprocess.Popen([sys.executable, "-m", "quantref.cli", "ppl", "--model",
                             str(tiny_path), "--text", str(text), "--backend", "numpy",
                             "--kv", "fp32,fp16,q8_0,q4_0,turbo_kv_4b", "--perturb", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]  # settings, head, rule, first row
        assert lines[3].split()[0] == "fp32", lines
        assert proc.poll() is None  # the first row came while the others were still running
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    rows = [line.split()[0] for line in lines[3:] + rest.splitlines()]
    assert rows[0] == "fp32" and len(rows) < 5  # what finished, then no more

    # --json: one object with the rows finished and "interrupted": true. Nothing shows when the
    # runs have begun, so SIGINT goes after a delay; one that lands while Python is still
    # importing (a loaded machine) is Python's own KeyboardInterrupt, not ours: try a longer one.
    for delay in (4, 12, 36):
        proc = subprocess.Popen([sys.executable, "-m", "quantref.cli", "ppl", "--model",
                                 str(tiny_path), "--text", str(text), "--backend", "numpy",
                                 "--kv", "fp32,fp16,q8_0,q4_0,turbo_kv_4b", "--perturb", "3",
                                 "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        if "Traceback" not in err:
            break
    assert proc.returncode == 130, err
    result = json.loads(out)
    assert result["interrupted"] is True and len(result["rows"]) < 5
    assert [r["kv"] for r in result["rows"]] == ["fp32", "fp16", "q8_0", "q4_0"][
        :len(result["rows"])]


def test_options_that_do_not_apply_are_errors(tiny_path, tmp_path, capsys):
    for args, message in (
            (["ppl", "--v", "q4"], "--v applies to turbo_kv K types only"),
            (["ppl", "--kv", "q8_0,fp16", "--k-window", "8"], "--k-window applies to turbo_kv"),
            (["ppl", "--score-path", "dequant"], "--score-path applies to turbo_kv"),
            (["generate", "-p", "x", "--kv", "q4_0", "--v", "q2"], "--v applies to turbo_kv"),
            (["ppl", "--backend", "numpy", "--weights", "float"],
             "--weights applies to the MLX backend"),
            (["generate", "-p", "x", "--backend", "numpy", "--sync-every-op"],
             "--sync-every-op applies to the MLX backend")):
        with pytest.raises(SystemExit) as e:  # in-process: the message the user sees
            main([*args, "--model", str(tiny_path)])
        assert message in str(e.value.code), (args, e.value.code)
    # fetch and info do not take what they would not use
    for args in (["fetch", "--backend", "numpy"], ["fetch", "--weights", "float"],
                 ["info", "--sync-every-op"], ["info", "--kv", "q8_0"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err, args
    p = run("ppl", "--v", "q4", "--model", str(tiny_path))  # as a user sees it: one line
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "quantref: error: --v applies to turbo_kv K types only, and --kv fp32 has none"]
    # with a turbo type in the list they apply, to it alone
    text = tmp_path / "t.txt"
    text.write_text("Short, but long enough to score. " * 3)
    assert main(["ppl", "--model", str(tiny_path), "--text", str(text), "--backend", "numpy",
                 "--kv", "q8_0,turbo_kv_4b", "--v", "q4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["kv"] for r in rows] == ["fp32", "q8_0", "turbo_kv_4b/v=q4"]


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


# The main job on the real default model (`quantref ppl` with no arguments) is
# tests/test_docs.py::test_readme_shows_what_quantref_ppl_prints: its output must be the README's.
