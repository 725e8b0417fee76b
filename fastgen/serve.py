"""FastGen on Ray Serve: the methods as deployments grouped by the weights they share, one HTTP ingress in front
with the page's request schema. The page (and any HTTP client) sends model work here; `fastgen.remote` is the
client the page uses.

    python -m fastgen serve --family sdxl --replicas 2 --port 8000      # one GPU per replica on CUDA
    python app.py --backend http://127.0.0.1:8000                        # the page in front of it

    POST /compare   the `compare` fields (JSON)  -> one JSON line per finished method (results.json fields,
                                                    "image": the PNG as base64), fastest panel first
    POST /run       the same fields, one method  -> that method's line
    POST /refine    REFINE_FIELDS + "image" (+ "mask"), PNGs as base64 -> one line per method
    GET  /health    the family, the deployment groups and the replicas' state

Panels of one comparison run in parallel, each on its group's deployment, so a comparison takes about as long
as its slowest panel. Style LoRAs (`loras`) run on the groups' own deployments. Visitors' base models (`base`)
run on one more deployment, `custom-models`, deployed when the host allows custom models
(FASTGEN_ALLOW_CUSTOM=1 or FASTGEN_CUSTOM_ALLOW): Serve's model multiplexing routes each base model to a
replica that holds it, and each replica keeps the CUSTOM_MODELS_PER_REPLICA it used last. A bad request gets
status 400 and the request schema's message and field, as the page's API does. A replica that dies
mid-request fails its panel (kind "replica-died"); the other panels complete, and Serve starts a new replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from fastgen.registry import FAMILIES, Family, MethodSpec, get_family
from fastgen.wire import from_png64, png64

logger = logging.getLogger(__name__)

CUSTOM_MODELS_PER_REPLICA = 2  # visitors' base models a replica keeps (an SDXL fine-tune is ~7 GB in fp16)
CUSTOM = "custom-models"  # the deployment group that serves them
HOST_SETTINGS = ("FASTGEN_ALLOW_CUSTOM", "FASTGEN_CUSTOM_ALLOW", "FASTGEN_CUSTOM_MAX_GB")


def host_settings(public: bool) -> dict:
    """The host's custom-model settings as the driver has them, for the replicas (which may run elsewhere)."""
    return {"env": {k: os.environ[k] for k in HOST_SETTINGS if k in os.environ}, "public": public}


def apply_host_settings(settings: dict | None) -> None:
    if settings is None:
        return
    from fastgen import request

    for key in HOST_SETTINGS:
        os.environ.pop(key, None)
    os.environ.update(settings["env"])
    request.PUBLIC["bind"] = settings["public"]


