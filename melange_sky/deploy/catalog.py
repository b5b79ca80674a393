"""GPU offers: which cloud instance gives you a GPU, where, and at what price per hour.

Two sources, in SkyPilot's own CSV layout (one `vms.csv` per cloud):

1. SkyPilot's downloaded catalogs on this machine (`$SKY_RUNTIME_DIR or ~/.sky/catalogs/<schema>/<cloud>/vms.csv`),
   when they exist: they are fresher and cover every region;
2. the offline snapshot bundled in `melange_sky/data/catalogs/` (a few regions, prices of November 2025).

Each cloud is read on first use and only the GPU rows are kept, so `Catalog().offers("A10G", ["aws"])` reads
one small file. This module never imports `sky` (that takes seconds); it finds SkyPilot's catalog schema version by
reading the text of `sky/skylet/constants.py`.
"""
from __future__ import annotations

import csv
import difflib
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator, Sequence

from melange_sky.core.gpus import canonical_gpu
from melange_sky.errors import CatalogError

#: Clouds whose `vms.csv` layout melange-sky understands (GCP prices GPUs apart from their host VM).
KNOWN_CLOUDS = ("aws", "azure", "gcp", "lambda")
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data" / "catalogs"  # melange_sky/data/catalogs
#: When SkyPilot is not installed (or its constants cannot be read), the schema of skypilot 0.14.
FALLBACK_SCHEMA_VERSION = "v8"
#: When the bundled prices were taken (sources: README, "Where prices come from").
BUNDLED_DATE = "2025-11"
#: Where SkyPilot downloads its catalogs from (sky/skylet/constants.py: HOSTED_CATALOG_DIR_URL), + /<schema>/<cloud>.
HOSTED_CATALOG_URL = "https://raw.githubusercontent.com/skypilot-org/skypilot-catalog/master/catalogs"

#: The original Mélange mapping: among equally cheap offers, these win (A10G is $1.006/h in several AWS regions).
PREFERRED_OFFERS = {
    "A10G": ("aws", "us-west-2", "g5.xlarge"),
    "A100-80GB": ("azure", "eastus", "Standard_NC24ads_A100_v4"),
}

# GCP attaches GPUs to a host VM: these GPUs need their own machine family (count -> machine types), others go
# on N1 machines with enough vCPUs and >= 4 GB of memory per vCPU (SkyPilot's gcp_catalog rules, 0.14).
_GCP_HOSTS: dict[str, dict[int, tuple[str, ...]]] = {
    "A100": {1: ("a2-highgpu-1g",), 2: ("a2-highgpu-2g",), 4: ("a2-highgpu-4g",), 8: ("a2-highgpu-8g",),
             16: ("a2-megagpu-16g",)},
    "A100-80GB": {1: ("a2-ultragpu-1g",), 2: ("a2-ultragpu-2g",), 4: ("a2-ultragpu-4g",), 8: ("a2-ultragpu-8g",)},
    "L4": {1: ("g2-standard-4", "g2-standard-8", "g2-standard-12", "g2-standard-16", "g2-standard-32"),
           2: ("g2-standard-24",), 4: ("g2-standard-48",), 8: ("g2-standard-96",)},
    "H100": {1: ("a3-highgpu-1g",), 2: ("a3-highgpu-2g",), 4: ("a3-highgpu-4g",), 8: ("a3-highgpu-8g",)},
}
_GCP_N1_CPUS = {"T4": {1: 4, 2: 8, 4: 48}, "DEFAULT": {1: 8, 2: 16, 4: 32, 8: 64, 16: 128}}
#: GPUs SkyPilot attaches to N1 hosts. Others that SkyPilot maps to machine families we do not model here (H200,
#: B200, H100-MEGA, RTXPRO6000, ...) are left out rather than composed on a host SkyPilot would reject.
_GCP_N1_GPUS = ("K80", "V100", "T4", "P4", "P100")
_GCP_N1_FAMILIES = ("n1-standard", "n1-highmem", "n1-highcpu")


