"""LoRAs on shared UNets: attached once as named peft adapters, active only inside the run that holds the UNet.

    adapters = Adapters(cache)
    key = adapters.attach(unet_key, lora_digest, "latent-consistency/lcm-lora-sdxl", load, "sdxl/lcm-lora")
    with cache.hold(keys), adapters.active([key]):
        pipe(...)

A UNet is shared by every method that loads the same files (the baseline, LCM-LoRA, Hyper-SD), so no adapter
is ever fused into it. Disabled adapters still leave peft's wrapper around every target layer, whose per-layer
work would slow the reference and flatter every speed-up by however much it costs (on 2 CPU cores it is within
the machine's noise: benchmarks/unused_adapter.py). So before its first adapter, the UNet gets a clean twin
(`clean_twin`: its own module objects over the very same tensors, no memory copied), and runs with no adapter
use the twin: the reference never runs through a wrapper.

Each adapter is attached once and left disabled; `active` enables the run's adapters (a method's own, and any
style LoRAs stacked on it, each at its scale; the others on the same UNet stay off) for the run that holds the
UNet's lock, and disables them on exit, even when the run fails or is stopped.
The cache stores the adapter's record (its bytes count towards the budget); evicting it, or its UNet, detaches it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable

from fastgen.cache import Component, ComponentCache, module_bytes

logger = logging.getLogger(__name__)


def clean_twin(module):
    """A second module tree over the same parameters and buffers: its layers stay plain when adapters wrap the
    original's (peft replaces modules in place), and it costs no tensor memory."""
    import copy
    import itertools

    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    # a CUDA graph replacing a module's forward (fastgen.graphs) belongs to the original: the twin is captured anew
    replaced = {m: m.__dict__.pop("forward") for m in module.modules() if "forward" in m.__dict__}
    try:
        return copy.deepcopy(module, shared)
    finally:
        for m, forward in replaced.items():
            m.forward = forward


def switch(unet, adapters: list[str], scales: list[float] | None = None) -> None:
    """Turn `adapters` on together, each at its scale (the others off), or with no adapters every one off."""
    if adapters:
        unet.set_adapters(list(adapters), weights=list(scales or [1.0] * len(adapters)))
        unet.enable_lora()
    else:
        unet.disable_lora()


class Adapters:
    def __init__(self, cache: ComponentCache):
        self.cache = cache

    def attach(self, unet_key: str, lora_key: str, source: str, load: Callable[[str], None], user: str,
               pinned: Iterable[str] = (), scale: float = 1.0) -> str:
        """Load a LoRA as a named adapter on the cached UNet `unet_key` (once) and leave it disabled.
        `load(adapter_name)` does the loading; returns the adapter's cache key."""
        key = f"{lora_key}@{unet_key[:16]}"
        with self.cache.lock:
            item = self.cache.entry(key)
            if item is None:
                unet = self.cache.entry(unet_key)
                adapter = f"lora_{lora_key[:12]}"
                before = module_bytes(unet.module)
                if unet.clean is None:  # the plain layers, kept for the runs without adapters
                    unet.clean = clean_twin(unet.module)
                logger.info("loading LoRA %s onto %s", source, unet.source)
                try:
                    load(adapter)
                except BaseException:  # a half-loaded adapter may sit in the UNet: drop the UNet, it reloads clean
                    self.cache.evict(unet_key)
                    raise
                switch(unet.module, [])
                item = Component(key, "lora", source, None, module_bytes(unet.module) - before, parent=unet_key,
                                 adapter=adapter, scale=scale)
                self.cache.store(item, set(pinned) | {key, unet_key})
            self.cache.touch(item, user)
            return key

    @contextlib.contextmanager
    def active(self, keys: list[str], scales: list[float | None] | None = None):
        """Enable these adapters (all on one UNet) together for the duration of a run that holds the UNet's lock;
        `scales`: each one's scale for this run (None: the scale it was attached with)."""
        items = [self.cache.entry(key) for key in keys]
        if not items:
            yield
            return
        unet = self.cache.entry(items[0].parent)
        if unet.holder != threading.get_ident() or any(item.parent != items[0].parent for item in items):
            raise RuntimeError(f"a LoRA may only be enabled by the run holding its UNet ({unet.source})")
        scales = [item.scale if scale is None else scale
                  for item, scale in zip(items, scales or [None] * len(items))]
        switch(unet.module, [item.adapter for item in items], scales)
        try:
            yield
        finally:
            switch(unet.module, [])
