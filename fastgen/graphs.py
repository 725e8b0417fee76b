"""Replayed UNets: on CUDA, graphs of the UNet and the text encoders; on a CPU, TorchScript traces of the UNet.

On a GPU the SDXL methods are host-bound at small sizes: one SDXL Turbo step at 512x512 launches 3,798 kernels
and kept an H200 busy for 25% of the run's wall time (docs/benchmarks.md). Replaying a captured graph removes
the per-kernel launch cost and changes no pixel: the same kernels run on the same inputs.

On a CPU the small UNets are bound by Python: the mini UNet's 2.3M parameters take a few milliseconds of
arithmetic and about 15 more of module calls per step. A trace (`torch.jit.trace`) records the same operators
once and runs them without the Python in between, over the module's own parameters (no copy), so it too
changes no pixel (tests/test_graphs.py).

    engine = Engine(device="cuda", cuda_graphs=True)        # or FASTGEN_CUDA_GRAPHS=1, or --cuda-graphs
    engine = Engine(device="cpu", traced=True)              # or FASTGEN_TRACED=1, or --traced

A module is captured once per input signature (shapes, dtypes, and the other arguments' values) on its first
call with it, which is the engine's warm-up run, and keeps at most `GRAPHS_PER_MODULE` of them (each CUDA graph
holds its own memory pool, outside the cache's budget). A module carrying LoRA adapters runs eagerly: which
adapters are active, and at what scale, would be frozen into a graph. Runs are serialized by the engine's run
lock, so one graph never replays for two runs at once. Imports no torch until a module is replayed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

logger = logging.getLogger(__name__)

GRAPHS_PER_MODULE = 4  # input signatures kept per module: sizes a visitor switches between


def _map(fn, obj, leaf=None):
    """`fn` on every tensor (or every object `leaf` accepts) in a nest of tuples, lists and dicts (transformers'
    outputs are dicts), in order; the nest is rebuilt around what `fn` returns."""
    import torch

    if leaf(obj) if leaf is not None else isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, o, leaf) for o in obj)
    if isinstance(obj, dict):
        return type(obj)(**{k: _map(fn, v, leaf) for k, v in obj.items()})
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


class Replayed:
    """`module.forward` replaced by a replay of what it was captured doing for the same signature; calls it cannot
    replay (gradients on, adapters added, a capture that failed) run the module's own forward."""

    kind = "replay"

    def __init__(self, module):
        self.module, self.eager = module, module.forward
        self.graphs: OrderedDict = OrderedDict()  # signature -> what _capture returned
        module.forward = self

    @classmethod
    def on(cls, module) -> Replayed | None:
        """Replay `module` unless it already is (the text encoders are shared between methods)."""
        current = module.__dict__.get("forward")
        return current if isinstance(current, cls) else cls(module)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            del self.module.forward
        self.graphs.clear()

    def replayable(self, args, kwargs) -> bool:
        return True

    def _capture(self, args, kwargs):
        raise NotImplementedError

    def _replay(self, captured, args, kwargs):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        import torch

        if has_adapters(self.module):  # adapters added since: its graphs would run without them
            self.remove()
            return self.eager(*args, **kwargs)
        if torch.is_grad_enabled() or not self.replayable(args, kwargs):
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
                logger.warning("%s of %s failed, running it eagerly: %s", self.kind, type(self.module).__name__,
                               error)
                self.remove()
                self.module._fastgen_eager = True  # `attach` leaves it alone on later runs
                return self.eager(*args, **kwargs)
        return self._replay(self.graphs[key], args, kwargs)


class Graphed(Replayed):
    """A CUDA graph per signature: the inputs are copied into the graph's own tensors, every kernel replays in one
    launch, and the outputs are cloned (the next replay overwrites them)."""

    kind = "CUDA graph capture"

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

    def _replay(self, captured, args, kwargs):
        import torch

        graph, inputs, out = captured
        for static, given in zip(inputs, tensors((args, kwargs))):
            static.copy_(given)
        graph.replay()
        return _map(torch.clone, out)


class Traced(Replayed):
    """A TorchScript trace per signature, taking the call's tensors in order and giving back the output's; the
    output's nesting (a tuple, or diffusers' output class) is rebuilt around them. A trace keeps every other
    argument's value, so calls with a plain number among their arguments (a timestep given as a float) are left
    eager: each step would be a new trace."""

    kind = "TorchScript trace"

    def replayable(self, args, kwargs) -> bool:
        import torch

        plain = []
        _map(plain.append, (args, kwargs), leaf=lambda o: not isinstance(o, (tuple, list, dict)))
        return not any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in plain) and \
            any(isinstance(v, torch.Tensor) for v in plain)

    def _capture(self, args, kwargs):
        import warnings

        import torch

        nest, eager, shape = (args, kwargs), self.eager, {}

        class Call(torch.nn.Module):
            def __init__(self, module):
                super().__init__()
                self.module = module  # registered, so the trace reads its parameters in place

            def forward(self, *inputs):
                given = iter(inputs)
                call_args, call_kwargs = _map(lambda _: next(given), nest)
                out = eager(*call_args, **call_kwargs)
                shape["out"] = _map(lambda t: _SLOT, out)
                return tuple(tensors(out))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-dependent branches: the key has shapes
            traced = torch.jit.trace(Call(self.module).eval(), tuple(tensors(nest)), check_trace=False)
        return traced, shape["out"]

    def _replay(self, captured, args, kwargs):
        traced, out = captured
        produced = iter(traced(*tensors((args, kwargs))))
        return _map(lambda _: next(produced), out, leaf=lambda o: o is _SLOT)


_SLOT = object()  # where a traced output's tensor goes


def attach(pipe, traced: bool = False) -> list[Replayed]:
    """Graph the pipeline's UNet and text encoders (those it has), in place on the cached modules; `traced`:
    trace its UNet instead (a CPU's choice: a text encoder runs once a run, and transformers' attention masks
    branch on values)."""
    kind, names = (Traced, ("unet",)) if traced else (Graphed, ("unet", "text_encoder", "text_encoder_2"))
    modules = [getattr(pipe, name, None) for name in names]
    return [kind.on(m) for m in modules
            if m is not None and not has_adapters(m) and not getattr(m, "_fastgen_eager", False)]