def offer_key(cloud: str | None, region: str | None, instance_type: str | None, use_spot: bool = False) -> str:
    """How the ledger, plans and capacity exclusions name an offer: "aws:us-west-2:g5.xlarge", plus ":spot" for
    spot capacity (a different pool from on-demand)."""
    key = ":".join(part or "any" for part in (cloud, region, instance_type))
    return f"{key}:spot" if use_spot else key


@dataclass(frozen=True)
class Offer:
    """One way to rent `gpu_count` GPUs of one type: a cloud instance type in a region, with its prices per hour.

    Prices are for the whole instance; an instance with k GPUs serves k times one GPU's throughput.
    """

    gpu: str
    cloud: str
    region: str
    instance_type: str
    gpu_count: int
    price: float
    spot_price: float | None
    source: str  # "bundled" or "skypilot"

    @property
    def accelerators(self) -> str:
        """The SkyPilot `accelerators:` value, e.g. "A100-80GB:1"."""
        return f"{self.gpu}:{self.gpu_count}"

    @property
    def key(self) -> str:
        """A readable unique id: "aws:us-west-2:g5.xlarge"."""
        return offer_key(self.cloud, self.region, self.instance_type)

    @property
    def price_per_gpu(self) -> float:
        return self.price / self.gpu_count

    @property
    def spot_price_per_gpu(self) -> float | None:
        return None if self.spot_price is None else self.spot_price / self.gpu_count

    def hourly(self, use_spot: bool = False) -> float | None:
        """The instance's $/h on demand, or on spot (None when the catalog has no spot price)."""
        return self.spot_price if use_spot else self.price

    def sort_key(self, use_spot: bool = False) -> tuple:
        """Cheapest per GPU first; ties go to the original Mélange offer, then fewer GPUs, then by name."""
        price = self.hourly(use_spot)
        per_gpu = math.inf if price is None else price / self.gpu_count
        preferred = PREFERRED_OFFERS.get(self.gpu) == (self.cloud, self.region, self.instance_type)
        return round(per_gpu, 9), not preferred, self.gpu_count, self.cloud, self.region, self.instance_type

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu, "cloud": self.cloud, "region": self.region, "instance_type": self.instance_type,
                "accelerators": self.accelerators, "gpu_count": self.gpu_count, "price": self.price,
                "spot_price": self.spot_price, "price_per_gpu": self.price_per_gpu,
                "spot_price_per_gpu": self.spot_price_per_gpu, "source": self.source}


# ---- where SkyPilot keeps its catalogs ----------------------------------------------------------------------------

def skypilot_schema_version() -> str:
    """SkyPilot's CATALOG_SCHEMA_VERSION (e.g. "v8"), read without importing `sky` (which takes seconds)."""
    module = sys.modules.get("sky.skylet.constants")
    if module is not None:
        return str(module.CATALOG_SCHEMA_VERSION)
    return _schema_from_source(_sky_package_dir()) or FALLBACK_SCHEMA_VERSION


def _sky_package_dir() -> Path | None:
    # find_spec on the top-level name locates the package without executing it (a submodule would import `sky`).
    try:
        spec = importlib.util.find_spec("sky")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _schema_from_source(package: Path | None) -> str | None:
    if package is None:
        return None
    try:
        text = (package / "skylet" / "constants.py").read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^CATALOG_SCHEMA_VERSION\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def skypilot_catalog_dir() -> Path:
    """Where SkyPilot keeps its downloaded catalogs: `$SKY_RUNTIME_DIR` (default `~`)/.sky/catalogs/<schema>."""
    runtime = os.path.expanduser(os.environ.get("SKY_RUNTIME_DIR") or "~")
    return Path(runtime) / ".sky" / "catalogs" / skypilot_schema_version()


# ---- reading vms.csv ----------------------------------------------------------------------------------------------

def _float(value: str | None) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _count(value: str | None) -> int | None:
    """A whole, positive GPU count; fractional GPUs (AWS g6f: 0.25 of an L4) are not offers here."""
    number = _float(value)
    if number is None or number < 1 or not number.is_integer():
        return None
    return int(number)


