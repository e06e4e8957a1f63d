"""--ds auto (the default of the command line and of the library Config): s = 2, or 1 when a cut's feature
map is 8x8 or smaller in an augmented run whose parallel phase is not (or s = 2 does not divide a map); the
choice is written to config.json, so --resume and --fork keep it."""
from __future__ import annotations

import json

import pytest

from layerpar_fast.cli import main
from layerpar_fast.config import ConfigError, make_config
from layerpar_fast.trainer import auto_ds

QUICK = ["--subset", "256", "--test-subset", "128", "--batch-size", "64", "--no-progress", "--threads", "1",
         "--transport", "local", "--kappa-iters", "2", "--bn-recalib-batches", "1"]


@pytest.mark.parametrize("shapes, s, s_plain", [
    ([(32, 16, 16)], 2, 2),                                   # ResNet-20, K = 2
    ([(16, 32, 32), (32, 16, 16)], 2, 2),                     # K = 3
    ([(16, 32, 32), (32, 16, 16), (64, 8, 8)], 1, 2),         # K = 4: a cut on the 8x8 map
    ([(8, 28, 28), (32, 14, 14), (32, 14, 14)], 2, 2),        # mnist_resnet, K = 4 (7x7 grids)
    ([(32, 10, 10)], 2, 2),
    ([(32, 9, 9)], 1, 1),                                     # s = 2 would not divide it
    ([(32, 12, 9)], 1, 1),
    ([(32, 7, 7)], 1, 1),
    ([(32, 4, 4)], 1, 2),
    ([], 1, 1),
])
def test_auto_ds_rule(shapes, s, s_plain):
    """s: the serial epochs augment and the parallel phase does not; s_plain: no augmentation (or the
    phase augments too), where the 4x4 grid of an 8x8 map is kept (round 9: +2.47 against +0.26)."""
    assert auto_ds(shapes) == auto_ds(shapes, augmented_serial=True) == s
    assert auto_ds(shapes, augmented_serial=False) == s_plain


def tiny32(augment):
    """A ResNet-20-shaped case on 32x32 images cut on its 8x8 map, with or without augmentation."""
    import torch
    from layerpar_fast.data import Dataset
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (80, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (80,), generator=g)
    data = Dataset(name="tiny32", x_train=x[:64].contiguous(), y_train=y[:64], x_test=x[64:].contiguous(),
                   y_test=y[64:], num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return data, make_config(method="al", model="resnet20", stages=2, cuts="8", batch_size=32, progress=False,
                             threads=1, schedule="parallel:1", kappa_iters=2, bn_recalib_batches=1, augment=augment,
                             eval_batch_size=16)


@pytest.mark.parametrize("augment, parallel_augment, s", [("crop_flip", "none", 1), ("none", "none", 2)])
def test_the_trainer_picks_by_augmentation(augment, parallel_augment, s):
    from layerpar_fast.trainer import HybridTrainer
    data, cfg = tiny32(augment)
    cfg.parallel_augment = parallel_augment
    logged = []
    tr = HybridTrainer(cfg, data=data, log=logged.append)
    assert tr.cut_shapes == [(64, 8, 8)] and tr.cfg.ds == s and tr.filt.s == s
    line = [m for m in logged if m.startswith("--ds auto")]
    assert line and (("sees un-augmented images between augmented serial epochs" in line[0]) == (s == 1))


def test_auto_is_the_default_and_config_json_names_the_choice(tmp_path, capsys):
    run = tmp_path / "r"
    # mnist_resnet at K = 4 cuts 3,4,5: maps 28x28 and 14x14 -> s = 2
    assert main(["train", *QUICK, "--stages", "4", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["ds"] == 2
    assert "--ds auto: s = 2" in capsys.readouterr().out
    # ResNet-20 on 28x28 images cut on its 7x7 map -> s = 1 (s = 2 does not divide 7), named in the log
    run1 = tmp_path / "r1"
    assert main(["train", *QUICK, "--model", "resnet20", "--stages", "2", "--cuts", "8", "--out", str(run1)]) == 0
    assert json.loads((run1 / "config.json").read_text())["ds"] == 1
    assert "--ds auto: s = 1 (s = 2 does not divide every cut's map" in capsys.readouterr().out
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
