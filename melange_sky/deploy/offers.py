"""Bind a config's GPU entries to catalog offers, so every solver column is a concrete cloud instance.

A GPU entry says what one GPU costs (`cost`, $/h) and serves (`tputs`); an offer says where to rent it. Binding
fills in the cloud, region, instance type and accelerators of each entry (honouring its pins, the config's `clouds`
and `use_spot`) and returns a new, fully pinned `Config` for the unchanged solver, plus column name -> `Offer`
for the renderer.

It reads the config's `clouds` and each GPU entry's `cloud`, `region`, `instance_type`, `accelerators`, `use_spot`,
`quotas` and `max_count`, parsed by `core.config` (whose docstring lists which module reads every key).

Semantics:
- `cost` and `tputs` in a config are per GPU (as in Mélange). A column bound to an instance with k GPUs costs
  k x the per-GPU cost and serves k x the tputs; the solver then counts instances.
- The config's cost wins over the catalog's price (it may be a negotiated price); a difference over 10% is a
  warning. An omitted cost is the catalog's price (filled when the config is loaded).
- Default mode: each entry becomes one column, bound to its cheapest allowed offer (single-GPU instances first;
  ties go to the original Mélange offers).
- Per-offer mode: each (entry, offer) pair becomes its own column, named "A10G@aws:us-west-2" (plus
  ":instance_type" when a region has two instance types), priced from the catalog (the config's cost applies to the
  offer the default mode would pick), so a cheap offer that runs out of quota spills the rest of the fleet to the
  next cloud; the solver's dominance presolve drops offers never needed.
- Quotas mean what clouds mean: GPUs. A pattern ("azure", "azure:eastus") caps the GPUs of all the entry's offers it
  matches together (an NC24ads with 1 GPU and an NC48ads with 2 share "azure:eastus": 4); the full
  "cloud:region:instance_type" caps one instance type. Every matching pattern applies. A 0 excludes the offers it
  matches unless a more specific pattern allows them ({"aws": 0, "aws:us-east-1": 2}: only us-east-1, 2 GPUs).
  A cap over one column is its max_count (instances: the cap's GPUs over the instance's); over several it is a
  `SharedCap` the solver keeps.
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from melange_sky.core.config import Config, GpuSpec, Market, Pricer, pinned_gpus
from melange_sky.deploy.catalog import Catalog, Offer, default_catalog, offer_key
from melange_sky.errors import CatalogError, ConfigError
from melange_sky.solver.model import SharedCap

#: What a spot column's name adds to its on-demand twin's ("A10G:spot", "A10G@aws:us-west-2:spot").
SPOT_SUFFIX = ":spot"
#: A config cost further than this from the catalog's price (relative to the catalog) gets a warning.
COST_MISMATCH_WARN = 0.10


@dataclass(frozen=True)
class BoundConfig:
    """A config whose every GPU column is pinned to one offer, and the offer of each column."""

    config: Config
    offers: dict[str, Offer]
    entries: dict[str, str] = field(default_factory=dict)  # column name -> GPU entry it came from
    per_offer: bool = False
    caps: tuple[SharedCap, ...] = ()  # quotas over several columns (GPUs), for the solver

    def to_dict(self) -> dict[str, object]:
        return {"per_offer": self.per_offer,
                "columns": {name: {"entry": self.entries.get(name, name), **offer.to_dict()}
                            for name, offer in self.offers.items()}}


def bind_offers(config: Config, catalog: Catalog | None = None, *, per_offer: bool = False,
                exclude: Collection[str] = (), strict: bool = True) -> BoundConfig:
    """`config` with every GPU entry bound to catalog offers (one column each, or one per offer with `per_offer`).

    `exclude` names offers (`catalog.offer_key`, with ":spot" for spot) found out of capacity: in the default mode
    an entry moves to its next-cheapest offer (it keeps the excluded one only if it has no other); in per-offer
    mode the excluded columns stay, for the caller to cap at the replicas already running there.
    Raises ConfigError (file and field) for a GPU, instance type or pin the catalog cannot satisfy; unless not
    `strict`, where an entry whose GPU the catalog does not know stays as the config gives it, with a warning (what
    `solve` does: it can solve a GPU no catalog lists, `plan` cannot launch it).
    """
    catalog = catalog or default_catalog()
    warnings = list(config.warnings)
    columns: list[GpuSpec] = []
    offers: dict[str, Offer] = {}
    entries: dict[str, str] = {}
    caps: list[SharedCap] = []
    for entry_spec in config.gpus:
        if entry_spec.market == Market.OWNED:
            column, offer = _owned_column(entry_spec, config.source)
            columns.append(column)
            offers[column.name] = offer
            entries[column.name] = entry_spec.name
            continue
        unknown = None if strict else _unknown_gpu(entry_spec, config.clouds, config.source, catalog)
        if unknown is not None:
            warnings.append(unknown)
            columns.append(entry_spec)
            entries[entry_spec.name] = entry_spec.name
            continue
        for spec, suffix in _markets(entry_spec, config, catalog):
            automatic = spec.market == Market.SPOT and entry_spec.market is None  # spot beside on-demand
            try:
                candidates = allowed_offers(spec, config.clouds, config.source, catalog)
            except ConfigError:
                if automatic:  # no spot price for this GPU here: an on-demand entry only
                    continue
                raise
            if config.spot is not None and spec.use_spot:
                candidates = [o for o in candidates if o.spot_price is not None and o.spot_price < o.price]
                if not candidates:
                    if entry_spec.market == Market.SPOT:
                        raise ConfigError(config.source, f"{spec.field_path}.use_spot",
                                          "no offer has a spot price below its on-demand price")
                    continue
            default = _pick(candidates, spec)  # the offer the config's cost is about
            if exclude and not per_offer:
                candidates = [o for o in candidates if offer_key(o.cloud, o.region, o.instance_type, spec.use_spot)
                              not in exclude] or candidates
            chosen = _pick(candidates, spec)
            own_cost = spec.cost_source == "config" and not automatic  # the config's cost is not a spot price
            if own_cost:
                _warn_mismatch(config.source, spec, default, warnings)
            picked = candidates if per_offer else [chosen]
            names = ([name + suffix for name in _column_names(spec.name, picked)] if per_offer
                     else [spec.name + suffix])
            if per_offer and spec.max_count is not None and len(picked) > 1:
                warnings.append(f"{config.source}: {spec.field_path}.max_count: with --per-offer it caps each of "
                                f"its {len(picked)} offers (use quotas for per-offer limits)")
            limits = quota_caps(spec.quotas, dict(zip(names, picked)))
            for name, offer in zip(names, picked):
                # The config's cost belongs to the offer the default mode picks; other offers keep the catalog's.
                if offer is default and own_cost:
                    cost_per_gpu = spec.cost
                else:
                    cost_per_gpu = _price(offer, spec.use_spot) / offer.gpu_count
                alone = [cap // offer.gpu_count for _, matched, cap in limits if matched == (name,)]
                columns.append(_column(spec, name, offer, cost_per_gpu,
                                       min_count=spec.min_count if offer is chosen else 0,
                                       max_count=_min(spec.max_count, min(alone, default=None))))
                offers[name] = offer
                entries[name] = spec.name
            caps += [SharedCap(f"{spec.field_path}.quotas.{pattern}{suffix}",
                               tuple((n, offers[n].gpu_count) for n in matched), cap)
                     for pattern, matched, cap in limits if len(matched) > 1]
            _warn_unused_quotas(config.source, spec, candidates, warnings)
    bound = dataclasses.replace(config, gpus=tuple(columns), warnings=tuple(dict.fromkeys(warnings)))
    return BoundConfig(config=bound, offers=offers, entries=entries, per_offer=per_offer, caps=tuple(caps))


def _markets(spec: GpuSpec, config: Config, catalog: Catalog) -> list[tuple[GpuSpec, str]]:
    """The markets an entry is offered on, as (the entry priced for that market, its columns' name suffix): its
    pinned market, else on-demand, and with a `spot` block spot too (suffix ":spot"; its min_count stays with
    on-demand). Without a `spot` block, exactly as before markets existed."""
    if config.spot is None or spec.market is not None:
        market = spec.market or (Market.SPOT if spec.use_spot else Market.ON_DEMAND)
        return [(dataclasses.replace(spec, market=market), "")]
    on_demand = dataclasses.replace(spec, market=Market.ON_DEMAND)
    spot = dataclasses.replace(spec, market=Market.SPOT, use_spot=True, min_count=0)
    return [(on_demand, ""), (spot, SPOT_SUFFIX)]


def _owned_column(spec: GpuSpec, source: str) -> tuple[GpuSpec, Offer]:
    """An owned entry (`cloud: kubernetes` or `ssh`) as one column at the user's cost, capped by its max_count and
    the quotas matching it; the offer it renders from has no instance type (the cluster's nodes decide)."""
    _, gpu, count = _wanted_gpu(spec, source)
    k = count or 1
    cloud = (spec.cloud or "kubernetes").lower()
    offer = Offer(gpu=gpu, cloud=cloud, region=spec.region or "", instance_type="", gpu_count=k,
                  price=round(spec.cost * k, 9), spot_price=None, source="config")
    caps = [cap // k for pattern, cap in spec.quotas if _matches_owned(pattern, offer)]
    limit = _min(spec.max_count, min(caps, default=None))
    if limit is None:
        raise ConfigError(source, f"{spec.field_path}.quotas", f"matches none of its {cloud} GPUs: give their "
                                                               f"number as max_count or a quota {cloud!r}")
    tputs = spec.tputs if k == 1 else tuple(tuple(k * x for x in row) for row in spec.tputs)
    column = dataclasses.replace(spec, entry=spec.name, cost=offer.price, tputs=tputs, market=Market.OWNED,
                                 use_spot=False, max_count=max(limit, spec.min_count), cloud=cloud,
                                 region=spec.region, instance_type=None, accelerators=offer.accelerators)
    return column, offer


def _matches_owned(pattern: str, offer: Offer) -> bool:
    keys = pattern.split(":")
    return keys[0] == offer.cloud and (len(keys) < 2 or keys[1] == offer.region)


def default_offer(spec: GpuSpec, clouds: tuple[str, ...] | None, source: str,
                  catalog: Catalog | None = None) -> Offer:
    """The offer the default mode binds `spec` to (used to price a GPU entry that has no `cost`)."""
    return _pick(allowed_offers(spec, clouds, source, catalog or default_catalog()), spec)


def catalog_pricer(catalog: Catalog | None = None) -> Pricer:
    """A config's price lookup for GPU entries without `cost`: their default offer's price per GPU in `catalog`
    (default: SkyPilot's downloaded catalogs, else the bundled snapshot, read only when a cost is missing). The one
    config loader is `core.config.load_config`; this is what the offers layer adds to it:
    `load_config(path, price=catalog_pricer())`."""
    def price(spec: GpuSpec, clouds: tuple[str, ...] | None, source: str) -> float:
        offer = default_offer(spec, clouds, source, catalog)
        hourly = offer.hourly(spec.use_spot)
        assert hourly is not None  # default_offer only returns offers with the price asked for
        return hourly / offer.gpu_count

    return price


def allowed_offers(spec: GpuSpec, clouds: tuple[str, ...] | None, source: str, catalog: Catalog) -> list[Offer]:
    """Every catalog offer `spec` may use: its GPU, in the allowed clouds, matching its pins, priced for its
    `use_spot`, and not excluded by a zero quota; cheapest per GPU first. ConfigError saying why if none."""
    path = spec.field_path
    try:
        allowed = catalog.check_clouds(clouds)
    except CatalogError as exc:
        raise ConfigError(source, "clouds", str(exc)) from None
    if spec.cloud is not None:
        cloud = spec.cloud.lower()
        if cloud not in allowed:
            try:
                catalog.check_clouds([cloud])
            except CatalogError as exc:
                raise ConfigError(source, f"{path}.cloud", str(exc)) from None
            raise ConfigError(source, f"{path}.cloud", f"is {spec.cloud!r}, which is not among the config's clouds "
                                                       f"({', '.join(allowed)})")
        allowed = (cloud,)
    gpu_field, gpu_name, count = _wanted_gpu(spec, source)
    try:
        gpu = catalog.resolve_gpu(gpu_name, allowed)
    except CatalogError as exc:
        raise ConfigError(source, f"{path}{gpu_field}", str(exc)) from None
    offers = [o for o in catalog.offers(gpu, allowed) if count is None or o.gpu_count == count]
    if not offers:
        raise ConfigError(source, f"{path}.accelerators", f"no offer with {count} x {gpu} per instance in "
                                                          f"{', '.join(allowed)}")
    if spec.region is not None:
        in_region = [o for o in offers if o.region == spec.region]
        if not in_region:
            regions = sorted({o.region for o in offers})
            raise ConfigError(source, f"{path}.region", f"no {gpu} offer in region {spec.region!r}; regions with "
                                                        f"one: {', '.join(regions)}")
        offers = in_region
    if spec.instance_type is not None:
        offers = _with_instance_type(spec, offers, allowed, gpu, source, catalog)
    if spec.use_spot:
        offers = [o for o in offers if o.spot_price is not None]
        if not offers:
            raise ConfigError(source, f"{path}.use_spot", f"the catalog has no spot price for {gpu} with these pins "
                                                          f"(spot prices are known for: "
                                                          f"{_spot_clouds(catalog, gpu, allowed)})")
    offers = [o for o in offers if quota(o, spec.quotas) != 0]
    if not offers:
        raise ConfigError(source, f"{path}.quotas", f"every {gpu} offer has a quota of 0")
    return sorted(offers, key=lambda o: o.sort_key(spec.use_spot))


def quota(offer: Offer, quotas: tuple[tuple[str, int], ...]) -> int | None:
    """The cap of the most specific quota pattern matching `offer` ("aws" < "aws:us-west-2" < "...:g5.xlarge"):
    whether the offer may be used at all (0: excluded)."""
    best: tuple[int, int] | None = None
    for pattern, cap in quotas:
        keys = pattern.split(":")
        if _matches(pattern, offer) and (best is None or len(keys) > best[0]):
            best = (len(keys), cap)
    return None if best is None else best[1]


def quota_caps(quotas: tuple[tuple[str, int], ...],
               offers: Mapping[str, Offer]) -> list[tuple[str, tuple[str, ...], int]]:
    """Per non-zero quota pattern: (pattern, the columns whose offers it matches, its cap in GPUs). Each caps the
    GPUs of those columns together, as a cloud's quota does."""
    result = []
    for pattern, cap in quotas:
        matched = tuple(name for name, offer in offers.items() if _matches(pattern, offer))
        if cap and matched:
            result.append((pattern, matched, cap))
    return result


def _matches(pattern: str, offer: Offer) -> bool:
    keys = tuple(pattern.split(":"))
    return keys == (offer.cloud, offer.region, offer.instance_type)[:len(keys)]


def _unknown_gpu(spec: GpuSpec, clouds: tuple[str, ...] | None, source: str, catalog: Catalog) -> str | None:
    """A warning if the catalog knows no GPU by `spec`'s name (in the allowed clouds), else None."""
    gpu_field, gpu_name, _ = _wanted_gpu(spec, source)
    try:
        allowed = catalog.check_clouds([spec.cloud.lower()] if spec.cloud else clouds)
    except CatalogError:
        return None  # not about the GPU: `allowed_offers` says what is wrong
    try:
        catalog.resolve_gpu(gpu_name, allowed)
    except CatalogError as exc:
        return (f"{source}: {spec.field_path}{gpu_field}: {exc}; solved at its config cost, but `plan` and `up` "
                f"need a catalog offer for it")
    return None


def _wanted_gpu(spec: GpuSpec, source: str) -> tuple[str, str, int | None]:
    """(field suffix, GPU name, GPUs per instance or None) from the `accelerators` pin ("A100-80GB:1", count 1 by
    default as in SkyPilot), else the entry's name with any count."""
    if spec.accelerators is None:
        return "", spec.name, None
    count = pinned_gpus(spec.accelerators)
    if count is None:
        raise ConfigError(source, f"{spec.field_path}.accelerators",
                          f"must look like \"A100-80GB:1\" (a GPU name and a whole count), got {spec.accelerators!r}")
    return ".accelerators", spec.accelerators.partition(":")[0].strip(), count


def _with_instance_type(spec: GpuSpec, offers: list[Offer], allowed: tuple[str, ...], gpu: str, source: str,
                        catalog: Catalog) -> list[Offer]:
    matching = [o for o in offers if o.instance_type == spec.instance_type]
    if matching:
        return matching
    path = f"{spec.field_path}.instance_type"
    everywhere = [o for cloud in allowed for o in catalog.cloud_offers(cloud) if o.instance_type == spec.instance_type]
    if everywhere:
        other = everywhere[0]
        if other.gpu != gpu:
            raise ConfigError(source, path, f"{spec.instance_type!r} has {other.accelerators}, not {gpu}")
        raise ConfigError(source, path, f"{spec.instance_type!r} is not offered with these pins; it is in "
                                        f"{', '.join(sorted({o.cloud + ':' + o.region for o in everywhere}))}")
    known = sorted({name for cloud in allowed for name in catalog.instance_types(cloud)})
    close = difflib.get_close_matches(spec.instance_type or "", known, n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    files = ", ".join(str(catalog.path(cloud)[0]) for cloud in allowed)
    raise ConfigError(source, path, f"instance type {spec.instance_type!r} is unknown to the catalog "
                                    f"({files}){hint}")


def _pick(candidates: list[Offer], spec: GpuSpec) -> Offer:
    """The default offer: single-GPU instances first (unless pinned otherwise), then the cheapest per GPU."""
    return min(candidates, key=lambda o: (o.gpu_count != 1, o.sort_key(spec.use_spot)))


def _price(offer: Offer, use_spot: bool) -> float:
    price = offer.hourly(use_spot)
    assert price is not None  # allowed_offers keeps only offers with the price asked for
    return price


def _column(spec: GpuSpec, name: str, offer: Offer, cost_per_gpu: float, min_count: int,
            max_count: int | None) -> GpuSpec:
    k = offer.gpu_count
    tputs = spec.tputs if k == 1 else tuple(tuple(k * x for x in row) for row in spec.tputs)
    return dataclasses.replace(spec, name=name, entry=spec.name, cost=round(cost_per_gpu * k, 9), tputs=tputs,
                               min_count=min_count,
                               max_count=max_count if max_count is None else max(max_count, min_count),
                               cloud=offer.cloud, region=offer.region, instance_type=offer.instance_type,
                               accelerators=offer.accelerators)


def _column_names(entry: str, offers: list[Offer]) -> list[str]:
    """"A10G@aws:us-west-2", with ":instance_type" added where one region has several instance types."""
    short = [f"{entry}@{o.cloud}:{o.region}" for o in offers]
    return [s if short.count(s) == 1 else f"{s}:{o.instance_type}" for s, o in zip(short, offers)]


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _warn_mismatch(source: str, spec: GpuSpec, offer: Offer, warnings: list[str]) -> None:
    catalog_price = _price(offer, spec.use_spot) / offer.gpu_count
    if abs(spec.cost - catalog_price) > COST_MISMATCH_WARN * catalog_price:
        kind = "spot " if spec.use_spot else ""
        warnings.append(f"{source}: {spec.field_path}.cost: ${spec.cost:g}/h per GPU differs by "
                        f"{100 * abs(spec.cost - catalog_price) / catalog_price:.0f}% from the catalog's {kind}"
                        f"${catalog_price:.4g}/h for {offer.instance_type} ({offer.cloud} {offer.region}); "
                        f"using the config's cost")


def _warn_unused_quotas(source: str, spec: GpuSpec, candidates: list[Offer], warnings: list[str]) -> None:
    for pattern, cap in spec.quotas:
        keys = pattern.split(":")
        if cap == 0:
            continue  # excluding offers that are not there anyway is harmless
        if not any((o.cloud, o.region, o.instance_type)[:len(keys)] == tuple(keys) for o in candidates):
            warnings.append(f"{source}: {spec.field_path}.quotas.{pattern}: matches none of its offers, ignored")


def _spot_clouds(catalog: Catalog, gpu: str, clouds: tuple[str, ...]) -> str:
    found = sorted({o.cloud for o in catalog.offers(gpu, clouds) if o.spot_price is not None})
    return ", ".join(found) if found else "none"
