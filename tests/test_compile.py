"""torch.compile: the fused local loss is a custom op (no graph break), and --compile trains like eager.

Compilation on CPU takes tens of seconds per graph, so these tests use the smallest shapes that
exercise every path (a stage that is not the last, at s = 1 and s = 2, NCHW and channels_last).
"""
import pytest
import torch
import torch.nn as nn

from layerpar_fast import _ext, ops
from layerpar_fast.filters import FilterPair

from test_engine import params, trainer

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the C++ extension is not built")


@pytest.mark.parametrize("s", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_mult", [True, False], ids=["al", "penalty"])
def test_custom_op_passes_opcheck(s, channels_last, with_mult):
    """Schema, fake (meta) implementation, autograd registration and aliasing rules of the op."""
    torch.manual_seed(0)
    o = torch.randn(3, 2, 4, 4)
    if channels_last:
        o = o.contiguous(memory_format=torch.channels_last)
    t = torch.randn(3, 2, 4 // s, 4 // s)
    m = torch.randn_like(t) if with_mult else None
    for need_grad in (True, False):
        torch.library.opcheck(torch.ops.layerpar.local_loss_fwd.default,
                              (o.clone().requires_grad_(need_grad), t, m, 0.7, False, s, need_grad, "cpp"))
    gc = torch.randn(3, 2, 4 // s, 4 // s)
    torch.library.opcheck(torch.ops.layerpar.local_loss_bwd.default,
                          (gc, torch.tensor(0.5), s, torch.float32, channels_last, "cpp"))


def test_a_compiled_stage_is_one_graph_and_equals_eager():
    """Conv + fused AL local loss under fullgraph=True (a graph break would raise), forward and
    backward equal to the eager autograd.Function path."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    filt = FilterPair(2)

    def stage(z, t, m):
        return ops.local_loss(conv(z), t, m, 0.7, "jacobi", filt)

    z, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4)
    m = torch.randn_like(t)
    explained = torch._dynamo.explain(stage)(z, t, m)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    loss_c, a_c = torch.compile(stage, fullgraph=True)(z, t, m)
    loss_c.backward()
    grad_c = conv.weight.grad.clone()
    conv.weight.grad = None
    loss_e, a_e = stage(z, t, m)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(a_c, a_e)
    torch.testing.assert_close(grad_c, conv.weight.grad)


def test_compile_run_equals_the_eager_run():
    """A short SPH run (serial, parallel and serial epochs, 3 stages) with --compile ends with the
    eager run's parameters within float tolerance (Inductor may fuse and reorder float ops)."""
    torch._dynamo.reset()
    eager = trainer(schedule="serial:1,parallel:1,serial:1")
    eager.run()
    comp = trainer(schedule="serial:1,parallel:1,serial:1", compile=True)
    comp.run()
    assert comp.cfg.compile
    for a, b in zip(params(eager.model), params(comp.model)):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(a, b)
    assert [r["phase"] for r in comp.records] == ["serial", "parallel", "serial"]


def test_bench_compile_refuses_bad_arguments(capsys):
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import bench_compile
    with pytest.raises(SystemExit) as e:
        bench_compile.main(["--rounds", "0"])
    assert e.value.code == 2 and "--rounds" in capsys.readouterr().err
