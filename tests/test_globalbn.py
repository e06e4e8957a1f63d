"""Global-batch BatchNorm of data-parallel serial epochs (layerpar_fast/globalbn.py) against
torch's BatchNorm in one process (the all-reduce is the identity there); across ranks it is
tested by the distributed serial-phase cases of test_dist.py."""
import pytest
import torch
import torch.nn as nn

from layerpar_fast.globalbn import global_batch_norm_on


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("affine", [True, False])
def test_equals_torch_batchnorm_in_one_process(momentum, affine):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, momentum=momentum, affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours = nn.BatchNorm2d(5, momentum=momentum, affine=affine).double()
    ours.load_state_dict(ref.state_dict())
    calls = []

    def identity(t):
        calls.append(t.numel())
        return t

    for step in range(3):
        x = (torch.randn(6, 5, 4, 3, dtype=torch.float64) * 2 + 1).requires_grad_(True)
        x2 = x.detach().clone().requires_grad_(True)
        y_ref = ref(x)
        with global_batch_norm_on(ours, identity) as n_layers:
            y = ours(x2)
        assert n_layers == 1
        g = torch.randn_like(y)
        y_ref.backward(g)
        y.backward(g)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)   # float32 statistics
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
        if affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == 3
    assert calls == [11, 10] * 3          # forward: Σx, Σx², n (2C + 1); backward: Σdy, Σdy·x̂ (2C)


def test_eval_mode_and_leaving_the_scope_restore_plain_batchnorm():
    bn = nn.BatchNorm2d(3)
    seen = []
    with global_batch_norm_on(nn.Sequential(bn), lambda t: seen.append(1) or t):
        bn.eval()
        bn(torch.randn(4, 3, 2, 2))
        assert not seen                  # eval mode: the running statistics, no all-reduce
        bn.train()
        bn(torch.randn(4, 3, 2, 2))
        assert seen
    assert "forward" not in bn.__dict__  # the class's forward again
