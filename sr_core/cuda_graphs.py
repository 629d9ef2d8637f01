"""Replaying recorded CUDA graphs for modules called again and again at the same shapes.

A batch-1 UNet call at 512² on a large GPU is launch-bound: the GPU finishes each of its
several hundred kernels faster than Python and the driver can issue the next one. A CUDA
graph records the kernels of one call once and then launches them all with a single call,
so a repeated call costs little more than the GPU's own work. The CLI upscales a folder of
images of one size, the same shapes every time: there the graphs pay. Measured on one H100
(``python -m bench --device cuda --levers``, full-size models, 512², fp16): UNet call 25 → 12
ms (0.47×), control branch 13 → 5 ms (0.46×), bit-identical outputs; the VAE encoder and
decoder gained nothing (1.01×, 0.98×: their convolutions at the image's size keep the GPU
busy), so :func:`~.perf.apply_options` records only the UNet and the control branch.

:class:`GraphedForward` takes a module's ``forward``: a call with grad off and every tensor
argument on CUDA is looked up by the arguments' structure, shapes, strides and dtypes (and
the non-tensor arguments); calls with a large latent (:data:`MAX_RECORDED_ELEMENTS`) stay
eager. The first call of a signature is run eagerly once on a side stream (lazy
initialisation, kernel choice) and then recorded; later ones copy their tensors into the
recorded inputs and replay. Outputs are returned as fresh copies. Anything else (a CPU
tensor, grad on, an unhashable argument, a failed recording) runs the module eagerly.

The recordings hold the addresses of the weights: when any parameter or buffer is
reallocated (a dtype or device change, a layout change such as channels-last) they are
dropped and recorded again at the next call. In-place changes of weights (a LoRA merge
into the same tensors) need nothing: a replay reads the current values. At most
``max_graphs`` recordings are kept per module, the least recently used dropped first; each
holds its own GPU memory pool (the activations of one call) until it is dropped.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten


MAX_RECORDED_ELEMENTS = 2 * 4 * 128 * 128
"""Largest first tensor argument (the latent: batch × 4 × h × w) whose calls are recorded: a
CFG pair at 1024² output. Larger calls keep the GPU busy on their own (a UNet call at 64² latent
is 12 ms of GPU work beside 13 ms of launching; each doubling of the side quadruples the work,
not the launches) and a recording would hold their activations' memory for good; they run
eagerly. Batches of 96² latent tiles are above it."""


class _Recording:
    __slots__ = ("graph", "inputs", "outputs", "out_spec")

    def __init__(self, graph, inputs: list[Tensor], outputs: list, out_spec) -> None:
        self.graph, self.inputs, self.outputs, self.out_spec = graph, inputs, outputs, out_spec


def static_copy(t: Tensor) -> Tensor:
    """A recording's own input buffer holding ``t``: the same layout when ``t`` is dense
    (channels-last stays channels-last), a contiguous one when it is not (an expanded tensor,
    such as one prompt embedding broadcast over a batch of tiles, cannot be written into)."""
    return torch.empty_like(t, memory_format=torch.preserve_format).copy_(t)


def _end_failed_capture(device: torch.device) -> None:
    """After a recording failed part-way, PyTorch's CUDA random generator still believes a
    capture is under way (its epilogue never ran) and refuses every later random draw; an
    empty recording runs the prologue and the epilogue again and leaves it consistent."""
    torch.cuda.synchronize(device)
    with torch.cuda.stream(torch.cuda.Stream(device)), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA Graph is empty")  # empty on purpose
        g = torch.cuda.CUDAGraph()
        g.capture_begin()
        g.capture_end()


_EAGER = object()
"""Marks an argument signature whose recording failed: it runs eagerly from then on."""


class GraphedForward:
    """Record-once, replay-after ``forward`` for ``module`` (see the module docstring).

    :meth:`install` puts it in place of the module's forward (an instance attribute, so the
    class and every other instance are untouched), :meth:`uninstall` takes it out; the
    recordings survive an uninstall until :meth:`clear`."""

    def __init__(self, module: nn.Module, max_graphs: int = 2, warmup: int = 1,
                 max_elements: int | None = MAX_RECORDED_ELEMENTS) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.module, self.max_graphs, self.warmup, self.max_elements = module, max_graphs, warmup, max_elements
        self._eager = type(module).forward.__get__(module)  # the class's forward, bound
        self._graphs: OrderedDict[Hashable, object] = OrderedDict()
        self._weights: tuple[int, ...] | None = None
        self.recorded = 0  # recordings made (a test and the bench read it)
        self.replayed = 0
        self.failures: list[str] = []

    # -- installation -------------------------------------------------------------------
    def install(self) -> GraphedForward:
        if "forward" in self.module.__dict__:
            raise RuntimeError(f"{type(self.module).__name__} already has a replaced forward")
        self.module.forward = self  # nn.Module.__setattr__ keeps a non-module value as a plain attribute
        return self

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward

    def clear(self) -> None:
        """Drop every recording (and its memory pool)."""
        self._graphs.clear()
        self._weights = None

    # -- calls ----------------------------------------------------------------------------
    def _weights_key(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*self.module.parameters(), *self.module.buffers()))

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        if (not tensors or torch.is_grad_enabled() or not all(t.is_cuda for t in tensors)
                or (self.max_elements is not None and tensors[0].numel() > self.max_elements)
                or torch.cuda.is_current_stream_capturing()):
            return self._eager(*args, **kwargs)
        key = (spec, tuple((tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, Tensor) else x
                                for x in leaves))
        try:
            hash(key)
        except TypeError:
            return self._eager(*args, **kwargs)
        weights = self._weights_key()
        if weights != self._weights:
            self.clear()
            self._weights = weights
        rec = self._graphs.get(key)
        if rec is None:
            rec = self._record(leaves, spec, tensors, key)
        else:
            self._graphs.move_to_end(key)
        if rec is _EAGER:
            return self._eager(*args, **kwargs)
        for dst, src in zip(rec.inputs, tensors):
            dst.copy_(src)
        rec.graph.replay()
        self.replayed += 1
        outs = [o.clone() if isinstance(o, Tensor) else o for o in rec.outputs]
        return tree_unflatten(outs, rec.out_spec)

    def _record(self, leaves: list, spec, tensors: list[Tensor], key: Hashable):
        device = tensors[0].device
        graph, error, out, began = torch.cuda.CUDAGraph(), None, None, False
        try:
            static = [static_copy(t) for t in tensors]
            it = iter(static)
            args, kwargs = tree_unflatten([next(it) if isinstance(x, Tensor) else x for x in leaves], spec)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: lazy initialisation and kernel choice happen here
                for _ in range(self.warmup):
                    self._eager(*args, **kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            with torch.cuda.stream(torch.cuda.Stream(device)):  # left even when the recording fails
                graph.capture_begin()
                began = True
                try:
                    out = self._eager(*args, **kwargs)
                except RuntimeError as e:  # an operation that cannot be recorded (a wait for the GPU)
                    error = e
                try:
                    graph.capture_end()
                except RuntimeError as e:
                    error = error or e
        except RuntimeError as e:  # before the recording (the warm-up): the eager call will tell
            error = error or e
        if error is not None:  # keep this signature eager
            if began:
                _end_failed_capture(device)
            msg = f"{type(self.module).__name__}: CUDA graph recording failed ({str(error).strip()}); running eagerly"
            self.failures.append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            self._graphs[key] = _EAGER
            return _EAGER
        out_leaves, out_spec = tree_flatten(out)
        if not all(o is None or isinstance(o, (Tensor, bool, int, float, str)) for o in out_leaves):
            # an output object the flattening cannot see into might hold the recording's tensors
            warnings.warn(f"{type(self.module).__name__}: output {type(out).__name__} cannot be copied out of "
                          "a CUDA graph; running eagerly", RuntimeWarning, stacklevel=3)
            self._graphs[key] = _EAGER
            return _EAGER
        rec = _Recording(graph, static, out_leaves, out_spec)
        self._graphs[key] = rec
        self.recorded += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return rec


def graph_modules(*modules: nn.Module | None, max_graphs: int = 2) -> Callable[[], None]:
    """Install a :class:`GraphedForward` on each module (``None`` skipped); returns ``undo``,
    which takes them out and frees their recordings."""
    installed = [GraphedForward(m, max_graphs=max_graphs).install() for m in modules if m is not None]

    def undo() -> None:
        for g in installed:
            g.uninstall()
            g.clear()
        installed.clear()
    return undo


def graphed(module: nn.Module) -> GraphedForward | None:
    """The :class:`GraphedForward` installed on ``module``, if any."""
    f = module.__dict__.get("forward")
    return f if isinstance(f, GraphedForward) else None


__all__ = ["MAX_RECORDED_ELEMENTS", "GraphedForward", "graph_modules", "graphed", "static_copy"]
