"""--ds auto (the default of the command line and of the library Config): s = 2, or 1 when a cut's feature
map is 8x8 or smaller; the choice is written to config.json, so --resume and --fork keep it."""
from __future__ import annotations

import json

import pytest

from layerpar_fast.cli import main
from layerpar_fast.config import ConfigError, make_config
from layerpar_fast.trainer import auto_ds

QUICK = ["--subset", "256", "--test-subset", "128", "--batch-size", "64", "--no-progress", "--threads", "1",
         "--transport", "local", "--kappa-iters", "2", "--bn-recalib-batches", "1"]


@pytest.mark.parametrize("shapes, s", [
    ([(32, 16, 16)], 2),                                   # ResNet-20, K = 2
    ([(16, 32, 32), (32, 16, 16)], 2),                     # K = 3
    ([(16, 32, 32), (32, 16, 16), (64, 8, 8)], 1),         # K = 4: a cut on the 8x8 map
    ([(8, 28, 28), (32, 14, 14), (32, 14, 14)], 2),        # mnist_resnet, K = 4 (7x7 grids)
    ([(32, 10, 10)], 2),
    ([(32, 9, 9)], 1),                                     # s = 2 would not divide it
    ([(32, 12, 9)], 1),
    ([(32, 7, 7)], 1),
    ([], 1),
])
def test_auto_ds_rule(shapes, s):
    assert auto_ds(shapes) == s


def test_auto_is_the_default_and_config_json_names_the_choice(tmp_path, capsys):
    run = tmp_path / "r"
    # mnist_resnet at K = 4 cuts 3,4,5: maps 28x28 and 14x14 -> s = 2
    assert main(["train", *QUICK, "--stages", "4", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["ds"] == 2
    assert "--ds auto: s = 2" in capsys.readouterr().out
    # ResNet-20 on 28x28 images cut on its 7x7 map -> s = 1, named in the log
    run1 = tmp_path / "r1"
    assert main(["train", *QUICK, "--model", "resnet20", "--stages", "2", "--cuts", "8", "--out", str(run1)]) == 0
    assert json.loads((run1 / "config.json").read_text())["ds"] == 1
    assert "--ds auto: s = 1 (a cut's map is 8x8 or smaller" in capsys.readouterr().out
    # an explicit value wins; "auto" spelled out; the resolved value resumes
    run2 = tmp_path / "r2"
    assert main(["train", *QUICK, "--model", "resnet20", "--stages", "2", "--cuts", "8", "--ds", "auto",
                 "--schedule", "serial:1",
                 "--out", str(run2)]) == 0
    assert json.loads((run2 / "config.json").read_text())["ds"] == 1
    assert main(["train", "--resume", str(run2), "--schedule", "serial:2"]) == 0


def test_bad_ds_values_are_one_line(capsys):
    assert main(["train", "--ds", "3"]) == 2
    assert "--ds: invalid choice: '3' (choose from auto, 1, 2, 4, 8)" in capsys.readouterr().err
    assert make_config({"ds": "auto"}).ds == 0
    with pytest.raises(ConfigError, match="--ds must be one of auto, 1, 2, 4, 8"):
        make_config({"ds": 3})


def test_the_library_default_is_auto_too():
    """Config() (the library's default) resolves s like the command line: 2 on mnist_resnet's
    14x14 cut at K = 2, and what it picked is the trainer's configuration from then on."""
    from layerpar_fast.config import Config
    from layerpar_fast.trainer import HybridTrainer
    assert Config().ds == 0
    cfg = make_config(method="al", stages=2, subset=64, test_subset=32, batch_size=32, progress=False,
                      threads=1, schedule="parallel:1", kappa_iters=2, bn_recalib_batches=1, augment="none")
    assert cfg.ds == 0
    tr = HybridTrainer(cfg)
    assert tr.cfg.ds == 2 and tr.filt.s == 2
    assert make_config(method="serial").ds == 0
