import pytest

from layerpar_fast.config import Config, ConfigError, load_config_file, make_config, parse_schedule


def test_parse_schedule_plain_and_groups():
    assert parse_schedule("serial:1,parallel:5,serial:2") == [("serial", 1), ("parallel", 5), ("serial", 2)]
    assert parse_schedule("idle:5,serial:2") == [("idle", 5), ("serial", 2)]
    assert parse_schedule("serial:1,(parallel:2,serial:1)x2") == [
        ("serial", 1), ("parallel", 2), ("serial", 1), ("parallel", 2), ("serial", 1)]


@pytest.mark.parametrize("bad", ["", "serial", "serial:0", "paralel:2", "serial:1,,serial:2", "(serial:1)x0",
                                 "(serial:1"])
def test_parse_schedule_rejects(bad):
    with pytest.raises(ConfigError):
        parse_schedule(bad)


def test_default_schedules():
    assert make_config(method="serial", epochs=3).phases() == [("serial", 3)]
    assert make_config(method="al", epochs=8, stages=2).resolved_schedule() == "serial:2,parallel:2,serial:4"
    assert make_config(method="al", epochs=2, stages=2).resolved_schedule() == "serial:2"   # too short: serial


@pytest.mark.parametrize("kw, msg", [
    ({"epochs": -1}, "--epochs"),
    ({"batch_size": 0}, "--batch-size"),
    ({"lr": 0}, "--lr"),
    ({"method": "admm"}, "--method"),
    ({"beta": 0.0}, "--beta"),
    ({"gamma": 1.5}, "--gamma"),
    ({"gamma": 0.0}, "--gamma"),
    ({"aux_dtype": "int8"}, "--aux-dtype"),
    ({"ds": 3}, "--ds"),
    ({"window": 0}, "--window"),
    ({"method": "serial", "schedule": "serial:1,parallel:2"}, "cannot run a parallel phase"),
    ({"schedule": "serial:3", "epochs": 4}, "disagrees"),
])
def test_invalid_options(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        make_config(**kw)


def test_config_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("batch-size: 64\nlr: '0.1'\nmethod: al\nstages: 2\nschedule: serial:1,parallel:2,serial:1\n")
    cfg = make_config(load_config_file(str(y)), lr=0.2)
    assert cfg.batch_size == 64 and cfg.lr == 0.2 and cfg.method == "al"
    t = tmp_path / "c.toml"
    t.write_text('batch_size = 32\nmodel = "resnet20"\nmilestones = [0.3, 0.6]\n')
    cfg = make_config(load_config_file(str(t)))
    assert cfg.batch_size == 32 and cfg.model == "resnet20" and cfg.milestones == [0.3, 0.6]
    bad = tmp_path / "bad.yaml"
    bad.write_text("bogus_option: 1\n")
    with pytest.raises(ConfigError, match="unknown option 'bogus_option'"):
        load_config_file(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("x = = 1")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(str(broken))
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(str(tmp_path / "missing.yaml"))
    wrong = tmp_path / "w.yaml"
    wrong.write_text("batch_size: 1.5\n")
    with pytest.raises(ConfigError, match="batch_size"):
        make_config(load_config_file(str(wrong)))


def test_defaults_are_valid():
    Config().validate()


def test_tail_share_sets_the_default_schedule():
    """The default: the serial tail takes two thirds of the epochs, the warm start 0.3 of them out of
    the tail (the accuracy matrix, docs/results.md)."""
    assert make_config(method="al", epochs=8).resolved_schedule() == "serial:2,parallel:2,serial:4"
    assert make_config(method="al", epochs=18).resolved_schedule() == "serial:5,parallel:5,serial:8"
    assert make_config(method="al", epochs=8, warm_share=0.0).resolved_schedule() == "serial:1,parallel:2,serial:5"
    assert make_config(method="al", epochs=8, tail_share=0.25).resolved_schedule() == "serial:2,parallel:5,serial:1"
    assert make_config(method="al", epochs=8, tail_share=0.25, warm_share=0).resolved_schedule() == "serial:1,parallel:5,serial:2"
    assert make_config(method="al", epochs=8, tail_share=0.5).resolved_schedule() == "serial:2,parallel:3,serial:3"
    assert make_config(method="al", epochs=18, tail_share=0.5, warm_share=0).resolved_schedule() == "serial:1,parallel:8,serial:9"
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ConfigError, match="--tail-share"):
            make_config(method="al", epochs=8, tail_share=bad)
    # too few epochs for a parallel phase: serial back-propagation (the trainer warns)
    cfg = make_config(method="al", epochs=4)
    assert cfg.resolved_schedule() == "serial:4" and cfg.default_schedule_is_serial()
    assert make_config(method="al", epochs=5).resolved_schedule() == "serial:2,parallel:1,serial:2"
    assert make_config(method="al", epochs=5, warm_share=0).resolved_schedule() == "serial:1,parallel:1,serial:3"
    assert not make_config(method="al", schedule="serial:4").default_schedule_is_serial()


def test_the_default_parallel_phase_must_reach_every_cut():
    """With K stages the default schedule has a parallel phase only if it lasts at least K − 1
    epochs (the signal moves one cut per parallel epoch); shorter budgets run serial."""
    for k, first in ((1, 5), (2, 5), (3, 8), (4, 11), (8, 23)):
        assert f",parallel:{max(1, k - 1)}," in make_config(method="al", stages=k, epochs=first).resolved_schedule()
        assert make_config(method="al", stages=k, epochs=first - 1).resolved_schedule() == f"serial:{first - 1}"
        assert make_config(method="al", stages=k, epochs=8).min_epochs_for_parallel() == first
    assert make_config(method="al", stages=4, epochs=8).default_schedule_is_serial()
    assert make_config(method="al", stages=4, epochs=11).resolved_schedule() == "serial:3,parallel:3,serial:5"
    assert make_config(method="al", stages=4, epochs=12).resolved_schedule() == "serial:4,parallel:3,serial:5"
    assert make_config(method="al", stages=4, epochs=18).resolved_schedule() == "serial:5,parallel:5,serial:8"
    assert make_config(method="al", stages=2, epochs=8).resolved_schedule() == "serial:2,parallel:2,serial:4"
    assert make_config(method="al", stages=4, epochs=18, warm_share=0).resolved_schedule() == "serial:1,parallel:5,serial:12"
    # a shorter tail leaves room for the phase earlier; an explicit schedule is never changed
    assert make_config(method="al", stages=4, epochs=8, tail_share=0.25).resolved_schedule() == "serial:2,parallel:5,serial:1"
    assert make_config(method="al", stages=4, schedule="serial:1,parallel:1,serial:6").resolved_schedule() \
        == "serial:1,parallel:1,serial:6"
    # replicas do not change the number of cuts a signal crosses
    assert make_config(method="al", stages=4, replicas=2, epochs=8).resolved_schedule() == "serial:8"


def test_stage_lr_and_mult_init_choices_are_checked():
    assert make_config(method="al", stage_lr="staleness", mult_init="grad").stage_lr == "staleness"
    with pytest.raises(ConfigError, match="--stage-lr 'fast' is not one of uniform, staleness"):
        make_config(method="al", stage_lr="fast")
    with pytest.raises(ConfigError, match="--mult-init 'ones' is not one of zero, grad"):
        make_config(method="al", mult_init="ones")


def test_type_errors_speak_plain_words_and_unused_options_are_listed():
    from layerpar_fast.config import ignored_options
    with pytest.raises(ConfigError, match="expected an integer, got 1.5"):
        make_config({"batch_size": 1.5})
    with pytest.raises(ConfigError, match="expected a number"):
        make_config({"lr": "fast"})
    assert ignored_options(make_config(method="serial", parallel_augment="shift", mult_init="grad")) == \
        ["--parallel-augment", "--mult-init"]
    assert ignored_options(make_config(method="al", stages=2, epochs=8, parallel_augment="shift")) == []


def test_warm_share_moves_the_parallel_phase_later():
    """--warm-share lengthens the serial warm start at the tail's expense; the parallel phase keeps
    its length (and so its share of the budget and the budgets that have one)."""
    def sched(**kw):
        return make_config(method="al", **kw).resolved_schedule()
    assert sched(epochs=10, stages=2, warm_share=0.3) == "serial:3,parallel:2,serial:5"
    assert sched(epochs=8, stages=2, warm_share=0.3) == "serial:2,parallel:2,serial:4"
    assert sched(epochs=18, stages=2, warm_share=0.3) == "serial:5,parallel:5,serial:8"
    assert sched(epochs=11, stages=4, warm_share=0.3) == "serial:3,parallel:3,serial:5"
    assert sched(epochs=8, stages=4, warm_share=0.3) == "serial:8"          # still too short at K = 4
    assert sched(epochs=10, stages=2, warm_share=0.0) == "serial:1,parallel:2,serial:7"
    assert sched(epochs=10, stages=2, warm_share=0.9) == "serial:7,parallel:2,serial:1"   # the tail keeps 1
    for k in (2, 3, 4, 8):
        assert make_config(method="al", stages=k, warm_share=0.3).min_epochs_for_parallel() \
            == make_config(method="al", stages=k).min_epochs_for_parallel()
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="--warm-share"):
            make_config(method="al", epochs=8, warm_share=bad)


