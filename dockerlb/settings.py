"""The one settings object. The CLI fills it from options / DOCKERLB_* env vars."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    # Director network namespace: "" = the controller's own (sidecar), an
    # `ip netns` name, a path such as /proc/PID/ns/net, or container:NAME.
    netns: str = ""
    label_prefix: str = "dockerlb."
    # Dummy interface in the director that carries the VIPs; it also marks
    # ownership: only services on VIPs found here are the controller's.
    interface: str = "dockerlb0"
    # SNAT IPVS-forwarded traffic to the director's address, so NAT works for
    # clients on the real servers' own network (real servers then see the
    # director's address, not the client's).
    masquerade: bool = True
    # A draining server (stopping, unhealthy, its check down) keeps weight 0
    # at most this long before it is removed, drained or not.
    drain_timeout: float = 30.0
    # VIPs must be inside one of these ranges (CIDR); empty: the private
    # ranges (RFC 1918, 100.64.0.0/10, fc00::/7), outside Docker's networks
    # (see docs/trust.md).
    vip_cidr: tuple[str, ...] = ()
    # A VIP:port belongs to one group (compose project, Swarm stack, or
    # dockerlb.owner); on: containers of any group may join any VIP:port.
    share_vips: bool = False
    # CIDR=GROUP: VIPs in the range belong to that group alone, shared or
    # not (labels prevent accidents; this prevents malice).
    vip_owner: tuple[str, ...] = ()
    # Seconds a VIP:port stays its group's after the group's last container
    # that claims it is removed (a redeploy takes them all away at once).
    owner_grace: float = 300.0
    # The director may be the Docker host's own namespace (it holds a Docker
    # network's gateway): VIPs and sysctls then change the host itself.
    allow_host_netns: bool = False
    # What one container may ask for; past it, the container is skipped.
    max_labels: int = 256  # labels under the prefix
    max_label_chars: int = 1024
    max_groups: int = 16
    max_vips: int = 16
    # Health-check probes in flight at once (each holds a socket; at most 4
    # of one container's): more wait for a slot, never counted as failures.
    max_probes: int = 256
    # IPVS connection timeouts (ipvsadm --set), seconds; 0 leaves the kernel's
    # (900, 120, 300). They are per namespace: every service there shares them.
    tcp_timeout: int = 0
    tcpfin_timeout: int = 0
    udp_timeout: int = 0
    # net.ipv4.vs.conn_reuse_mode: 1 reschedules a new connection that reuses
    # the port of an old one, so it cannot land on a draining server (see docs/operating.md).
    conn_reuse_mode: int = 1
    # A director pair (docs/ha.md): the interface the kernel's
    # connection-sync daemons use (master and backup both run); "" = none.
    sync_interface: str = ""
    # Or the Docker network the sync interface is on (container interface
    # names are not stable): the director's interface with an address in its
    # subnet, found again on every full pass. "" = none; not with sync_interface.
    sync_network: str = ""
    sync_id: int = 0  # the pair's sync id (0-255), the same in both directors
    # The only addresses the director takes sync packets from (an nft rule on
    # the sync interface: the protocol is unauthenticated). None given: with
    # sync_network, the other containers on that network; else anyone.
    sync_peer: tuple[str, ...] = ()
    # The pair's floating inside address (keepalived moves it with the VIPs):
    # NAT traffic is SNATed to it instead of masqueraded to the director's
    # own address, and routed-NAT servers route via it, so NAT connections
    # survive a failover. "" = none.
    floating_dip: str = ""
    # Real servers are the running tasks of labelled Swarm services (their
    # service's labels), read from a manager, instead of local containers.
    swarm: bool = False
    # Swarm sends no task events (moby #37403): tasks are listed this often,
    # seconds, and each listing compared with the one before. A task being
    # shut down runs on for at least ~2 s (Swarm waits that long before its
    # stop signal): a poll every second sees it and drains it.
    swarm_poll: float = 1.0
    # Announcement (docs/several-hosts.md): each VIP with at
    # least its dockerlb.announce_min serving real servers is a route in a
    # routing table of dockerlb's own in the director's namespace, which a
    # BGP speaker there (a BIRD sidecar) imports and advertises. Off: no
    # route is made or touched.
    announce: bool = False
    announce_table: int = 200  # the routing table (1-252: not main, local or default)
    announce_proto: int = 77  # the routes' `proto`: marks them as dockerlb's (never touches others)
    # The routes' metric: BIRD's config maps it to the BGP MED (or local
    # preference), so two directors with different metrics are active and
    # standby; equal metrics: both active (ECMP at the router).
    announce_metric: int = 0
    # On a graceful stop: withdraw every route, then wait this long (the
    # speaker withdraws, the routers converge) before stopping.
    announce_settle: float = 5.0
    # The speaker's control socket (BIRD's), for status, doctor and the
    # run loop's "speaker down / session lost" line.
    speaker_socket: str = "/run/bird/bird.ctl"
    resync_interval: float = 30.0  # seconds between full reconciles (drift repair)
    # A periodic resync lists Docker's containers every Nth time (1: every
    # time); between, the event stream keeps the controller's view of them,
    # and the resync reads the kernel, the director and Docker's networks.
    # A reconnect to Docker always lists.
    relist_every: int = 10
    debounce: float = 0.02  # seconds to gather a burst of events into one reconcile
    retry_initial: float = 0.1  # first retry delay, seconds; doubles each time
    retry_max: float = 5.0  # longest retry delay, seconds
    retry_attempts: int = 5  # per netlink / Docker call before giving up
    # HOST:PORT serving Prometheus /metrics and /healthz; "" = off (the
    # default; the image sets 127.0.0.1:9469). No authentication: bind to
    # loopback or a trusted network only.
    metrics_listen: str = ""
    # /metrics lists only the services dockerlb owns; True adds the foreign
    # ones in the same namespace (managed="false").
    metrics_all_services: bool = False
    log_level: str = "INFO"
    log_format: str = "human"  # or "json"

    @property
    def pair(self) -> bool:
        """A director pair: the kernel's connection-sync daemons are asked for."""
        return bool(self.sync_interface or self.sync_network)