def replica_setup(threads: int | None, settings: dict | None) -> None:
    """What every replica does first: its torch threads, and the host's custom-model settings."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    apply_host_settings(settings)


def custom_allowed(settings: dict) -> bool:
    from fastgen.request import custom_switch

    allow_all, allowlist = custom_switch(settings["env"])
    return allow_all or bool(allowlist)


try:  # Ray is an optional dependency (requirements-serve.txt): the rest of this module reads without it
    from ray import serve as _serve

    _multiplexed = _serve.multiplexed(max_num_models_per_replica=CUSTOM_MODELS_PER_REPLICA)
except ImportError:
    def _multiplexed(load):
        return load


# --- which methods share a deployment ----------------------------------------------------------------------

def _unet_source(spec: MethodSpec) -> tuple:
    """Where a method's UNet comes from; adapters (LoRAs) ride on their pipeline's own UNet."""
    if spec.unet_repo is None:
        return (spec.repo,)
    return (spec.unet_repo, spec.unet_subfolder, spec.unet_weight_name, tuple(f.weight_name for f in spec.step_files))


def groups(family: str | Family, methods: list[str] | None = None) -> dict[str, list[str]]:
    """Deployment name -> methods, grouped by the UNet they run on: the reference and every adapter method on
    its UNet (LCM-LoRA, Hyper-SD) share one deployment, each distilled UNet (Turbo, LCM, Lightning, DMD2) has its
    own, so no UNet is held by two deployments."""
    family = get_family(family)
    chosen = methods or list(family.method_names)
    by_unet: dict[tuple, list[str]] = {}
    for name in family.method_names:
        if name in chosen:
            by_unet.setdefault(_unet_source(family.method(name)), []).append(name)
    return {"+".join(names): names for names in by_unet.values()}


# --- results over the wire ---------------------------------------------------------------------------------

def outcome_line(outcome) -> dict:
    """A MethodResult as its results.json fields plus "image" (PNG, base64); a MethodFailure as its fields plus
    "failed": true."""
    from fastgen.results import MethodFailure

    if isinstance(outcome, MethodFailure):
        return {**outcome.to_dict(), "failed": True}
    return {**outcome.to_dict(), "image": png64(outcome.image)}


# --- the deployments ----------------------------------------------------------------------------------------

class Methods:
    """One deployment: an Engine (with its shared cache) for a group of methods of one family."""

    def __init__(self, family: str, methods: list[str], device: str | None = None, threads: int | None = None,
                 settings: dict | None = None):
        replica_setup(threads, settings)  # the size cap on visitors' LoRA downloads is the host's
        from fastgen.engine import Engine

        self.family, self.methods = get_family(family), list(methods)
        self.engine = Engine(device=device)

    # The handlers are async and run the engine in a worker thread: a sync handler would hold the replica's event
    # loop, so a panel that finished (LCM-LoRA) would not be sent until the next one on the same replica (the
    # reference, which shares its UNet) had finished too. The engine's run lock still runs one panel at a time.
    async def run(self, request: dict) -> dict:
        """One panel: the compare fields for one method (checked again here, as every engine call is)."""
        start, method = time.time(), request.pop("method")
        outcome = await asyncio.to_thread(
            lambda: next(self.engine.iter_compare(self.family, request.pop("prompt"), [method], **request)))
        return self.served(outcome, start)

    async def refine(self, request: dict) -> dict:
        start, method = time.time(), request.pop("method")
        image = from_png64(request.pop("image"))
        mask = request.pop("mask", None)
        mask = None if mask is None else from_png64(mask, "mask")
        outcome = await asyncio.to_thread(
            lambda: next(self.engine.iter_refine(self.family, image, request.pop("prompt"), [method], mask=mask,
                                                 **request)))
        return self.served(outcome, start)

    @staticmethod
    def served(outcome, start: float) -> dict:
        """The panel's line with when (wall clock, seconds since the epoch) and where it ran: panels of one
        comparison on different replicas overlap in time."""
        return {**outcome_line(outcome), "served": {"start": start, "end": time.time(), "pid": os.getpid()}}

    def health(self) -> dict:
        return {"methods": self.methods, "device": self.engine.device, "cache": self.engine.cache.report()}


class CustomModel:
    """A visitor's base model held by a custom-models replica: its family and an Engine of its own."""

    def __init__(self, base: str, device: str | None):
        from fastgen.engine import Engine
        from fastgen.request import custom_base

        self.base, self.family, self.engine = base, custom_base(base), Engine(device=device)


class CustomModels:
    """The deployment for visitors' base models (the `base` field): each request is routed by its model id (the
    base's Hub id or folder) to a replica that holds that model, and a replica keeps the last
    CUSTOM_MODELS_PER_REPLICA it used (Serve drops the least recently used)."""

    def __init__(self, device: str | None = None, threads: int | None = None, settings: dict | None = None):
        replica_setup(threads, settings)  # the size cap on downloads is the host's
        self.device = device
        self.held: list[str] = []  # the models this replica holds, least recently used first (for health)

    @_multiplexed
    async def model(self, base: str) -> CustomModel:
        return CustomModel(base, self.device)

    async def run(self, request: dict) -> dict:
        from ray import serve

        base = serve.get_multiplexed_model_id()
        held = await self.model(base)  # Serve's LRU: loaded now, or kept since its last use
        self.held = [b for b in self.held if b != base][-(CUSTOM_MODELS_PER_REPLICA - 1):] + [base]
        start, method = time.time(), request.pop("method")
        outcome = await asyncio.to_thread(  # off the event loop, as in Methods
            lambda: next(held.engine.iter_compare(held.family, request.pop("prompt"), [method], **request)))
        return Methods.served(outcome, start)

    def health(self) -> dict:
        return {"methods": [], "models": self.held, "per_replica": CUSTOM_MODELS_PER_REPLICA, "device": self.device}


