"""Shift and mirror views of the parallel phase (layerpar_fast/paraug.py, --parallel-augment shift | shift_flip)."""
import pytest
import torch

from layerpar_fast.config import ConfigError
from layerpar_fast.paraug import FlipViews, ShiftAugment, translate, visible
from layerpar_fast.monitors import frozen_bn_stats

from test_engine import _run_epoch, assert_all_same, assert_same, interleaving_results, params, trainer


def _translate_loop(x, d):
    out = torch.zeros_like(x)
    b, c, h, w = x.shape
    for i in range(b):
        dy, dx = int(d[i, 0]), int(d[i, 1])
        for y in range(h):
            for xx in range(w):
                if 0 <= y - dy < h and 0 <= xx - dx < w:
                    out[i, :, y, xx] = x[i, :, y - dy, xx - dx]
    return out


@pytest.mark.parametrize("shape", [(1, 1, 4, 4), (3, 5, 6, 8), (4, 3, 7, 5)])
def test_translate_matches_definition_and_adjoint(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    m = min(shape[-2:]) - 1
    d = torch.randint(-m, m + 1, (shape[0], 2), generator=g)
    y = translate(x, d)
    assert torch.equal(y, _translate_loop(x, d))
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    # <T x, w> = <x, T^-1 w>: translating back is the adjoint, and autograd uses it
    assert torch.allclose((y * w).sum(), (x * translate(w, -d)).sum(), rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda t: translate(t, d), (xg,))
    # a round trip keeps exactly the positions that stayed in view, zero elsewhere
    back = translate(y, -d)
    vis = visible(d, shape[2], shape[3])
    assert torch.equal(back, torch.where(vis, x, torch.zeros((), dtype=x.dtype)))


def test_translate_keeps_channels_last_and_rejects_bad_shifts():
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y = translate(x, torch.tensor([[1, -2], [0, 3]]))
    assert y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="does not fit"):
        translate(x, torch.tensor([[6, 0], [0, 0]]))
    with pytest.raises(ValueError, match="B, 2"):
        translate(x, torch.tensor([1, 2]))


def test_shift_unit_and_draws():
    assert ShiftAugment.unit_for((32, 32), [(16, 16)]) == 2
    assert ShiftAugment.unit_for((32, 32), [(16, 16), (4, 4)]) == 8
    assert ShiftAugment.unit_for((28, 28), [(14, 14), (7, 7)]) == 4
    with pytest.raises(ValueError, match="does not divide"):
        ShiftAugment.unit_for((32, 32), [(12, 12)])
    aug = ShiftAugment(4, 2, (32, 32), seed=3)
    a = aug.shifts(1, 5, 500)
    assert torch.equal(a, ShiftAugment(4, 2, (32, 32), seed=3).shifts(1, 5, 500))   # same on every stage
    assert not torch.equal(a, aug.shifts(1, 6, 500)) and not torch.equal(a, aug.shifts(2, 5, 500))
    assert set(a.unique().tolist()) == {-4, -2, 0, 2, 4}
    # pixel shifts become whole cells of every map: 2 px is one cell of a 16x16 grid
    assert torch.equal(aug.scaled(torch.tensor([[4, -2]]), (16, 16)), torch.tensor([[2, -1]]))
    with pytest.raises(ValueError, match="whole cells"):
        aug.scaled(torch.tensor([[2, 0]]), (8, 8))


def test_view_fills_the_image_border_with_the_given_value():
    aug = ShiftAugment(2, 1, (4, 4), seed=0)
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(1, 2, 4, 4)
    fill = torch.tensor([-1.5, 7.0]).reshape(2, 1, 1)
    v = aug.view(x, torch.tensor([[1, 0]]), fill=fill)
    assert torch.equal(v[0, :, 0], fill[:, :, 0].expand(2, 4))   # the row that came in is the fill
    assert torch.equal(v[0, :, 1:], x[0, :, :3])


def _shift_trainer(**kw):
    base = dict(augment="crop_flip", parallel_augment="shift")
    base.update(kw)
    return trainer(**base)