def test_aug_parallel_share_gives_unaugmented_parallel_epochs_to_the_tail():
    """With augmented serial epochs and an un-augmented parallel phase, the default schedule keeps
    ceil(P x share) parallel epochs (at least K - 1) and the tail takes the rest; nothing changes
    without augmentation, with shift views in the parallel phase, or with an explicit schedule."""
    def sched(**kw):
        kw = {"method": "al", "warm_share": 0.3, "aug_parallel_share": 0.5, "aug_warm_share": 0.0, **kw}
        return make_config(**kw).resolved_schedule()
    assert sched(epochs=10, stages=2, dataset="cifar10") == "serial:3,parallel:1,serial:6"      # auto: crop_flip
    assert sched(epochs=10, stages=2, dataset="cifar10", augment="none") == "serial:3,parallel:2,serial:5"
    assert sched(epochs=10, stages=2, dataset="cifar10", parallel_augment="shift") == "serial:3,parallel:2,serial:5"
    assert sched(epochs=10, stages=2, dataset="cifar10", aug_parallel_share=1.0) == "serial:3,parallel:2,serial:5"
    assert sched(epochs=8, stages=2, dataset="mnist") == "serial:2,parallel:2,serial:4"          # auto: none
    assert sched(epochs=8, stages=2, dataset="mnist", augment="shift") == "serial:2,parallel:1,serial:5"
    assert sched(epochs=18, stages=2, dataset="cifar100") == "serial:5,parallel:3,serial:10"     # ceil(2.5)
    assert sched(epochs=12, stages=4, dataset="cifar10") == "serial:4,parallel:3,serial:5"       # K - 1 kept
    assert sched(epochs=10, stages=4, dataset="cifar10") == "serial:10"                         # none before
    assert sched(epochs=10, stages=2, dataset="cifar10", schedule="serial:1,parallel:8,serial:1") \
        == "serial:1,parallel:8,serial:1"
    assert make_config(method="al", dataset="cifar10").augments()
    assert not make_config(method="al", dataset="embedded").augments()
    assert not make_config(method="al", dataset="/data/mine.npz").augments()   # the trainer decides
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="--aug-parallel-share"):
            make_config(method="al", epochs=8, aug_parallel_share=bad)