class Ingress:
    """The HTTP front: checks each request with the page's schema, then runs its panels in parallel on their
    groups' deployments and streams each as it finishes."""

    def __init__(self, family: str, members: dict[str, list[str]], handles: dict, settings: dict | None = None):
        apply_host_settings(settings)  # who may load a custom model or LoRA: the host's switch, as on the page
        self.family = get_family(family)
        self.members = members
        self.handles = handles  # group name -> DeploymentHandle
        self.group_of = {m: g for g, ms in members.items() for m in ms}

    async def __call__(self, request):
        from starlette.responses import JSONResponse, StreamingResponse

        from fastgen.request import RequestError

        path, verb = request.url.path.rstrip("/") or "/", request.method
        try:
            if (verb, path) == ("GET", "/health"):
                return JSONResponse(await self.health())
            if verb != "POST" or path not in ("/compare", "/run", "/refine"):
                return JSONResponse({"error": f"no route {verb} {path}"}, status_code=404)
            try:
                body = json.loads(await request.body())
            except ValueError:
                raise RequestError("body", "the body must be a JSON object") from None
            if not isinstance(body, dict):
                raise RequestError("body", "the body must be a JSON object")
            jobs = self.refine_jobs(body) if path == "/refine" else self.compare_jobs(body, one=path == "/run")
        except RequestError as error:
            return JSONResponse({"error": str(error), "field": error.field}, status_code=400)
        if path == "/run":
            return JSONResponse(await self.finish(*jobs[0]))
        return StreamingResponse(self.stream(jobs), media_type="application/x-ndjson")

    def compare_jobs(self, body: dict, one: bool) -> list[tuple]:
        from fastgen.present import run_order
        from fastgen.request import CompareRequest, RequestError

        fields = dict(body)
        method = fields.pop("method", None) if one else None
        if one:
            if not isinstance(method, str):
                raise RequestError("method", f"`method` must name one of {self.family.method_names}")
            fields["methods"] = [method]
        req = CompareRequest.parse(fields, family=self.family)
        fam = req.family
        if fam.name in FAMILIES:
            self.served(req.methods)
            model = None
        elif CUSTOM not in self.handles:  # only reachable when the host's switch and the deployments disagree
            raise RequestError("base", "custom models are not served here: the app was deployed without them")
        else:
            model = fields["base"].strip()
        order = run_order(fam, req.methods, {m: req.steps.get(m, fam.method(m).steps) for m in req.methods},
                          {m: req.guidance.get(m, fam.method(m).guidance) for m in req.methods})
        return self.jobs("run", req, order, model=model)

    def refine_jobs(self, body: dict) -> list[tuple]:
        from fastgen.engine import Engine
        from fastgen.request import RefineRequest

        image = from_png64(body.get("image"))
        mask = body.get("mask")
        mask = None if mask is None else from_png64(mask, "mask")
        req = RefineRequest.parse({k: v for k, v in body.items() if k not in ("image", "mask")}, family=self.family)
        self.served(req.methods)
        Engine.check_refine(self.family, list(req.methods), image, mask, req.strength, req.steps, req.guidance,
                            req.keep_outside, req.resize)
        extra = {"image": body["image"], **({"mask": body["mask"]} if mask is not None else {})}
        return self.jobs("refine", req, req.methods, extra)

    @staticmethod
    def jobs(call: str, req, order, extra: dict | None = None, model: str | None = None) -> list[tuple]:
        """(method, deployment call, payload, route) per method in `order`: the request's engine arguments narrowed
        to that method's own steps and guidance. route: (its label, the visitor's base model or None)."""
        kwargs = req.engine_kwargs()
        steps, guidance = kwargs.pop("steps") or {}, kwargs.pop("guidance") or {}
        return [(m, call, {**kwargs, **(extra or {}), "method": m, "prompt": req.prompt,
                           "steps": {m: steps[m]} if m in steps else None,
                           "guidance": {m: guidance[m]} if m in guidance else None},
                 (req.family.method(m).label, model)) for m in order]

    def served(self, methods) -> None:
        from fastgen.request import RequestError

        missing = [m for m in methods if m not in self.group_of]
        if missing:
            raise RequestError("methods", f"`methods` must be chosen from the served ones {list(self.group_of)}, "
                                          f"got {missing}")

    async def finish(self, method: str, call: str, payload: dict, route: tuple) -> dict:
        """One panel on its group's deployment (a visitor's base model: on the replica that holds it); a replica
        that dies on the way fails this panel only."""
        label, model = route
        if model is None:
            handle = self.handles[self.group_of[method]]
        else:
            handle = self.handles[CUSTOM].options(multiplexed_model_id=model)
        try:
            return await getattr(handle, call).remote(payload)
        except Exception as error:  # RayActorError and kin: the replica is gone; Serve replaces it
            logger.warning("%s/%s: its replica failed (%s)", model or self.family.name, method, type(error).__name__)
            return {"method": method, "label": label, "kind": "replica-died",
                    "message": f"{label}: its server process stopped during the run ({type(error).__name__}); "
                               "try again", "failed": True}

    async def stream(self, jobs: list[tuple]):
        tasks = [asyncio.ensure_future(self.finish(*job)) for job in jobs]
        for done in asyncio.as_completed(tasks):
            yield json.dumps(await done) + "\n"

    async def health(self) -> dict:
        replicas = {}
        for group, handle in self.handles.items():
            try:
                replicas[group] = await handle.health.remote()
            except Exception as error:
                replicas[group] = {"error": type(error).__name__}
        groups = {**self.members, **({CUSTOM: []} if CUSTOM in self.handles else {})}
        return {"ok": all("error" not in r for r in replicas.values()), "family": self.family.name,
                "groups": groups, "replicas": replicas}


