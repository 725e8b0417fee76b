"""CUDA graphs of the UNet and the text encoders: each module's kernels replayed in one launch, not one by one.

On a GPU the SDXL methods are host-bound at small sizes: one SDXL Turbo step at 512x512 launches 3,798 kernels
and kept an H200 busy for 25% of the run's wall time (docs/benchmarks.md). Replaying a captured graph removes
the per-kernel launch cost and changes no pixel: the same kernels run on the same inputs.

    engine = Engine(device="cuda", cuda_graphs=True)        # or FASTGEN_CUDA_GRAPHS=1, or --cuda-graphs

A module is captured once per input signature (shapes, dtypes, and the other arguments' values) on its first
call with it, which is the engine's warm-up run, and keeps at most `GRAPHS_PER_MODULE` of them (each holds its
own memory pool, outside the cache's budget). A module carrying LoRA adapters runs eagerly: which adapters are
active, and at what scale, would be frozen into a graph. Runs are serialized by the engine's run lock, so one
graph never replays for two runs at once. Imports no torch until a module is graphed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

logger = logging.getLogger(__name__)

GRAPHS_PER_MODULE = 4  # input signatures kept per module: sizes a visitor switches between


def _map(fn, obj):
    """`fn` on every tensor in a nest of tuples, lists and dicts (transformers' outputs are dicts)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return type(obj)(**{k: _map(fn, v) for k, v in obj.items()})
    return obj


def tensors(obj) -> list:
    """The tensors of a nest, in order."""
    found = []
    _map(found.append, obj)
    return found


def signature(obj):
    """What a graph is captured for: each tensor's shape, dtype and device, and every other value as itself."""
    import torch

    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), str(obj.dtype), str(obj.device))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(signature(o) for o in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, signature(v)) for k, v in obj.items()))
    return ("value", repr(obj))


def has_adapters(module) -> bool:
    """True when peft adapters were added to `module` (diffusers and transformers both mark the model)."""
    return bool(getattr(module, "_hf_peft_config_loaded", False) or getattr(module, "peft_config", None))


class Graphed:
    """`module.forward` replaced by a graph replay: the inputs are copied into the graph's own tensors, every
    kernel replays in one launch, and the outputs are cloned (the next replay overwrites them)."""

    def __init__(self, module):
        self.module, self.eager = module, module.forward
        self.graphs: OrderedDict = OrderedDict()  # signature -> (graph, input tensors, outputs)
        module.forward = self

    @classmethod
    def on(cls, module) -> Graphed | None:
        """Graph `module` unless it already is (the text encoders are shared between methods)."""
        current = module.__dict__.get("forward")
        return current if isinstance(current, cls) else cls(module)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward
        self.graphs.clear()

    def _capture(self, args, kwargs):
        import torch

        static = _map(torch.clone, (args, kwargs))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # capture needs the kernels chosen and the workspaces allocated first
                self.eager(*static[0], **static[1])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.eager(*static[0], **static[1])
        return graph, tensors(static), out

    def __call__(self, *args, **kwargs):
        import torch

        if has_adapters(self.module):  # adapters added since: its graphs would run without them
            self.remove()
            return self.eager(*args, **kwargs)
        if torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        key = signature((args, kwargs))
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            if len(self.graphs) >= GRAPHS_PER_MODULE:
                self.graphs.popitem(last=False)
            try:
                self.graphs[key] = self._capture(args, kwargs)
            except Exception as error:  # an operation capture refuses: this module stays eager from now on
                logger.warning("CUDA graph capture of %s failed, running it eagerly: %s", type(self.module).__name__,
                               error)
                self.remove()
                self.module._fastgen_eager = True  # `attach` leaves it alone on later runs
                return self.eager(*args, **kwargs)
        graph, inputs, out = self.graphs[key]
        for static, given in zip(inputs, tensors((args, kwargs))):
            static.copy_(given)
        graph.replay()
        return _map(torch.clone, out)


def attach(pipe) -> list[Graphed]:
    """Graph the pipeline's UNet and text encoders (those it has), in place on the cached modules."""
    modules = [getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2")]
    return [Graphed.on(m) for m in modules
            if m is not None and not has_adapters(m) and not getattr(m, "_fastgen_eager", False)]