def test_aug_warm_share_moves_an_unaugmented_parallel_phase_later():
    """With K >= 3 stages, augmented serial epochs and an un-augmented parallel phase, the warm start
    takes max(warm_share, aug_warm_share) of the epochs, leaving a tail at least as long as the phase
    (rounds 7 and 8: K = 4 on augmented CIFAR-10); nothing changes at K = 2, without augmentation,
    with shift views in the parallel phase or with aug_warm_share 0."""
    def sched(**kw):
        return make_config(**{"method": "al", **kw}).resolved_schedule()
    assert make_config().aug_warm_share == 0.65 and make_config().aug_parallel_share == 0.5
    assert sched(epochs=18, stages=4, dataset="cifar10") == "serial:12,parallel:3,serial:3"
    assert sched(epochs=18, stages=3, dataset="cifar10") == "serial:12,parallel:3,serial:3"  # max(2, ceil(2.5))
    assert sched(epochs=30, stages=4, dataset="cifar10") == "serial:20,parallel:5,serial:5"
    # round(0.65 * 12) = 8 would leave a 1-epoch tail after a 3-epoch phase: the tail keeps 3
    assert sched(epochs=12, stages=4, dataset="cifar10") == "serial:6,parallel:3,serial:3"
    assert sched(epochs=10, stages=4, dataset="cifar10") == "serial:10"                    # no phase of K - 1 epochs
    assert sched(epochs=18, stages=2, dataset="cifar10") == "serial:5,parallel:3,serial:10"   # K = 2: the tail keeps them
    assert sched(epochs=10, stages=2, dataset="cifar10") == "serial:3,parallel:1,serial:6"
    assert sched(epochs=8, stages=2, dataset="mnist", augment="shift") == "serial:2,parallel:1,serial:5"
    assert sched(epochs=18, stages=4, dataset="cifar10", aug_warm_share=0.0) == "serial:5,parallel:3,serial:10"
    assert sched(epochs=18, stages=4, dataset="cifar10", aug_warm_share=0.45) == "serial:8,parallel:3,serial:7"
    assert sched(epochs=18, stages=4, dataset="cifar10", augment="none") == "serial:5,parallel:5,serial:8"
    assert sched(epochs=18, stages=4, dataset="cifar10", parallel_augment="shift") == "serial:5,parallel:5,serial:8"
    assert sched(epochs=18, stages=4, dataset="mnist") == "serial:5,parallel:5,serial:8"      # grey: no change
    # the larger of the two shares, within both limits (the tail keeps the phase's length)
    assert sched(epochs=18, stages=4, dataset="cifar10", warm_share=0.6, aug_warm_share=0.0) == \
        "serial:11,parallel:3,serial:4"
    assert sched(epochs=18, stages=4, dataset="cifar10", aug_warm_share=0.9) == "serial:12,parallel:3,serial:3"
    assert sched(epochs=18, stages=4, dataset="cifar10", aug_parallel_share=1.0) == "serial:8,parallel:5,serial:5"
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="--aug-warm-share"):
            make_config(method="al", epochs=8, aug_warm_share=bad)