def test_zero_shifts_are_the_plain_parallel_phase(monkeypatch):
    """With every drawn shift 0 the shift path computes exactly the unaugmented parallel phase."""
    plain = trainer(augment="crop_flip")
    plain.run()
    monkeypatch.setattr(ShiftAugment, "shifts", lambda self, e, t, n: torch.zeros(n, 2, dtype=torch.long))
    shifted = _shift_trainer()
    assert shifted.shift_aug is not None and shifted.shift_aug.unit == 2
    shifted.run()
    assert_same(params(plain.model), params(shifted.model))


def test_shifts_change_the_training():
    plain = trainer(augment="crop_flip")
    plain.run()
    shifted = _shift_trainer()
    shifted.run()
    assert any(not torch.equal(a, b) for a, b in zip(params(plain.model), params(shifted.model)))


@pytest.mark.parametrize("method, order", [("al", "gs"), ("al", "jacobi"), ("penalty", "jacobi")])
def test_shifted_parallel_phase_is_deterministic_and_stores_stay_mirrored(method, order):
    """Any stage interleaving gives the same parameters and stores, and stage k+1's input store
    still mirrors stage k's targets (docs/method.md §5 semantics kept under shift views)."""
    def mirrored(tr):
        for k in range(len(tr.stages) - 1):
            assert torch.equal(tr.stores["target"][k].table, tr.stores["input"][k + 1].table)

    assert_all_same(interleaving_results(lambda: _shift_trainer(method=method, al_order=order, window=1),
                                         seed=2, check=mirrored))


@pytest.mark.parametrize("method, order", [("al", "gs"), ("al", "jacobi"), ("penalty", "jacobi")])
def test_store_positions_outside_the_view_keep_their_values(monkeypatch, method, order):
    """An unshifted epoch, then one with every sample shifted down by 4 px: the last 2 rows of each
    4x4 coarse grid leave the view, so the second epoch changes λ̃ and u only in the first 2 rows."""
    shift = {"d": 0}
    monkeypatch.setattr(ShiftAugment, "shifts",
                        lambda self, e, t, n: torch.tensor([[shift["d"], 0]]).expand(n, 2).contiguous())
    tr = _shift_trainer(method=method, al_order=order, cuts=(2,))
    tr._enter_parallel(0, 0)
    _run_epoch(tr, 0, sorted)
    lam0 = tr.stores["target"][0].table.clone()
    mult = tr.stores["mult"][0]
    u0 = None if mult is None else mult.table.clone()
    assert u0 is None or float(u0[:, :, 2:].abs().min()) > 0.0
    shift["d"] = 4
    _run_epoch(tr, 1, sorted)
    lam1 = tr.stores["target"][0].table
    assert lam1.shape[-2:] == (4, 4)
    assert torch.equal(lam1[:, :, 2:], lam0[:, :, 2:])
    assert not torch.equal(lam1[:, :, :2], lam0[:, :, :2])
    if mult is not None:
        assert torch.equal(mult.table[:, :, 2:], u0[:, :, 2:])
        assert not torch.equal(mult.table[:, :, :2], u0[:, :, :2])
    assert torch.equal(tr.stores["input"][1].table, lam1)


def test_bad_shift_configurations_fail_before_training():
    with pytest.raises(ConfigError, match="--augment is none"):
        trainer(augment="none", parallel_augment="shift")
    with pytest.raises(ConfigError, match="steps of 8 px"):
        _shift_trainer(ds=8, cuts=(2,))
    with pytest.raises(ConfigError, match="--parallel-augment 'flip'"):
        trainer(parallel_augment="flip")


def test_shift_views_with_channels_last():
    """The shift path keeps working in channels_last (stage inputs and outputs keep the format)."""
    ref = _shift_trainer()
    ref.run()
    cl = _shift_trainer(channels_last=True)
    cl.run()
    for a, b in zip(params(ref.model), params(cl.model)):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- mirror views


