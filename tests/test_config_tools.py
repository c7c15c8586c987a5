"""The generated config reference and `python -m mpiml.check_config` (which must not need MPI)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mpiml import check_config, config_doc
from mpiml.config import config_from_dict, load_config

from mpirun import REPO


def test_every_key_is_documented():
    assert config_doc.undocumented() == [], "add a comment beside these fields in mpiml/config.py"


def test_readme_config_reference_is_up_to_date():
    readme = REPO / "README.md"
    text = readme.read_text()
    assert config_doc.render_into(text, readme) == text, (
        "README.md's config reference is stale: run `python -m mpiml.config_doc --write README.md`")


def test_reference_lists_every_key_with_default_and_choices():
    ref = config_doc.reference()
    assert "| `optim.lr_scaling` | `none` | `none` \\| `linear` \\| `sqrt` |" in ref
    assert "| `train.epochs` | `10` | an integer ≥ 1 | passes over the training split |" in ref
    assert "| `log.tensorboard` | `false` | true/false |" in ref


def test_doc_tool_detects_and_fixes_a_stale_readme(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{config_doc.BEGIN}\nold table\n{config_doc.END}\nrest\n")
    assert config_doc.main(["--check", str(stale)]) == 1
    assert config_doc.main(["--write", str(stale)]) == 0
    assert config_doc.main(["--check", str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old table" not in text


def _check(*args: str) -> subprocess.CompletedProcess:
    # The child reports whether mpi4py (or torch) got imported on the way.
    code = ("import sys, runpy; sys.argv = ['check_config', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('mpiml.check_config', run_name='__main__')\n"
            "finally:\n    print('IMPORTED', sorted(m for m in ('mpi4py', 'torch') "
            "if m in sys.modules), file=sys.stderr)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_check_config_prints_the_resolved_config_without_mpi():
    done = _check("configs/digits_mlp.yaml", "--set", "optim.lr_scaling=linear", "--ranks", "4")
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stderr  # neither MPI nor torch: it runs on a login node
    assert "# with 4 rank(s): global batch 128 (4 x data.batch_size 32)" in done.stdout
    assert "# peak learning rate 0.2 (optim.lr 0.05, lr_scaling linear)" in done.stdout
    resolved = config_from_dict(yaml.safe_load(done.stdout))  # valid YAML, accepted back
    assert resolved == load_config("configs/digits_mlp.yaml", ["optim.lr_scaling=linear"])


def test_check_config_exits_2_naming_the_key():
    done = _check("configs/digits_mlp.yaml", "--set", "optim.momentum=1.5")
    assert done.returncode == 2
    assert "optim.momentum = 1.5 is invalid: expected a number in [0, 1)" in done.stderr
    assert done.stdout == ""


def test_check_config_build_catches_data_and_model_errors_before_queueing(capsys):
    ok = _check("configs/digits_mlp.yaml", "--build", "--ranks", "2")
    assert ok.returncode == 0, ok.stderr
    assert "# built: data digits (1,438 train / 359 eval" in ok.stdout
    assert "22 steps/epoch at 2 rank(s); model mlp (85,002 parameters)" in ok.stdout
    assert "'mpi4py'" not in ok.stderr.split("IMPORTED")[1]  # torch yes, MPI still no
    assert check_config.main(["configs/digits_mlp.yaml", "--build", "--ranks", "64"]) == 2
    assert "fewer than one global batch of 2048 (data.batch_size=32 x 64 ranks)" \
        in capsys.readouterr().err
    assert check_config.main(["configs/digits_mlp.yaml", "--build", "--set",
                              "model.kwargs={widht: 3}"]) == 2
    assert "unexpected keyword argument 'widht'" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_check_config_builds_every_shipped_config(config, capsys):
    code = check_config.main([str(REPO / "configs" / config), "--build", "--ranks", "2"])
    out, err = capsys.readouterr()
    if code == 2 and "DataError" in err:  # a dataset the user creates first (npy): named
        assert "data." in err and "HINT" in err, err
        return
    assert code == 0, err
    assert "# built: data " in out and "parameters)" in out
