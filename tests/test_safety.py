"""Safe for real users: impossible arguments are refused before anything is touched; a run
directory is never replaced unasked (and --overwrite keeps the old run until the new one has a
checkpoint); eval never reports on a model of another architecture or over another evaluation's
report; a failing experiment or Ctrl-C loses nothing; a corrupt file gets one line that names it;
training is bitwise reproducible on several CPU threads."""

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

import data
import eval as ev
import train
import writesae
from models import load_model
from models.hub import CheckpointError
from test_train import args, corpus, gdn_dir, sae_tensors, tiny_model  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--epochs", "1"]  # 8 steps: one validation, one checkpoint
CPU = ["--device", "cpu"]


class NotATensor:  # pickled by reference: torch.load(weights_only=True) must refuse it
    pass


def truncate(f: Path):
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])


def train_error(argv) -> str:
    """train.main's one-line error (Ctrl-C escaping as a traceback fails the test)."""
    try:
        train.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped train.main")
    except SystemExit as e:
        msg = e.code
        assert isinstance(msg, str) and msg.startswith("train.py: error: ") and "\n" not in msg, msg
        return msg
    pytest.fail("train.main did not refuse")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(gdn_dir, corpus, tmp_path_factory):
    """A finished run (best/ and last/) on the tiny GDN model."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train.main(args(gdn_dir, corpus, run, *QUICK))
    return run


# ---- arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--batch", "0"), ("--seq-len", "0"), ("--log-every", "0"), ("--extract-batch", "0"),
    ("--n-seqs", "0"), ("--epochs", "0"), ("--eval-every", "0"), ("--val-states", "0"),
    ("--max-steps", "0"), ("--n-feat", "0"), ("--k", "0"), ("--val-frac", "0"), ("--val-frac", "1"),
    ("--lr", "0"), ("--lr", "nan"), ("--lr", "-1e-3"), ("--lr-end", "1"), ("--lr-end", "nan"),
])
def test_train_refuses_impossible_arguments(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args([flag, value])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"error: argument {flag}: " in err and "\n" not in err, err


@pytest.mark.parametrize("argv", [["--exp", ","], ["--max-blocks", "0"], ["--boot", "0"],
                                  ["--sign-n", "0"], ["--cf-h", "0,-1"], ["--head", "-1"]])
def test_eval_refuses_impossible_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ev.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"error: argument {argv[0]}: " in err and "\n" not in err, err


# ---- run directories ----------------------------------------------------------------------------

def test_out_that_is_not_a_run_is_refused(gdn_dir, corpus, tmp_path):
    ckpt = shutil.copytree(gdn_dir, tmp_path / "ckpt")  # a model checkpoint: config.json, weights
    cfg_only, other = tmp_path / "cfg_only", tmp_path / "other"
    cfg_only.mkdir(), other.mkdir()
    (cfg_only / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    (other / "notes.txt").write_text("mine")
    for out in (ckpt, cfg_only, other):
        before = {f.name: f.read_bytes() for f in out.iterdir()}
        assert "is not a train.py run directory" in train_error(args(gdn_dir, corpus, out, *QUICK))
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_overwrite_replaces_a_run_only_at_its_first_checkpoint(trained, gdn_dir, corpus, tmp_path,
                                                               monkeypatch):
    run = shutil.copytree(trained, tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "report.md").write_text("the old run's report")
    old = sae_tensors(run, "best")
    new_args = args(gdn_dir, corpus, run, *QUICK, "--seed", "1")
    msg = train_error(new_args)
    assert "holds a run: continue it with --resume, or replace it with --overwrite" in msg
    assert same(sae_tensors(run, "best"), old)

    def ctrl_c(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(writesae, "train_step", ctrl_c)  # Ctrl-C at the new run's first step
    with pytest.raises(SystemExit) as e:
        train.main(new_args + ["--overwrite"])
    assert e.value.code == 130
    monkeypatch.undo()
    train.recover(run)  # what the next start does: the replaced run comes back whole
    assert same(sae_tensors(run, "best"), old) and (run / "eval" / "report.md").exists()
    assert json.loads((run / "config.json").read_text())["args"]["seed"] == 42
    assert not (run / "replaced").exists()

    train.main(new_args + ["--overwrite"])
    assert not same(sae_tensors(run, "best"), old)
    assert not (run / "eval").exists() and not (run / "replaced").exists()
    assert json.loads((run / "config.json").read_text())["args"]["seed"] == 1


def test_ctrl_c_during_extraction_exits_130(gdn_dir, corpus, tmp_path, monkeypatch, capsys):
    def ctrl_c(*_, **__):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "extract", ctrl_c)
    try:
        train.main(args(gdn_dir, corpus, tmp_path / "run"))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped train.main")
    except SystemExit as e:
        assert e.code == 130 and capsys.readouterr().err.strip() == "train.py: interrupted"


# ---- corrupt files ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["last/train_state.pt", "last/sae.safetensors", "config.json",
                                  "pickle"])
def test_resume_with_a_corrupt_file_names_it(name, trained, gdn_dir, corpus, tmp_path):
    run, pickled = shutil.copytree(trained, tmp_path / "run"), name == "pickle"
    if pickled:
        name = "last/train_state.pt"
        torch.save({"step": NotATensor()}, run / name)
    else:
        truncate(run / name)
    msg = train_error(args(gdn_dir, corpus, run, *QUICK, "--resume"))
    assert str(run / name) in msg and ("refuses" in msg) == pickled, msg


@pytest.mark.parametrize("name", ["config.json", "blocks.json", "blocks.safetensors",
                                  "best/cfg.json", "best/sae.safetensors"])
def test_eval_with_a_corrupt_file_names_it(name, trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    truncate(run / name)
    with pytest.raises(ValueError) as e:
        ev.main(["--run", str(run), *CPU, "--exp", "partition"])
    assert str(run / name) in str(e.value) and "\n" not in str(e.value), e.value


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json",
                                  "pytorch_model.bin"])
def test_load_model_with_a_corrupt_file_names_it(name, gdn_dir, tmp_path):
    d = shutil.copytree(gdn_dir, tmp_path / "model")
    if name == "pytorch_model.bin":  # a pickle that would run code
        (d / "model.safetensors").unlink()
        torch.save({"weight": NotATensor()}, d / name)
    else:
        truncate(d / name)
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert str(d / name) in str(e.value) and "\n" not in str(e.value), e.value
    assert ("weights_only" in str(e.value)) == (name == "pytorch_model.bin")


# ---- eval on a run ------------------------------------------------------------------------------

def saved(model_dir, tokenizer_dir, arch, seed=0):
    mod, m = tiny_model(arch, seed)
    mod.save_pretrained(m, model_dir, dtype=torch.float32)
    shutil.copy(tokenizer_dir / "tokenizer.json", model_dir)
    return str(model_dir)


def test_eval_checks_the_model_and_never_overwrites_another_report(trained, corpus, tmp_path,
                                                                   capsys):
    mamba, out = saved(tmp_path / "mamba2", corpus, "mamba2"), tmp_path / "report"
    with pytest.raises(ValueError, match=f"is a mamba2 model; {trained} was trained on .*, a qwen"):
        ev.main(["--run", str(trained), "--model", mamba, *CPU, "--exp", "partition"])

    ev.main(["--run", str(trained), *CPU, "--exp", "partition", "--out", str(out)])
    report = (out / "report.json").read_text()
    other = saved(tmp_path / "other", corpus, "qwen35", seed=1)  # same shapes, other weights
    capsys.readouterr()
    with pytest.raises(ValueError, match="reports another evaluation"):
        ev.main(["--run", str(trained), "--model", other, *CPU, "--exp", "partition",
                 "--out", str(out)])
    assert (out / "report.json").read_text() == report
    assert f"warning: {trained} was trained on" in capsys.readouterr().err
    ev.main(["--run", str(trained), *CPU, "--exp", "partition", "--out", str(out)])  # same: fine


def test_eval_without_best_says_use_last(trained, tmp_path):
    run = shutil.copytree(trained, tmp_path / "run")
    shutil.rmtree(run / "best")  # a run stopped before its first validation has only last/
    with pytest.raises(ValueError, match="has no best/ SAE yet: use --sae last"):
        ev.main(["--run", str(run), *CPU, "--exp", "partition"])
    assert ev.main(["--run", str(run), *CPU, "--exp", "partition", "--sae", "last"])["partition"]


def test_a_failed_or_interrupted_experiment_keeps_the_others(trained, tmp_path, monkeypatch):
    def broken(*_):
        raise RuntimeError("shapes do not match\nsecond line")
    monkeypatch.setitem(ev.EXPERIMENTS, "closed", broken)
    out = tmp_path / "a"
    res = ev.main(["--run", str(trained), *CPU, "--exp", "partition,closed,sign", "--sign-n", "8",
                   "--out", str(out)])
    rep = json.loads((out / "report.json").read_text())
    assert rep["closed"] == res["closed"] == {"error": "RuntimeError: shapes do not match"}
    assert rep["partition"]["alive"] > 0 and rep["sign"]["n"] == 8
    assert "- closed: RuntimeError: shapes do not match" in (out / "report.md").read_text()

    def ctrl_c(*_):
        raise KeyboardInterrupt
    monkeypatch.setitem(ev.EXPERIMENTS, "closed", ctrl_c)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        ev.main(["--run", str(trained), *CPU, "--exp", "partition,closed", "--out", str(out)])
    rep = json.loads((out / "report.json").read_text())  # written as partition finished
    assert rep["partition"]["alive"] > 0 and "closed" not in rep


def test_eval_command_exits_nonzero_when_an_experiment_fails(trained, tmp_path, monkeypatch):
    """The command line: the tiny corpus has no '.', so amplify (features selected before '.') fails."""
    out = tmp_path / "rep"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--run", str(trained), *CPU, "--exp",
                                      "partition,amplify", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "eval.py"), run_name="__main__")
    assert e.value.code == "eval.py: error: amplify failed (named in the report)"
    rep = json.loads((out / "report.json").read_text())
    assert rep["partition"]["alive"] > 0
    assert rep["amplify"]["error"].startswith("ValueError: no '.' token")

    def ctrl_c(*_, **__):
        raise KeyboardInterrupt
    monkeypatch.setattr("models.load_model", ctrl_c)  # Ctrl-C while the model loads
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "eval.py"), run_name="__main__")
    assert e.value.code == 130


# ---- determinism --------------------------------------------------------------------------------

def test_training_is_bitwise_reproducible_on_two_threads():
    """The same steps twice give the same bits on 2 CPU threads: decode_sparse's gather
    (index_select) has a backward that sums an atom's repeated rows in a fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(2):
            cfg = writesae.SAEConfig(d_k=64, d_v=64, n_feat=2048, k=32)  # the demo's sizes
            sae = writesae.WriteSAE(cfg, seed=0)
            opt, tracker = torch.optim.Adam(sae.parameters()), writesae.DeadTracker(cfg)
            S = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
            for step in range(4):
                writesae.train_step(sae, opt, S, step, tracker, 100)
            runs.append({k: v.clone() for k, v in sae.state_dict().items()})
    finally:
        torch.set_num_threads(threads)
    assert same(*runs)
