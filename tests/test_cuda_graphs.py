"""The parts of sr_core.cuda_graphs that hold without a GPU (the recordings themselves are
checked on CUDA in tests/test_gpu.py): what runs eagerly, the recording's input buffers,
installing and taking out."""
from __future__ import annotations

import pytest
import torch

from sr_core.cuda_graphs import GraphedForward, graph_modules, graphed, static_copy


def test_input_buffers_are_writable_copies_in_the_callers_layout():
    ctx = torch.randn(1, 77, 8).expand(4, -1, -1)  # one prompt broadcast over 4 tiles: stride 0
    buf = static_copy(ctx)
    assert torch.equal(buf, ctx) and buf.is_contiguous()
    buf.copy_(ctx * 2)  # a replay's input copy must be possible
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    cl = static_copy(x)
    assert torch.equal(cl, x) and cl.stride() == x.stride() and cl.data_ptr() != x.data_ptr()


def test_cpu_calls_and_calls_with_grad_run_the_module_itself():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    ref = lin(x)
    undo = graph_modules(lin, None)
    g = graphed(lin)
    assert g is not None
    with torch.no_grad():
        assert torch.equal(lin(x), ref)
    y = lin(x)
    assert y.requires_grad and torch.equal(y, ref)
    assert g.recorded == 0 and g.replayed == 0 and g.failures == []
    undo()
    assert graphed(lin) is None and "forward" not in lin.__dict__
    assert torch.equal(lin(x), ref)


def test_one_replacement_per_module():
    lin = torch.nn.Linear(2, 2)
    g = GraphedForward(lin).install()
    with pytest.raises(RuntimeError, match="already has a replaced forward"):
        GraphedForward(lin).install()
    g.uninstall()
    assert "forward" not in lin.__dict__