def test_flip_views_alternate_and_cover_both_views():
    fv = FlipViews(1000, seed=5)
    idx = torch.randperm(1000)
    v0, v1 = fv.views(idx, 0), fv.views(idx, 1)
    s0, m0 = fv.samples(v0)
    assert torch.equal(s0, idx) and torch.equal(fv.samples(v1)[0], idx)
    assert torch.equal(v1, fv.other(v0)) and torch.equal(fv.views(idx, 2), v0)   # every other epoch
    assert 400 < int(m0.sum()) < 600                                              # about half mirrored
    assert torch.equal(FlipViews(1000, seed=5).views(idx, 3), fv.views(idx, 3))    # same on every stage
    assert not torch.equal(FlipViews(1000, seed=6).views(idx, 0), v0)
    assert fv.rows == 2000 and torch.equal(fv.other(fv.other(v0)), v0)
    with pytest.raises(IndexError, match="out of range"):
        fv.samples(torch.tensor([2000]))


def test_mirror_flips_only_the_marked_rows():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    out = FlipViews.mirror(x, torch.tensor([False, True]))
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1, :, :, [3, 2, 1, 0]])
    cl = x.contiguous(memory_format=torch.channels_last)
    assert FlipViews.mirror(cl, torch.tensor([True, True])).is_contiguous(memory_format=torch.channels_last)


def _flip_trainer(**kw):
    return _shift_trainer(parallel_augment="shift_flip", **kw)


def test_initial_fill_covers_both_views_of_every_sample():
    """Rows N + i hold D(F_1(mirror image of i)), filled batch by batch like the canonical rows."""
    tr = _flip_trainer(cuts=(2,))
    n = tr.data.num_train
    tr._enter_parallel(0, 0)
    target = tr.stores["target"][0]
    assert target.table.shape[0] == 2 * n and tr.stores["input"][1].table.shape[0] == 2 * n
    batches = tr._parallel_batches(0)
    fn = tr._input_fn()
    stage = tr.stages[0]
    with torch.no_grad(), frozen_bn_stats(stage):
        stage.train()
        for b in batches + [tr.flip_views.other(b) for b in batches]:
            assert torch.allclose(target.gather(b), tr.filt.down(stage(fn(b))), atol=1e-6)
    x = tr.plain_loader.load(torch.arange(3))[1]
    assert torch.equal(fn(torch.arange(3) + n), x.flip(-1))
    assert torch.equal(tr.stores["target"][0].table, tr.stores["input"][1].table)


def test_canonical_views_only_is_the_shift_run(monkeypatch):
    """With every sample on its canonical view, shift_flip trains exactly like shift (the extra
    fill of the mirror rows touches neither parameters nor BatchNorm statistics)."""
    ref = _shift_trainer()
    ref.run()
    monkeypatch.setattr(FlipViews, "views", lambda self, idx, epoch: idx.to(torch.long))
    fl = _flip_trainer()
    fl.run()
    assert_same(params(ref.model), params(fl.model))


def test_mirror_views_are_trained_on_and_change_the_training(monkeypatch):
    monkeypatch.setattr(ShiftAugment, "shifts", lambda self, e, t, n: torch.zeros(n, 2, dtype=torch.long))
    tr = _flip_trainer(cuts=(2,))
    tr._enter_parallel(0, 0)
    for e in range(2):
        _run_epoch(tr, e, sorted)
    mult = tr.stores["mult"][0].table            # μ = g on every visited row, 0 on unvisited ones
    assert bool((mult.flatten(1).abs().sum(1) > 0).all())   # two epochs visit both views of all
    plain = _shift_trainer()
    plain.run()
    fl = _flip_trainer()
    fl.run()
    assert any(not torch.equal(a, b) for a, b in zip(params(plain.model), params(fl.model)))


def test_flip_parallel_phase_is_deterministic_under_any_interleaving():
    def mirrored(tr):
        for k in range(len(tr.stages) - 1):
            assert torch.equal(tr.stores["target"][k].table, tr.stores["input"][k + 1].table)

    assert_all_same(interleaving_results(lambda: _flip_trainer(window=1), seed=3, check=mirrored))


def test_mirror_views_need_a_flipping_augmentation():
    with pytest.raises(ConfigError, match="mirrored digits"):
        trainer(augment="shift", parallel_augment="shift_flip", cuts=(2,), ds=1)
    with pytest.raises(ConfigError, match="--parallel-augment shift_flip .*--augment is none"):
        trainer(augment="none", parallel_augment="shift_flip")


