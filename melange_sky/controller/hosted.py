"""The controller hosted on the fleet's router host (`watch --hosted`, started by the router's task): the same
`Controller` passes as `watch`, around them the exchange with the user's machine through the router
(`fleet.hosted`): adopt the snapshot `up` handed over, and after every pass hand back this host's own.

Its state is its own: a ledger under the host's `MELANGE_SKY_HOME` (never the user's: one writer per ledger), the
fleet's keys from its secrets (kept in that home's 0600 key file, as the user's machine keeps them), and the
launcher the user's machine used. Every action is a ledger event here and one line in the host's log, as `watch`.
"""
from __future__ import annotations

import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from pathlib import Path

from melange_sky.core.tls import first_certificate
from melange_sky.controller.watch import Action, Controller, PassReport
from melange_sky.errors import ControllerError, MelangeError
from melange_sky.fleet import hosted
from melange_sky.fleet.backends import Backend, load_backend
from melange_sky.fleet.keys import ADMIN_TOKEN_ENV, API_KEY_ENV, store_keys
from melange_sky.fleet.ledger import Ledger, ReplicaState
from melange_sky.fleet.reports import ReplicaEvent

__all__ = ["HostedLoop", "hosted_backend"]

ADOPTED = "adopted"  # the event kind of a snapshot taken over from `up`
RECENT_ACTIONS = 5  # how many of its latest actions the controller hands over with each snapshot
QUIET_KINDS = frozenset({"need", "no-traffic"})  # recorded every pass with --autoscale: not news for `status`


def hosted_backend(name: str | None, launcher_dir: str | None) -> Backend:
    """The launcher the user's machine used: the local launcher on its state directory (shared, as a SkyPilot API
    server is), or a launcher by name (SkyPilot: through the API server its settings name)."""
    if launcher_dir is not None:
        from melange_sky.fleet.local import LocalBackend  # noqa: PLC0415 - only the local launcher needs it

        return LocalBackend(Path(launcher_dir))
    return load_backend(name)


class HostedLoop:
    """One step = adopt what `up` handed over (if newer), a controller pass, and this host's snapshot back to the
    router. Prints nothing: actions go to `on_action`, as the controller's own.

    `router_cafile`: a TLS router's certificate, the file it serves on this host; `router_url` is then its https
    listener on the loopback, and every call to it is pinned to that certificate (`core.tls`). Plain http with a
    certificate, or https without one, is refused: never a silent fall back to clear text or to the system's CAs."""

    def __init__(self, controller: Controller, router_url: str, environ: Mapping[str, str],
                 on_action: Callable[[Action], None] | None = None,
                 on_warning: Callable[[str], None] | None = None, router_cafile: str | None = None):
        self.controller = controller
        self.ledger: Ledger = controller.ledger
        self.fleet = controller.fleet
        self.router_url = router_url.rstrip("/")
        self.router_cafile = _checked_cafile(self.router_url, router_cafile)
        shown = on_action or (lambda action: None)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ACTIONS)  # for `status`, with the snapshot

        def on_action_kept(action: Action) -> None:
            if action.kind not in QUIET_KINDS:
                self.recent.append({"at": time.time(), **action.to_dict()})
            shown(action)

        self.on_action = on_action_kept
        self.on_warning = on_warning or (lambda message: None)
        token, key = environ.get(ADMIN_TOKEN_ENV), environ.get(API_KEY_ENV)
        if not token or not key:
            raise ControllerError(f"a hosted controller needs {ADMIN_TOKEN_ENV} and {API_KEY_ENV} (the router's "
                                  f"secrets) in its environment")
        self.admin_token = token
        store_keys(self.fleet, token, key, self.ledger.home)
        self.adopted_at = 0.0
        self.checked = False
        self.last_pass: dict[str, Any] | None = None
        inner = controller.on_event
        controller.on_action = self.on_action  # the controller's own actions are kept too

        def on_event(event: ReplicaEvent) -> None:
            if event.state is ReplicaState.PENDING and event.cluster:
                self._announce()  # before its launch is requested: `down` must know it even if this host dies
            if inner is not None:
                inner(event)

        controller.on_event = on_event

    def _announce(self) -> None:
        """Hand the router this host's snapshot now (with the last pass): a replica was just written as PENDING."""
        try:
            hosted.push(self.router_url, self.admin_token,
                        hosted.snapshot(self.ledger, self.fleet, "controller", self.last_pass, list(self.recent)),
                        self.router_cafile)
        except MelangeError as exc:
            self.on_warning(f"could not hand the new replica to the router before its launch: {exc}")

    def _adopt(self) -> None:
        """Take over `up`'s snapshot when the router has a newer one than this host adopted."""
        try:
            doc = hosted.fetch(self.router_url, self.admin_token, "up", self.router_cafile)
        except MelangeError as exc:
            self.on_warning(f"could not read the fleet's snapshot from the router: {exc}")
            return
        if doc is None or doc.get("writer") != "up" or doc.get("fleet") != self.fleet:
            return
        at = float(doc.get("at") or 0.0)
        if at <= self.adopted_at:
            return
        changed = hosted.adopt(self.ledger, doc, router_url=self.router_url, router_cafile=self.router_cafile,
                               message="adopted from `up`")
        self.adopted_at = at
        message = (f"the fleet as `up` left it: {len(doc.get('clusters') or [])} cluster(s), "
                   f"{len(changed)} changed here")
        self.ledger.record_event(self.fleet, ADOPTED, message)
        self.on_action(Action(ADOPTED, message))

    def step(self) -> PassReport | None:
        """None while no `up` has handed the fleet over yet (nothing to watch)."""
        self._adopt()
        if self.ledger.get_fleet(self.fleet) is None:
            return None
        if not self.checked:  # a missing secret or setting: the errors `watch` refuses at its start
            try:
                self.controller.check()
            except MelangeError as exc:  # said where `status` reads it, and tried again next time
                report = PassReport(self.fleet, time.time(), 0.0, error=str(exc))
                self.ledger.record_event(self.fleet, "check-failed", str(exc))
                report.actions.append(Action("check-failed", str(exc)))
                self.on_action(report.actions[-1])
                self._hand_back(report)
                return report
            self.checked = True
        report = self.controller.run_pass()
        self._hand_back(report)
        return report

    def _hand_back(self, report: PassReport) -> None:
        """This host's snapshot and `report`, to the router (kept apart from `up`'s, which it never overwrites)."""
        self.last_pass = report.to_dict()
        try:
            hosted.push(self.router_url, self.admin_token,
                        hosted.snapshot(self.ledger, self.fleet, "controller", report.to_dict(), list(self.recent)),
                        self.router_cafile)
        except MelangeError as exc:
            self.on_warning(f"could not hand this pass to the router: {exc}")


def _checked_cafile(router_url: str, cafile: str | None) -> str | None:
    """`cafile` when it goes with `router_url`'s scheme (and holds a certificate); ControllerError otherwise."""
    scheme = urllib.parse.urlsplit(router_url).scheme
    if cafile is None and scheme == "https":
        raise ControllerError(f"--router-url {router_url} is https: give --router-cafile, the certificate the router "
                              f"serves (a hosted controller trusts that certificate only)")
    if cafile is not None and scheme != "https":
        raise ControllerError(f"--router-cafile is for a TLS router, and --router-url {router_url} is not https: "
                              f"the admin token would cross in clear text")
    if cafile is not None:
        first_certificate(cafile)  # unreadable, or no certificate in it: one line now, not a warning every pass
    return cafile
