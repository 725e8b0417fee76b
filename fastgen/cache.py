"""The shared component cache: one module per distinct content, whichever repo it came from.

A component (UNet, VAE, text encoder, tokenizer, safety checker, LoRA) is keyed by the sha256 of the files it
loads from (LFS blobs in the Hub cache are named by it; local files are hashed once) plus the dtype, so
byte-identical text encoders in two repos load once. Each component has a lock that a run holds while it uses
it. A LoRA's record lives here too (its bytes count), but when it acts is fastgen.adapters' business. Past
the memory budget, the least recently used components that no run holds are evicted; they reload on the next
use.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import itertools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fastgen import hub

logger = logging.getLogger(__name__)

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(value: int | float | str | None) -> int | None:
    """8_000_000_000, "8GB", "512 MiB" -> bytes; None stays None (no budget)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        if value is not None and value <= 0:
            raise ValueError(f"`memory_budget` must be positive, got {value}")
        return None if value is None else int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in {"", *_UNITS}:
        raise ValueError(f"`memory_budget` must be a byte count like 8GB or 512MiB, got {value!r}")
    return parse_bytes(float(match.group(1)) * _UNITS.get(match.group(2).lower() or "b"))


def module_bytes(module) -> int:
    """Bytes held by a torch module's parameters and buffers; 0 for tokenizers and other plain objects."""
    if not hasattr(module, "parameters"):
        return 0
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def component_class(library: str, class_name: str):
    """("transformers", "CLIPTextModel") -> the class; pipeline-local libraries ("stable_diffusion") live in
    diffusers.pipelines, as in diffusers' own loader."""
    try:
        module = importlib.import_module(library)
    except ImportError:
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    if not hasattr(module, class_name):
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    return getattr(module, class_name)


@dataclass
class Component:
    key: str
    kind: str  # the pipeline's name for it (unet, vae, text_encoder_2, ...) or "lora"
    source: str  # where it was first loaded from, for people
    module: object
    bytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    holder: int | None = None  # thread id of the run holding the lock
    used_by: set[str] = field(default_factory=set)  # "family/method"
    sources: set[str] = field(default_factory=set)  # every repo path asked for it (identical content)
    last_used: int = 0
    parent: str | None = None  # a LoRA's UNet
    adapter: str | None = None  # a LoRA's adapter name on that UNet
    scale: float = 1.0  # a LoRA's weight while it is active
    clean: object = None  # a UNet's module tree without adapter wrappers, over the same tensors (fastgen.adapters)


class ComponentCache:
    """Content-addressed components with per-component locks and LRU eviction past `budget` bytes."""

    def __init__(self, budget: int | str | None = None, device: str = "cpu"):
        self.budget = parse_bytes(budget)
        self.device = device
        self._items: dict[str, Component] = {}
        self._lock = threading.RLock()
        self._clock = itertools.count(1)
        self.loads = 0  # how many times a component was loaded from disk (reloads after eviction included)

    # --- keys -----------------------------------------------------------------------------------------------
    @staticmethod
    def key(source: hub.Source, folder, files: list[str], dtype) -> str:
        digest = hub.content_key(folder, files, source.subfolder)
        return f"{digest}-{str(dtype).removeprefix('torch.')}"

    # --- loading --------------------------------------------------------------------------------------------
    def get(self, key: str, kind: str, source: str, load: Callable[[], object], user: str,
            pinned: Iterable[str] = (), estimate: int = 0) -> object:
        """The module for `key`, loading it with `load()` on a miss; `pinned` keys are never evicted for it."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._make_room(estimate, set(pinned) | {key})
                logger.info("loading %s from %s", kind, source)
                module = load()
                self.loads += 1
                item = self._items[key] = Component(key, kind, source, module, module_bytes(module))
                self._make_room(0, set(pinned) | {key})
            item.used_by.add(user)
            item.sources.add(source)
            item.last_used = next(self._clock)
            return item.module

    def entry(self, key: str) -> Component | None:
        with self._lock:
            return self._items.get(key)

    def store(self, item: Component, pinned: Iterable[str] = ()) -> None:
        """Keep a component made elsewhere (an adapter's record: fastgen.adapters) under the same budget."""
        with self._lock:
            self.loads += 1
            self._items[item.key] = item
            self._make_room(0, set(pinned) | {item.key})

    def touch(self, item: Component, user: str) -> None:
        with self._lock:
            item.used_by.add(user)
            item.last_used = next(self._clock)

    @property
    def lock(self) -> threading.RLock:
        """The cache's own lock, for callers that read and then store (one load per key)."""
        return self._lock

    # --- runs -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, keys: Iterable[str]):
        """Hold the locks of `keys` (in one global order, so two runs cannot deadlock) for a run."""
        with self._lock:
            items = [self._items[k] for k in sorted(set(keys))]
        acquired = []
        try:
            for item in items:
                item.lock.acquire()
                item.holder = threading.get_ident()
                acquired.append(item)
            yield
        finally:
            for item in reversed(acquired):
                item.holder = None
                item.lock.release()

    # --- memory ---------------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(item.bytes for item in self._items.values())

    def _make_room(self, incoming: int, pinned: set[str]) -> None:
        if self.budget is None:
            return
        while self.total_bytes + incoming > self.budget:
            candidates = [
                item for item in self._items.values()
                if item.key not in pinned and not item.lock.locked()
                # a LoRA is removed from its UNet: not while a run uses that UNet
                and not (item.parent and self._items[item.parent].lock.locked())
            ]
            if not candidates:
                logger.warning("memory budget %d B is below what this run needs (%d B); going over it",
                               self.budget, self.total_bytes + incoming)
                return
            self.evict(min(candidates, key=lambda i: i.last_used).key)

    def evict(self, key: str) -> None:
        """Drop a component (a UNet takes its LoRAs with it); it reloads on its next use."""
        with self._lock:
            item = self._items.pop(key)
            logger.info("evicting %s (%s, %d B)", item.kind, item.source, item.bytes)
            if item.parent is not None and item.parent in self._items:
                unet = self._items[item.parent].module
                unet.delete_adapters(item.adapter)
                self._items[item.parent].bytes = module_bytes(unet)
            for child in [i.key for i in self._items.values() if i.parent == key]:
                del self._items[child]
            item.module = None
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def clear(self) -> None:
        with self._lock:
            for key in [k for k, i in self._items.items() if i.parent is None]:
                self.evict(key)

    # --- report ---------------------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._items

    def module(self, key: str):
        return self._items[key].module

    def report(self, users: Iterable[str] | None = None) -> list[dict]:
        """[{"id", "kind", "bytes", "used_by", "sources"}] for what the cache holds. With `users` (ordered
        "family/method" strings), only the components they use, and `used_by` names those methods in that order."""
        rows = []
        with self._lock:
            for item in sorted(self._items.values(), key=lambda i: (i.kind, i.source)):
                if users is None:
                    used_by = sorted(item.used_by)
                else:
                    used_by = [u.rsplit("/", 1)[1] for u in users if u in item.used_by]
                    if not used_by:
                        continue
                rows.append({"id": item.key[:16], "kind": item.kind, "bytes": item.bytes, "used_by": used_by,
                             "sources": sorted(item.sources | {item.source})})
        return rows


def default_budget(device: str) -> int:
    """80% of GPU memory on CUDA (the rest is for activations); 80% of physical RAM on CPU."""
    if device.startswith("cuda"):
        import torch

        return int(0.8 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30