# The columns read from each layout. SkyPilot itself reads these files with pandas and indexes the same columns
# (sky/catalog/common.py: InstanceType, AcceleratorName, AcceleratorCount, Price, Region; vCPUs/MemoryGiB for GCP's
# host VMs); SpotPrice and AvailabilityZone may be absent there too, and extra columns are ignored.
REQUIRED_COLUMNS = ("InstanceType", "AcceleratorName", "AcceleratorCount", "Price", "Region")
REQUIRED_GCP_COLUMNS = REQUIRED_COLUMNS + ("AvailabilityZone", "vCPUs", "MemoryGiB")


def _rows(path: Path, required: Sequence[str] = (), skip_without: str | None = None) -> Iterator[dict[str, str]]:
    """The CSV's rows as dicts; CatalogError naming the file and column when a `required` one is missing (a changed
    file would otherwise yield no offers and drop its cloud in silence). A UTF-8 BOM (Excel writes one) is skipped,
    as pandas does for SkyPilot. With `skip_without`, rows whose column of that name is empty are dropped before
    building a dict (most rows of SkyPilot's AWS catalog have no GPU; this keeps a 3.6 MB file near 100 ms)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            missing = [name for name in required if name not in header]
            if missing:
                raise CatalogError(
                    f"the catalog {path} has no {', '.join(repr(m) for m in missing)} column"
                    f"{'s' if len(missing) > 1 else ''} (its header: {','.join(header)[:200] or 'empty'}); "
                    f"fix its header, or delete it to use SkyPilot's download (or the bundled snapshot)")
            index = header.index(skip_without) if skip_without in header else None
            for row in reader:
                if index is not None and (index >= len(row) or not row[index]):
                    continue
                yield dict(zip(header, row))
    except OSError as exc:
        raise CatalogError(f"cannot read the catalog {path}: {exc.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise CatalogError(f"cannot parse the catalog {path}: {exc}") from None


def _cheapest(offers: Iterable[Offer]) -> list[Offer]:
    """One offer per (GPU, region, instance type): the cheapest on-demand and the cheapest spot over its zones."""
    best: dict[tuple, Offer] = {}
    for offer in offers:
        key = (offer.gpu, offer.gpu_count, offer.region, offer.instance_type)
        old = best.get(key)
        if old is None:
            best[key] = offer
            continue
        spots = [p for p in (old.spot_price, offer.spot_price) if p is not None]
        best[key] = Offer(old.gpu, old.cloud, old.region, old.instance_type, old.gpu_count,
                          min(old.price, offer.price), min(spots) if spots else None, old.source)
    return list(best.values())


def read_vms_csv(path: Path, cloud: str, source: str) -> list[Offer]:
    """The GPU offers in one SkyPilot `vms.csv` (any cloud's layout; GCP's GPU rows are joined to a host VM)."""
    if cloud == "gcp":
        return _read_gcp(path, source)
    offers = []
    for row in _rows(path, REQUIRED_COLUMNS, skip_without="AcceleratorName"):
        name, count = (row.get("AcceleratorName") or "").strip(), _count(row.get("AcceleratorCount"))
        instance, region, price = (row.get("InstanceType") or "").strip(), (row.get("Region") or "").strip(), \
            _float(row.get("Price"))
        if not name or count is None or not instance or not region or price is None or price <= 0:
            continue
        spot = _float(row.get("SpotPrice"))
        offers.append(Offer(name, cloud, region, instance, count, price,
                            spot if spot is not None and spot > 0 else None, source))
    return _cheapest(offers)


def _read_gcp(path: Path, source: str) -> list[Offer]:
    hosts: dict[str, list[tuple[str, float, float, float, float | None]]] = {}
    gpus = []
    for row in _rows(path, REQUIRED_GCP_COLUMNS):
        instance, name = (row.get("InstanceType") or "").strip(), (row.get("AcceleratorName") or "").strip()
        zone, price = (row.get("AvailabilityZone") or "").strip(), _float(row.get("Price"))
        if price is None or not zone:
            continue
        if instance and not name:
            if instance.startswith(("a2-", "a3-", "g2-", "n1-")):
                cpus, memory = _float(row.get("vCPUs")) or 0.0, _float(row.get("MemoryGiB")) or 0.0
                hosts.setdefault(zone, []).append((instance, cpus, memory, price, _float(row.get("SpotPrice"))))
        elif name and not instance and not name.lower().startswith("tpu"):
            count = _count(row.get("AcceleratorCount"))
            if count is not None:
                gpus.append((name, count, (row.get("Region") or "").strip(), zone, price,
                             _float(row.get("SpotPrice"))))
    offers = []
    for name, count, region, zone, gpu_price, gpu_spot in gpus:
        host = _gcp_host(name, count, hosts.get(zone, []))
        if host is None:
            continue
        instance, _cpus, _memory, host_price, host_spot = host
        spot = gpu_spot + host_spot if gpu_spot is not None and host_spot is not None else None
        offers.append(Offer(name, "gcp", region, instance, count, round(gpu_price + host_price, 6),
                            None if spot is None else round(spot, 6), source))
    return _cheapest(offers)


def _gcp_host(name: str, count: int, hosts: list) -> tuple | None:
    """The cheapest host VM in the zone that SkyPilot would accept for `count` x `name` (gcp_catalog rules)."""
    if name in _GCP_HOSTS:
        allowed = _GCP_HOSTS[name].get(count, ())
        fits = [h for h in hosts if h[0] in allowed]
    elif name in _GCP_N1_GPUS:
        cpus = _GCP_N1_CPUS.get(name, _GCP_N1_CPUS["DEFAULT"]).get(count)
        if cpus is None:
            return None
        fits = [h for h in hosts if h[0].startswith(_GCP_N1_FAMILIES) and h[1] >= cpus and h[2] >= 4 * cpus]
    else:
        return None
    return min(fits, key=lambda h: (h[3], h[0]), default=None)


# ---- the catalog --------------------------------------------------------------------------------------------------

_AUTO = "auto"


class Catalog:
    """GPU offers from SkyPilot's downloaded catalogs where present, else from the bundled snapshot, per cloud.

    `skypilot_dir="auto"` looks in SkyPilot's catalog directory; `None` uses the bundled snapshot only (what tests
    and reproducible plans want). Each cloud's file is read once, on first use.
    """

    def __init__(self, skypilot_dir: Path | str | None = _AUTO, bundled_dir: Path | str = BUNDLED_DIR):
        self.skypilot_dir = skypilot_catalog_dir() if skypilot_dir == _AUTO else (
            Path(skypilot_dir) if skypilot_dir is not None else None)
        self.bundled_dir = Path(bundled_dir)
        self._offers: dict[str, list[Offer]] = {}

    def path(self, cloud: str) -> tuple[Path, str]:
        """The `vms.csv` this catalog reads for `cloud`, and its source label ("skypilot" or "bundled")."""
        if self.skypilot_dir is not None:
            path = self.skypilot_dir / cloud / "vms.csv"
            if path.is_file():
                return path, "skypilot"
        return self.bundled_dir / cloud / "vms.csv", "bundled"

    def check_clouds(self, clouds: Iterable[str] | None) -> tuple[str, ...]:
        """Lower-cased cloud names, each known; CatalogError naming the unknown one otherwise."""
        if clouds is None:
            return KNOWN_CLOUDS
        result = []
        for cloud in clouds:
            name = cloud.strip().lower()
            if name not in KNOWN_CLOUDS:
                close = difflib.get_close_matches(name, KNOWN_CLOUDS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known clouds: {', '.join(KNOWN_CLOUDS)}"
                raise CatalogError(f"unknown cloud {cloud!r}; {hint}")
            result.append(name)
        return tuple(dict.fromkeys(result))

    def cloud_offers(self, cloud: str) -> list[Offer]:
        """Every GPU offer of one cloud (read on first call)."""
        if cloud not in self._offers:
            path, source = self.path(cloud)
            if not path.is_file():
                self._offers[cloud] = []
            else:
                self._offers[cloud] = [self._canonical(o) for o in read_vms_csv(path, cloud, source)]
        return self._offers[cloud]

    @staticmethod
    def _canonical(offer: Offer) -> Offer:
        try:
            name = canonical_gpu(offer.gpu)
        except CatalogError:
            return offer  # a GPU melange-sky has no alias for: keep the catalog's own spelling
        if name == offer.gpu:
            return offer
        return Offer(name, offer.cloud, offer.region, offer.instance_type, offer.gpu_count, offer.price,
                     offer.spot_price, offer.source)

    def gpu_names(self, clouds: Iterable[str] | None = None) -> list[str]:
        """Canonical names of every GPU with an offer in `clouds` (default: all)."""
        return sorted({o.gpu for cloud in self.check_clouds(clouds) for o in self.cloud_offers(cloud)})

    def resolve_gpu(self, name: str, clouds: Iterable[str] | None = None) -> str:
        """`name` as a canonical GPU name offered in `clouds`; CatalogError saying why not otherwise: close names
        for a name no catalog knows, the clouds that have it, or (a real GPU the bundled snapshot lacks) how to
        get SkyPilot's full catalog."""
        clouds = self.check_clouds(clouds)
        offered = self.gpu_names(clouds)
        try:
            gpu = canonical_gpu(name, offered)
        except CatalogError:  # perhaps a GPU only other clouds rent (read only now: SkyPilot's GCP file is large)
            gpu = canonical_gpu(name, self.gpu_names(KNOWN_CLOUDS))
        if gpu not in offered:
            where = ", ".join(clouds)
            elsewhere = [c for c in KNOWN_CLOUDS if c not in clouds and gpu in self.gpu_names([c])]
            if elsewhere:
                raise CatalogError(f"no offer for GPU {gpu!r} in {where}; clouds with one: {', '.join(elsewhere)}")
            bundled = [c for c in clouds if self.path(c)[1] == "bundled"]
            if bundled:  # a GPU we know by name, but the snapshot's few regions do not rent it
                own = [c for c in clouds if c not in bundled]  # read from SkyPilot's files: none there either
                also = (f" (nor has SkyPilot's catalog for {', '.join(own)} in {self.skypilot_dir})" if own else "")
                raise CatalogError(f"the bundled catalog snapshot ({BUNDLED_DATE} prices, a few regions) has no "
                                   f"offer for {gpu!r} in {', '.join(bundled)}{also}; {full_catalog_hint(bundled)}")
            raise CatalogError(f"no offer for GPU {gpu!r} in {where} (SkyPilot's catalog in {self.skypilot_dir})")
        return gpu

    def offers(self, gpu: str | None = None, clouds: Iterable[str] | None = None,
               use_spot: bool = False) -> list[Offer]:
        """Offers for `gpu` (any spelling; all GPUs when None) in `clouds`, cheapest per GPU first.

        With `use_spot`, only offers with a spot price, sorted by it.
        """
        clouds = self.check_clouds(clouds)
        wanted = self.resolve_gpu(gpu, clouds) if gpu is not None else None
        result = [o for cloud in clouds for o in self.cloud_offers(cloud)
                  if (wanted is None or o.gpu == wanted) and (not use_spot or o.spot_price is not None)]
        return sorted(result, key=lambda o: o.sort_key(use_spot))

    def instance_types(self, cloud: str) -> list[str]:
        """Instance types with a GPU offer in `cloud` (for "did you mean" hints)."""
        return sorted({o.instance_type for o in self.cloud_offers(cloud)})

    def describe(self, clouds: Iterable[str] | None = None) -> dict[str, str]:
        """cloud -> the file it is read from, for users wondering where a price comes from."""
        described = {}
        for cloud in self.check_clouds(clouds):
            path, source = self.path(cloud)
            described[cloud] = f"{path} (bundled snapshot, {BUNDLED_DATE} prices)" if source == "bundled" else str(path)
        return described


def full_catalog_hint(clouds: Sequence[str]) -> str:
    """How to get SkyPilot's full catalog where melange-sky reads it (the end of a missing-offer message)."""
    target = skypilot_catalog_dir()
    cloud = clouds[0] if len(clouds) == 1 else "<cloud>"
    return (f"SkyPilot's full catalog (every region) may have it: SkyPilot downloads it into {target}/ on first "
            f"use, or fetch {HOSTED_CATALOG_URL}/{target.name}/{cloud}/vms.csv into {target}/{cloud}/; "
            f"melange-sky reads it there")


def default_catalog() -> Catalog:
    """The catalog commands use: SkyPilot's downloaded catalogs where present, else the bundled snapshot."""
    return Catalog()
