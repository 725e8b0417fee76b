"""The page's engine when model work runs elsewhere: `RemoteEngine(url)` talks to `python -m fastgen serve` over
HTTP with the calls the page makes of `Engine` (iter_compare, run, compare, comparison, iter_refine, refine,
refine_compare), and returns the same MethodResult / MethodFailure / Comparison objects.

    python app.py --backend http://127.0.0.1:8000      # or FASTGEN_BACKEND=http://...

Requests are checked here by the same schema before they leave, and again by the server. Step-by-step progress
does not cross the wire: a remote panel shows "running" until its result arrives, and a stop takes effect
between panels.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

from fastgen.registry import Family, get_family
from fastgen.results import Comparison, MethodFailure, MethodResult


class RemoteFailure(RuntimeError):
    """A single remote run (a rerun, a live frame) whose panel failed on the server: its message says why."""


def _raise(failure: MethodFailure):
    raise RemoteFailure(f"{failure.label}: {failure.message}")


def _result(line: dict) -> MethodResult | MethodFailure:
    from dataclasses import fields

    from fastgen.wire import from_png64

    if line.get("failed"):
        return MethodFailure(line["method"], line["label"], line["kind"], line["message"])
    known = {f.name for f in fields(MethodResult)}
    values = {k: v for k, v in line.items() if k in known and k != "image"}
    return MethodResult(image=from_png64(line["image"]).convert("RGB"), **values)


def _in_order(outcomes, family, methods) -> list:
    order = list(methods or get_family(family).default_methods)
    return sorted(outcomes, key=lambda o: order.index(o.method) if o.method in order else len(order))


class RemoteEngine:
    device = "remote"
    dtype_name = "remote"

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    # -- HTTP --------------------------------------------------------------------------------------------------
    def _post(self, path: str, body: dict, stop: threading.Event | None = None) -> Iterator[dict]:
        import httpx

        from fastgen.engine import RunStopped
        from fastgen.request import RequestError

        with httpx.Client(timeout=self.timeout) as client, client.stream("POST", self.url + path, json=body) as reply:
            if reply.status_code == 400:
                error = json.loads(reply.read())
                raise RequestError(error.get("field", "body"), error["error"])
            reply.raise_for_status()
            for line in reply.iter_lines():
                if stop is not None and stop.is_set():
                    raise RunStopped("stopped between panels")
                if line.strip():
                    yield json.loads(line)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=self.timeout).json()

    # -- the Engine calls the page makes ---------------------------------------------------------------------------
    def iter_compare(self, family: str | Family, prompt: str, methods: list[str] | None = None, *,
                     negative_prompt: str = "", seed: int = 0, width=None, height=None, steps=None, guidance=None,
                     on_step=None, stop=None, loras=(), on_preview=None) -> Iterator[MethodResult | MethodFailure]:
        from fastgen.request import CompareRequest, RequestError, check_loras

        from fastgen.registry import FAMILIES

        family = get_family(family)
        if family.name not in FAMILIES:
            raise RequestError("base", "a page with a backend sends custom models nowhere: post them to the "
                                       "backend's own /compare, with `base`")
        body = dict(prompt=prompt, negative_prompt=negative_prompt or None, seed=seed, methods=methods, width=width,
                    height=height, family=family.name, steps=steps, guidance=guidance)
        if loras:  # the backend runs them on its groups' deployments, and checks them against its host's switch
            body["loras"] = [lora.to_dict() for lora in check_loras(loras)]
        CompareRequest.parse(body, family=family)  # a bad request never leaves this machine
        for line in self._post("/compare", body, stop):
            yield _result(line)

    def run(self, family, method: str, prompt: str, *, negative_prompt: str = "", seed: int = 0, width=None,
            height=None, steps=None, guidance=None, on_step=None, stop=None, on_preview=None, loras=()) -> MethodResult:
        outcome = next(self.iter_compare(family, prompt, [method], negative_prompt=negative_prompt, seed=seed,
                                         width=width, height=height,
                                         steps=None if steps is None else {method: steps},
                                         guidance=None if guidance is None else {method: guidance}, stop=stop,
                                         loras=loras))
        if isinstance(outcome, MethodFailure):
            _raise(outcome)
        return outcome

    def compare(self, family, prompt: str, methods: list[str] | None = None, **kwargs) -> Comparison:
        """All panels, in the order asked (they arrive in the order they finish)."""
        outcomes = _in_order(self.iter_compare(family, prompt, methods, **kwargs), family, methods)
        return self.comparison(family, prompt, outcomes, negative_prompt=kwargs.get("negative_prompt", ""),
                               seed=kwargs.get("seed", 0))

    def iter_refine(self, family, image, prompt: str, methods: list[str] | None = None, *, mask=None,
                    strength=None, steps=None, guidance=None, negative_prompt: str = "", seed: int = 0,
                    keep_outside: bool = False, resize: bool = False, on_step=None, stop=None, on_preview=None):
        from fastgen.engine import Engine
        from fastgen.request import check_methods
        from fastgen.wire import png64

        family = get_family(family)
        Engine.check_refine(family, check_methods(family, methods), image, mask, strength, steps, guidance,
                            keep_outside, resize)
        body = dict(prompt=prompt, negative_prompt=negative_prompt or None, seed=seed, methods=methods,
                    family=family.name, steps=steps, guidance=guidance, strength=strength,
                    keep_outside=keep_outside, resize=resize, image=png64(image))
        if mask is not None:
            body["mask"] = png64(mask)
        for line in self._post("/refine", body, stop):
            yield _result(line)

    def refine(self, family, method: str, image, prompt: str, **kwargs) -> MethodResult:
        steps, guidance = kwargs.pop("steps", None), kwargs.pop("guidance", None)
        outcome = next(self.iter_refine(family, image, prompt, [method],
                                        steps=None if steps is None else {method: steps},
                                        guidance=None if guidance is None else {method: guidance}, **kwargs))
        if isinstance(outcome, MethodFailure):
            _raise(outcome)
        return outcome

    def refine_compare(self, family, image, prompt: str, methods: list[str] | None = None, **kwargs) -> Comparison:
        outcomes = _in_order(self.iter_refine(family, image, prompt, methods, **kwargs), family, methods)
        return self.comparison(family, prompt, outcomes, negative_prompt=kwargs.get("negative_prompt", ""),
                               seed=kwargs.get("seed", 0), source=image, mask=kwargs.get("mask"),
                               strength=kwargs.get("strength"))

    def comparison(self, family, prompt: str, outcomes: list, *, negative_prompt: str = "", seed: int = 0,
                   source=None, mask=None, strength=None) -> Comparison:
        """As Engine.comparison; the cache report is the server's to give (GET /health), so it is empty here."""
        family = get_family(family)
        return Comparison(family=family.name, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                          device=self.device, dtype=self.dtype_name,
                          results=[o for o in outcomes if isinstance(o, MethodResult)], cache=[],
                          failures=[o for o in outcomes if isinstance(o, MethodFailure)], reference=family.reference,
                          strength=strength, source=source, mask=mask)

    def load(self, family, methods=None) -> float:
        return 0.0  # the server loads its own
