import pytest
import torch

from layerpar_fast.filters import FILTER_KINDS, FilterError, FilterPair


@pytest.mark.parametrize("kind", FILTER_KINDS)
@pytest.mark.parametrize("s", [1, 2, 4])
def test_down_up_is_identity_on_coarse_grid(kind, s):
    f = FilterPair(s, kind)
    v = torch.randn(3, 5, 3, 2, dtype=torch.float64)
    assert f.up(v).shape == (3, 5, 3 * s, 2 * s)
    torch.testing.assert_close(f.down(f.up(v)), v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", FILTER_KINDS)
@pytest.mark.parametrize("s", [1, 2, 4])
def test_adjoints(kind, s):
    f = FilterPair(s, kind)
    v = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(2, 3, 4 * s, 4 * s, dtype=torch.float64)
    # <U v, w> = <v, U^T w> and <D w, v> = <w, D^T v>
    torch.testing.assert_close((f.up(v) * w).sum(), (v * f.up_adjoint(w)).sum(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close((f.down(w) * v).sum(), (w * f.down_adjoint(v)).sum(), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kind", FILTER_KINDS)
def test_up_adjoint_matches_autograd(kind):
    f = FilterPair(2, kind)
    v = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    (auto,) = torch.autograd.grad(f.up(v), v, g)
    torch.testing.assert_close(f.up_adjoint(g), auto)


def test_nearest_adjoint_is_sum_pooling():
    f = FilterPair(2)
    g = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert f.up_adjoint(g).flatten().tolist() == [0 + 1 + 4 + 5, 2 + 3 + 6 + 7, 8 + 9 + 12 + 13, 10 + 11 + 14 + 15]


def test_bilinear_up_has_smaller_jumps_on_smooth_input():
    x = torch.linspace(0, 3, 8, dtype=torch.float64)
    v = (torch.sin(x)[:, None] * torch.cos(x)[None, :])[None, None]

    def max_jump(t):
        return max((t[..., 1:, :] - t[..., :-1, :]).abs().max(), (t[..., 1:] - t[..., :-1]).abs().max())

    assert max_jump(FilterPair(2, "avg_bilinear").up(v)) < 0.7 * max_jump(FilterPair(2).up(v))


def test_bad_configs():
    with pytest.raises(FilterError, match="positive integer"):
        FilterPair(0)
    with pytest.raises(FilterError, match="unknown filter kind"):
        FilterPair(2, "lanczos")
    with pytest.raises(FilterError, match="does not divide"):
        FilterPair(4).check_shape((16, 14, 14))
    assert FilterPair(2).coarse_shape((16, 14, 14)) == (16, 7, 7)