def test_auto_views_follow_the_serial_augmentation():
    """--parallel-augment auto: shift views when the serial epochs augment and the cuts allow it
    (the same training as an explicit shift), none without augmentation, none (said) when the
    cuts' coarse grids cannot move within the augmentation's range."""
    logs = []
    auto = trainer(augment="crop_flip", parallel_augment="auto", log=logs.append)
    assert auto.shift_aug is not None and any("parallel phase on shifted views" in m for m in logs)
    auto.run()
    explicit = _shift_trainer()
    explicit.run()
    assert_same(params(auto.model), params(explicit.model))
    assert trainer(augment="none", parallel_augment="auto").shift_aug is None
    logs.clear()
    coarse = trainer(augment="crop_flip", parallel_augment="auto", ds=8, cuts=(2,), log=logs.append)
    assert coarse.shift_aug is None
    assert any("without shift views" in m and "steps of 8 px" in m for m in logs)
    with pytest.raises(ConfigError, match="steps of 8 px"):      # asked for explicitly: refused
        _shift_trainer(ds=8, cuts=(2,))


def test_shift_view_cuts_keep_the_grids_within_the_largest_shift():
    """A boundary qualifies when its coarse grid's image stride divides the largest shift."""
    from layerpar_fast.models import build_model, cut_points
    from layerpar_fast.filters import FilterPair
    from layerpar_fast.paraug import shift_view_cuts
    pts = [(c.index, c.shape) for c in cut_points(build_model("resnet20"), (3, 32, 32))]
    assert shift_view_cuts(pts, (32, 32), FilterPair(2), 4) == list(range(1, 8))    # 32x32 and 16x16 maps
    assert shift_view_cuts(pts, (32, 32), FilterPair(1), 4) == list(range(1, 11))   # every map at s = 1
    assert shift_view_cuts(pts, (32, 32), FilterPair(2), 2) == list(range(1, 5))    # 2-px shifts: the 32x32 maps only
    assert shift_view_cuts(pts, (32, 32), FilterPair(8), 4) == []
    assert shift_view_cuts([(1, (4, 6, 6))], (24, 24), FilterPair(2), 4) == []       # a 3x3 grid: stride 8
    assert shift_view_cuts([(1, (4, 6, 6))], (24, 24), FilterPair(4), 4) == []       # 4 does not divide 6


def _resnet20_trainer(**kw):
    from test_engine import tiny_data
    from layerpar_fast.config import make_config
    from layerpar_fast.trainer import HybridTrainer
    base = dict(method="al", model="resnet20", stages=4, ds=2, balance="flops", augment="crop_flip",
                schedule="serial:1,parallel:3,serial:1", progress=False, threads=1)
    log = kw.pop("log", lambda m: None)
    base.update(kw)
    return HybridTrainer(make_config(**base), None, data=tiny_data(size=32), log=log)


def test_balanced_cuts_leave_room_for_shift_views():
    """ResNet-20 at K = 4 balances to cuts 3,5,8, the last on the 8x8 map (a 4x4 grid: 8-px steps);
    with shift views asked for, the balanced cuts are chosen where the grids move in 4-px steps,
    and the views work; without them, or with cuts given, nothing changes."""
    logs = []
    tr = _resnet20_trainer(parallel_augment="shift", log=logs.append)
    assert tr.cuts == [3, 5, 7] and tr.shift_aug is not None and tr.shift_aug.unit == 4
    assert any("block boundaries 1-7" in m and "4-px shift views" in m for m in logs)
    assert _resnet20_trainer(parallel_augment="auto").cuts == [3, 5, 7]
    assert _resnet20_trainer(parallel_augment="none").cuts == [3, 5, 8]
    assert _resnet20_trainer(parallel_augment="auto", augment="none").cuts == [3, 5, 8]
    assert _resnet20_trainer(parallel_augment="shift", schedule="serial:5").cuts == [3, 5, 8]   # no parallel phase
    with pytest.raises(ConfigError, match="steps of 8 px"):      # cuts given: the user's, refused as before
        _resnet20_trainer(parallel_augment="shift", cuts="3,5,8")
    assert _resnet20_trainer(parallel_augment="shift", augment="shift").cuts[-1] <= 4   # 2-px shifts: 32x32 maps