# --- building and running the application --------------------------------------------------------------------

def build(family: str | Family, methods: list[str] | None = None, replicas: int = 1,
          gpus_per_replica: float | None = None, cpus_per_replica: float | None = None, threads: int | None = None,
          max_replicas: int | None = None, public: bool = True):
    """The Serve application: one `Methods` deployment per group (`replicas` each, or autoscaling between
    `replicas` and `max_replicas`), and the ingress. gpus_per_replica None: 1 when the cluster has GPUs, else 0
    (CPU); fractions share a GPU between replicas. cpus_per_replica None: 1 with GPUs; on CPUs alone, the
    cluster's CPUs shared out so that every replica is scheduled (2 CPUs, 3 groups: 0.66 each), and as many
    torch threads per replica as it has whole CPUs (at least 1), so replicas do not oversubscribe the cores.
    When the host allows custom models (FASTGEN_ALLOW_CUSTOM, FASTGEN_CUSTOM_ALLOW, read here), a custom-models
    deployment joins them; `public`: the app answers beyond this machine (no local folders then)."""
    import ray
    from ray import serve

    family = get_family(family)
    members = groups(family, methods)
    settings = host_settings(public)
    deployed = len(members) + custom_allowed(settings)
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    device = "cuda" if gpus_per_replica > 0 else "cpu"
    if cpus_per_replica is None:
        cpus = resources.get("CPU", 1.0)
        cpus_per_replica = 1.0 if device == "cuda" else min(1.0, int(100 * cpus / (deployed * replicas)) / 100)
    if threads is None and device == "cpu":
        threads = max(1, int(resources.get("CPU", 1.0) // (deployed * replicas)))
    scaling = ({"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas}}
               if max_replicas and max_replicas > replicas else {"num_replicas": replicas})
    handles = {}
    for name, names in members.items():
        deployment = serve.deployment(Methods).options(
            name=f"methods-{name}", ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
            max_ongoing_requests=4, **scaling)
        handles[name] = deployment.bind(family.name, names, device, threads, settings)
    if custom_allowed(settings):
        deployment = serve.deployment(CustomModels).options(
            name=CUSTOM, ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
            max_ongoing_requests=4, **scaling)
        handles[CUSTOM] = deployment.bind(device, threads, settings)
    ingress = serve.deployment(Ingress).options(name="ingress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(family.name, members, handles, settings)


def main(args) -> int:
    """`python -m fastgen serve`: start (or join) Ray, deploy, and serve until interrupted."""
    import os
    import time

    import ray
    from ray import serve

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build(args.family or "mini", args.methods.split(",") if args.methods else None, args.replicas,
                args.gpus_per_replica, args.cpus_per_replica, max_replicas=args.max_replicas,
                public=args.host not in ("127.0.0.1", "localhost", "::1"))
    serve.run(app, name="fastgen", route_prefix="/")
    print(f"serving {args.family or 'mini'} on http://{args.host}:{args.port} (groups: "
          f"{', '.join(groups(args.family or 'mini', args.methods.split(',') if args.methods else None))})",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        return 130
