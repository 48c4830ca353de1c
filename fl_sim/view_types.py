"""The threat models by name: one :class:`View` per vantage (see :mod:`fl_sim.views`).

A leaf module (no torch, no stores) so the config checks can ask a view what it is without
loading the record machinery; :mod:`fl_sim.views` re-exports it beside the view builders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from fl_sim.capabilities import defenses_with
from fl_sim.errors import ConfigError, FlSimError


@dataclass(frozen=True)
class View:
    """One threat model's vantage (see module doc). Instances: :data:`VIEWS`.

    ``name``: the config string (``[[attacks]] view``), the result's ``view`` and the grid
    files' name part — unchanged on disk. ``party``: who looks (``Run.view(party)`` builds
    the records; ``record.role``). ``tap``: the tap whose records it reads. ``per_client``:
    one client's own update (scored against that client's truth) rather than a mix of several
    clients. ``server_side``: the server holds it after each round (attacks on it run online);
    otherwise it is a peer's, derived from what the peer kept (recorded for
    ``federation.peer_clients`` only; needs round ``r + 1`` and another client, so attacks
    on it run at the end of the run). ``fallback``: the view
    used instead when a configured defense ``hides_per_client_updates``. ``public_config``:
    the public config the view's records may carry (documentation;
    :func:`fl_sim.views.aggregate_training` and the peer view read exactly these).
    ``declarable``: an attack class may declare it as its own ``view`` (the aggregate is
    reached by asking for it, or by the fallback).
    """

    name: str
    party: Literal["server", "peer"]
    tap: str
    per_client: bool
    server_side: bool
    fallback: str | None = None
    public_config: tuple[str, ...] = ()
    declarable: bool = True

    @property
    def holds_sum(self) -> bool:
        """The server's sum of several clients' updates: an attack that needs one client's
        update (``needs_client_update``) cannot run on it."""
        return self.server_side and not self.per_client

    def resolve(self, defenses: Iterable[Any]) -> tuple[View, View | None]:
        """``(view used, view asked for if it fell back)`` under ``defenses`` (config
        entries, names or built defenses): a defense that hides per-client updates sends a
        view with a ``fallback`` there.

        >>> VIEWS["server"].resolve(["secagg_plus"])[0].name
        'aggregate'
        """
        if self.fallback is not None and defenses_with("hides_per_client_updates", defenses):
            return VIEWS[self.fallback], self
        return self, None

    def record(self, run: Any, server_round: int, *, client: int | None,
               grant: Sequence[str] = ()) -> Any:
        """The record this view gives of ``server_round`` in ``run`` (a
        :class:`~fl_sim.run_dir.Run`): ``client``'s update (server; default the lowest
        client that replied), the others' derived update (peer; default the first
        ``federation.peer_clients``), or the round's aggregate."""
        if not self.server_side:  # derived by the peer from its own store
            return run.view(self.party, client=self.default_client(run.config, client),
                            grant=grant).record(server_round)
        server = run.view(self.party, grant=grant)
        if not self.per_client:
            return server.aggregate_of(server_round, run.config)
        if client is None:
            replied = server.clients(server_round)
            if not replied:
                raise FlSimError(f"round {server_round}: the server recorded no client update")
            client = min(replied)
        return server.record(server_round, client)

    def default_client(self, cfg: Any, client: int | None) -> int | None:
        """``client``, or for a peer view the first ``federation.peer_clients``
        (:class:`~fl_sim.errors.ConfigError` if none was recorded)."""
        if client is not None or self.server_side:
            return client
        peers = tuple(cfg.federation.peer_clients)
        if not peers:
            raise ConfigError("this run recorded no peer views (federation.peer_clients is "
                              "empty); a peer attack has nothing to read")
        return int(peers[0])

    def truth_clients(self, run: Any, server_round: int, client: int | None) -> list[int]:
        """Whose private data this view's record of ``server_round`` was computed from
        (analysis only; ``client``: the record's client): that client (server), every
        client but the peer (peer), every aggregated client (aggregate)."""
        if self.per_client:
            return [client]  # type: ignore[list-item]
        if not self.server_side:
            return [c for c in run.clients_in_round(server_round) if c != client]
        return run.view("server").aggregate_clients(server_round)


#: the threat models by their config / on-disk name
VIEWS: Mapping[str, View] = MappingProxyType({v.name: v for v in (
    View("server", party="server", tap="server_in", per_client=True, server_side=True,
         fallback="aggregate",
         public_config=("federation.local_optimizer (rows recorded before they carried one)",)),
    View("peer", party="peer", tap="peer_view", per_client=False, server_side=False,
         public_config=("strategy capabilities", "server_lr (FedSGD)",
                        "federation.local_optimizer (rows recorded before they carried one)")),
    View("aggregate", party="server", tap="aggregate", per_client=False, server_side=True,
         declarable=False,
         public_config=("federation.lr", "federation.local_steps", "federation.batch_size",
                        "federation.local_optimizer", "server_lr (FedSGD)")),
)})
#: the view each tap's records belong to
TAP_VIEWS: Mapping[str, View] = MappingProxyType({v.tap: v for v in VIEWS.values()})


def view_of(name: str | View) -> View:
    """The :class:`View` called ``name``; an unknown name lists the known ones."""
    if isinstance(name, View):
        return name
    try:
        return VIEWS[name]
    except KeyError:
        raise ConfigError(f"unknown view {name!r}; known: {', '.join(VIEWS)}") from None


def check_declarable(owner: str, view: str) -> str:
    """``view`` if an attack may declare it as its own view (``server``, ``peer``), else a
    one-line :class:`~fl_sim.errors.ConfigError` naming ``owner`` (``"mia_gradient.view"``)
    and the allowed names.

    >>> check_declarable("x.view", "peer")
    'peer'
    """
    allowed = [v.name for v in VIEWS.values() if v.declarable]
    if view not in allowed:
        raise ConfigError(f"{owner}: got {view!r}; allowed: {', '.join(allowed)}")
    return view
