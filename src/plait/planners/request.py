"""The planning request behind a plan (model, cluster, batch, family, options), kept in the plan, and re-planning
from it for another number of devices: what an elastic run does when it is resized (docs/elastic.md).

``plait plan MODEL --cluster C ... --out PLAN.json`` records its request in the plan's provenance (options key
``request``, a JSON object), with the chosen global batch filled in, so a plan re-made for 2 or 48 devices keeps the
global batch. ``replan(plan, world)`` plans the same request on ``world`` devices of the same kind with the same
planner code ``plait plan`` runs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from plait.cluster import Cluster, load_cluster, local_cluster
from plait.errors import NoFeasiblePlanError, PlaitError
from plait.plan import MeshSpec
from plait.plan.ir import Plan, Provenance
from plait.plan.layout import layout_name
from plait.planners.pipeline_tokens import token_slicing
from plait.planners.replan_cache import ReplanCache

REQUEST_KEY = "request"  # the key of Provenance.options that holds the request's JSON
DEFAULT_PER_RANK_BATCH = 8
FAMILY_CHOICES = ("all", "data-parallel", "intra-op", "pipeline")


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What ``plait plan`` was asked: enough to plan the same model again for another number of devices."""

    model: str  # a zoo name or module.path:factory
    cluster: str  # a preset NAME:K or a cluster YAML path (absolute)
    world: int | None = None  # devices to plan for (None: the cluster's own); a resize changes only this
    batch: int | None = None  # global batch (None: 8 per rank; recorded plans hold the batch chosen)
    micro_batch: int | None = None
    profile: str | None = None
    memory_fraction: float = 0.9
    family: str = "all"
    mesh: str | None = None  # an intra-op mesh, 2x4 or dp=2,tp=4
    precision: str | None = None
    sync: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILY_CHOICES:
            raise PlaitError(f"plan family {self.family!r} is not one of {', '.join(FAMILY_CHOICES)}")
        if self.world is not None and self.world < 1:
            raise PlaitError(f"a plan needs at least one device, not {self.world}")

    def to_json(self) -> str:
        """The request as compact JSON (what the plan keeps)."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PlanRequest:
        """Read ``to_json`` output; unknown keys (a newer plait's) are refused by name."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise PlaitError(f"the plan's planning request is not JSON ({exc}); re-plan with `plait plan ... --out`") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or "model" not in raw or "cluster" not in raw or set(raw) - known:
            raise PlaitError(f"the plan's planning request {text!r} is not one this plait reads (keys {sorted(known)}); "
                             "re-plan with `plait plan ... --out`")
        return cls(**raw)

    def resized(self, world: int) -> PlanRequest:
        """The same request for ``world`` devices (an explicit intra-op mesh keeps its model axes when it can)."""
        return replace(self, world=world, mesh=_resized_mesh(self.mesh, world))

    def load_cluster(self) -> Cluster:
        """The cluster to plan on: the request's, resized to ``world`` devices, calibrated by its profile."""
        cluster = with_profile(load_cluster(self.cluster), self.profile)
        return cluster if self.world is None else resize_cluster(cluster, self.world)

    def plan(self, *, progress: Callable[[str], None] | None = None, cache: ReplanCache | None = None) -> Plan:
        """Plan the request with ``plait.planners.plan`` (what ``plait plan`` runs); the plan records the request.
        With ``cache`` the model's captures and ILP results of earlier plannings are reused (the plan is the same)."""
        from plait.planners.auto import FAMILIES

        return self._plan(FAMILIES if self.family == "all" else (self.family,), progress=progress, cache=cache)

    def _plan(self, families: tuple[str, ...], *, progress: Callable[[str], None] | None = None,
              cache: ReplanCache | None = None) -> Plan:
        """The request planned over ``families`` (``plan``; a warm-up leaves families out)."""
        from plait.cost import CostModel
        from plait.planners.auto import plan as choose
        from plait.planners.data_parallel import resolve_precision

        cluster = self.load_cluster()
        per_rank = per_rank_batch(cluster, self.batch, self.micro_batch)
        source = cache.source(self.model, per_rank, resolve_precision(self.precision, cluster)) if cache is not None else None
        if source is not None:
            module, example_batch, loss_fn, name = source.model, source.example_batch, source.loss_fn, source.name
        else:
            module, example_batch, loss_fn, name = resolve_module(self.model, per_rank)
        meshes = [parse_mesh(self.mesh)] if self.mesh else None
        batch_axis = "dp" if meshes and meshes[0].axes == ("dp", "tp") else None  # 2x4 names the roles
        chosen = choose(module, example_batch, cluster, global_batch=self.batch, micro_batch=self.micro_batch,
                        cost=CostModel(cluster), memory_fraction=self.memory_fraction, precision=self.precision,
                        loss_fn=loss_fn, name=name, families=families, meshes=meshes, force_batch_axis=batch_axis,
                        progress=progress, sync=self.sync, source=source)
        return with_request(chosen, self)


def with_request(plan: Plan, request: PlanRequest) -> Plan:
    """``plan`` with ``request`` recorded in its provenance (the chosen global batch filled in)."""
    request = replace(request, batch=plan.batch.global_size)
    prov = plan.provenance or Provenance(planner="unknown", version="", created="", search_s=0.0)
    return replace(plan, provenance=replace(prov, options={**prov.options, REQUEST_KEY: request.to_json()}))


def request_of(plan: Plan, where: str = "this plan") -> PlanRequest:
    """The request ``plan`` was made from; a PlaitError naming the way out when it records none."""
    text = plan.provenance.options.get(REQUEST_KEY) if plan.provenance is not None else None
    if text is None:
        raise PlaitError(f"{where} records no planning request (model, cluster, batch), so it cannot be re-planned for "
                         "another number of ranks; write it with `plait plan MODEL --cluster C --batch B --out PLAN.json` "
                         "(or PlanRequest(...).plan() in Python), or give the elastic run a replan function")
    return PlanRequest.from_json(text)


@dataclass(frozen=True, kw_only=True)
class Replanned:
    """A plan re-made for another number of devices, and how long the planner took."""

    plan: Plan
    seconds: float
    kind: str  # a short name of what was chosen (replicate, fsdp, intra-op dp=1 x tp=2, pipeline ...)


def replan(plan: Plan, world: int, *, where: str = "this plan", cache: ReplanCache | None = None) -> Replanned:
    """Plan ``plan``'s request again for ``world`` devices (same model, batch, family and options), reusing what
    ``cache`` kept of earlier plannings. When the request names one family and none of its plans applies on ``world``
    devices (a model axis that no longer pays off), every family is searched instead: a resized job keeps training."""
    request = request_of(plan, where).resized(world)
    t0 = time.perf_counter()
    new = _plan_resized(request, cache)
    return Replanned(plan=new, seconds=time.perf_counter() - t0, kind=layout_name(new))


def _plan_resized(request: PlanRequest, cache: ReplanCache | None) -> Plan:
    """``request`` planned as a resized job runs it: without token slicing, every family if its own has no plan."""
    with token_slicing(False):  # the Trainer, which a resized job resumes in, does not run token-sliced plans yet
        try:
            return request.plan(cache=cache)
        except NoFeasiblePlanError:
            if request.family == "all":
                raise
            return replace(request, family="all").plan(cache=cache)


class Replanner:
    """The elastic launcher's ``Replan``: ``replan`` with one ReplanCache for the job's life, so a resize re-runs only
    what depends on the device count (the stage search, the weighing of candidates). ``warm(plan)`` fills the cache
    first (the launcher runs it while the job trains). Thread-safe: one planning at a time."""

    def __init__(self, cache: ReplanCache | None = None) -> None:
        self.cache = cache if cache is not None else ReplanCache()
        self.last: Replanned | None = None  # the latest re-plan
        self._lock = threading.Lock()

    def __call__(self, plan: Plan, nproc: int) -> Plan:
        """``plan``'s request planned for ``nproc`` devices (see ``replan``)."""
        with self._lock:
            self.last = replan(plan, nproc, cache=self.cache)
        return self.last.plan

    def warm(self, plan: Plan) -> None:
        """Fill the cache with what a re-plan of ``plan``'s request reuses (the model's captures, the stages'
        tensor-parallel ILPs): the request planned at its own size with the families whose work is kept (the
        intra-op candidates' ILPs depend on the mesh, so they are left out)."""
        from plait.planners.auto import FAMILIES

        request = request_of(plan)
        families = tuple(f for f in (FAMILIES if request.family == "all" else (request.family,)) if f != "intra-op")
        # without a plan that fits, what it captured and solved on the way is kept all the same
        with self._lock, token_slicing(False), contextlib.suppress(NoFeasiblePlanError):
            request._plan(families or ("data-parallel",), cache=self.cache)


def resize_cluster(cluster: Cluster, world: int) -> Cluster:
    """``cluster`` with ``world`` devices: ``local:N`` becomes ``local:world``; otherwise whole nodes of the same
    kind (``world`` a multiple of the devices per node), or one node holding ``world`` of them."""
    if world == cluster.world_size:
        return cluster
    if cluster.name.startswith("local:"):
        return replace(local_cluster(world), profile=cluster.profile)
    per_node = cluster.devices_per_node
    if world % per_node == 0:
        nodes, per_node = world // per_node, per_node
    elif world < per_node:
        nodes, per_node = 1, world
    else:
        raise PlaitError(f"{world} devices do not fill whole nodes of {cluster.devices_per_node} ({cluster.name}); "
                         f"ask for a multiple of {cluster.devices_per_node} or fewer than {cluster.devices_per_node}")
    base = cluster.name.split(":")[0]
    return replace(cluster, num_nodes=nodes, devices_per_node=per_node, name=f"{base}:{nodes}" if nodes > 1 else base)


def _resized_mesh(mesh: str | None, world: int) -> str | None:
    """An explicit mesh for ``world`` devices: its first (data) axis rescaled, its other axes kept; None if they do
    not divide ``world`` (the planner then tries its default meshes)."""
    if mesh is None:
        return None
    spec = parse_mesh(mesh)
    rest = math.prod(spec.shape[1:])
    if world % rest:
        return None
    return ",".join(f"{a}={n}" for a, n in zip(spec.axes, (world // rest, *spec.shape[1:]), strict=True))


# ---- what `plait plan` resolves from its arguments (shared with the CLI) ---------------------------------------


def per_rank_batch(cluster: Cluster, batch: int | None, micro_batch: int | None) -> int:
    """The batch to capture with: the micro-batch, else the global batch's share per rank, else 8."""
    if micro_batch:
        return micro_batch
    if batch and batch % cluster.world_size == 0:
        return batch // cluster.world_size
    return DEFAULT_PER_RANK_BATCH


def with_profile(cluster: Cluster, profile: str | None) -> Cluster:
    """The cluster calibrated by ``profile`` (a path, made absolute, or a packaged name), so a plan written
    from it carries the profile and ``plait sim`` and ``plait run`` see the same numbers."""
    if profile is None:
        return cluster
    path = Path(profile)
    return replace(cluster, profile=str(path.resolve()) if path.exists() else profile)


def _from_factory(spec: str) -> tuple[Any, Any, Callable[..., Any] | None, str]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PlaitError(f"cannot import {module_name!r} for model {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise PlaitError(f"{module_name} has no callable {attr!r}; MODEL must be a zoo name or module.path:factory")
    made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise PlaitError(
            f"{spec} returned {type(made).__name__}; a model factory must return (model, example_batch) "
            "or (model, example_batch, loss_fn)"
        )
    loss_fn = made[2] if len(made) == 3 else None
    return made[0], made[1], loss_fn, attr


def resolve_module(spec: str, per_rank: int) -> tuple[Any, Any, Callable[..., Any] | None, str]:
    """MODEL as (module, example batch, loss_fn, name): a zoo name (built on the meta device, batch of
    ``per_rank``) or ``module.path:factory``."""
    import torch

    from plait.models import ZOO, zoo_model

    if ":" in spec and spec.split(":", 1)[0] not in ZOO:
        return _from_factory(spec)
    if spec not in ZOO:
        raise PlaitError(f"unknown model {spec!r}; zoo models: {', '.join(ZOO)} (or give module.path:factory)")
    zoo = zoo_model(spec)
    with torch.device("meta"):
        model = zoo.build()
    return model, zoo.make_batch(per_rank, device="meta"), zoo.loss, spec


def parse_mesh(text: str) -> MeshSpec:
    """``2x4`` (axes dp, tp) or ``x=2,y=4`` (named axes) as a MeshSpec."""
    try:
        if "=" in text:
            pairs = [item.split("=") for item in text.split(",")]
            return MeshSpec(shape=tuple(int(n) for _, n in pairs), axes=tuple(a.strip() for a, _ in pairs))
        sizes = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        raise PlaitError(f"--mesh {text!r} is not a mesh; write 2x4 or dp=2,tp=4") from None
    names = ("dp", "tp") if len(sizes) == 2 else tuple(f"d{k}" for k in range(len(sizes)))
    return MeshSpec(shape=sizes, axes=names[: len(sizes)])
