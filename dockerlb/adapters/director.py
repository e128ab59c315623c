"""The director adapter: what makes a namespace able to serve VIPs.

- a dummy interface (``dockerlb0``) carrying each VIP as /32 or /128, so the
  kernel accepts packets for it; the VIPs on it are also the ownership mark:
  only IPVS services on these VIPs are the controller's;
- sysctls: ``ip_forward`` (NAT replies are forwarded), and with masquerade
  ``net.ipv4.vs.conntrack`` so netfilter NAT sees IPVS connections; and
  IPVS's own (``IPVS_SYSCTLS``: what happens to connections of a server
  that is gone or at weight 0);
- masquerade: an nftables table ``inet dockerlb`` that SNATs connections whose
  original destination is a VIP, so real servers answer through the director
  even when the client sits on their own network;
- in a director pair, an nftables table ``inet dockerlb_sync`` of its own
  (``inet dockerlb`` goes when no service needs SNAT) that drops sync
  packets on the sync interface from anyone but the pair's peers.

Sysctls and nft are per-namespace and are reached by entering the namespace
(``netns.entered``; a netns socket is not enough for /proc/sys).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import ip_network

from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from dockerlb.adapters import sysctl
from dockerlb.adapters.address_dump import AddressReader, InterfaceAddress
from dockerlb.adapters.ipvs_wire import PROTO_NUMBERS
from dockerlb.adapters.netlink_wire import DumpFailed
from dockerlb.adapters.netns import open_in
from dockerlb.adapters.nft_wire import Refused, SetElements, continued
from dockerlb.core.desired import vip_ranges
from dockerlb.core.model import IPAddress, Proto, ServiceKey, parse_ip
from dockerlb.core.sync import SYNC_PORT
from dockerlb.errors import ConfigError, DirectorError, NetnsError
from dockerlb.settings import Settings

NFT_TABLE = "dockerlb"
SYNC_TABLE = "dockerlb_sync"
# Who owns each VIP:port, kept in the kernel so that a restarted controller
# finds it there (core/ownership.py): one set per family of VIP . protocol .
# port, each element's comment its group. A table of its own: the others
# come and go with what they filter.
OWNERS_TABLE = "dockerlb_owners"


# ARP in the director: answer only for addresses of the interface asked on
# (VIPs live on the dummy interface, so they are never answered on the
# network: clients reach them by route) and never announce a VIP as an ARP
# source. A director pair relies on this: only the active one may own a VIP.
ARP_SYSCTLS = {"net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2"}
FORWARDING6 = "net.ipv6.conf.all.forwarding"


def ipvs_sysctls(conn_reuse_mode: int) -> dict[str, str]:
    """IPVS's behaviour for servers that leave or drain (docs/operating.md says why each)."""
    return {
        # A connection whose server was removed is dropped at its next packet
        # (the client sees a reset and retries) instead of blackholing until
        # its timeout.
        "net.ipv4.vs.expire_nodest_conn": "1",
        # A persistence template pointing at a weight-0 (draining) server
        # expires, so persistent clients move on instead of sticking to it.
        "net.ipv4.vs.expire_quiescent_template": "1",
        "net.ipv4.vs.conn_reuse_mode": str(conn_reuse_mode),
    }


class Director:
    def __init__(self, netns_path: str | None, settings: Settings) -> None:
        self._path = netns_path
        self._settings = settings
        self._ifname = settings.interface
        try:
            self._dip = parse_ip(settings.floating_dip) if settings.floating_dip else None
        except ValueError as e:
            raise DirectorError(f"--floating-dip {settings.floating_dip!r}: not an IP address") from e
        try:
            self._vip_ranges = vip_ranges(settings.vip_cidr)
        except ConfigError:
            self._vip_ranges = ()  # the controller refuses the setting itself
        try:
            self._ipr = open_in(netns_path, IPRoute)
        except (NetlinkError, NetnsError, OSError) as e:
            raise DirectorError(f"cannot open netlink in namespace {netns_path}: {e}") from e
        try:
            self._addrs = AddressReader(netns_path)
        except (NetnsError, OSError) as e:
            self._ipr.close()
            raise DirectorError(f"cannot open netlink in namespace {netns_path}: {e}") from e
        self._masqueraded: frozenset[ServiceKey] | None = None
        try:
            # Set elements changed without running nft (nft_wire.py).
            self._elements: SetElements | None = SetElements(netns_path)
        except (NetnsError, OSError):
            self._elements = None  # nft does it all
        self._owners_recorded: dict[ServiceKey, str] | None = None  # the owners last written
        # The ruleset generation our own writes left, while nothing else has
        # written since (None: not known). A full pass rewrites our tables
        # only when the generation moved (``rules_changed``): two nft runs
        # of 1,000 elements each were most of a no-op resync (issue 31).
        self._nft_gen: int | None = None
        # IPv6 forwarding as it was before an IPv6 VIP turned it on (see restore).
        self._forwarding6_before: str | None = None
        # Written on the interface: which controller (label prefix) owns it.
        self._alias = f"dockerlb prefix={settings.label_prefix}"
        self._claimed: int | None = None  # the interface index _claim_interface accepted
        self._sync_filtered: bool | None = None  # the sync filter's table is there; None: not known

    def close(self) -> None:
        if self._elements is not None:
            self._elements.close()
        self._addrs.close()
        self._ipr.close()

    # -- set-up ------------------------------------------------------------
    def prepare(self) -> None:
        """Idempotent: the interface, the sysctls and the nft table exist."""
        self._ensure_interface()
        self.write_sysctl("net.ipv4.ip_forward", "1")
        if self._settings.masquerade:
            # Exists only once ip_vs is loaded, which opening IPVS did.
            self.write_sysctl("net.ipv4.vs.conntrack", "1")
        for name, value in ARP_SYSCTLS.items():
            # Without them the director answers ARP for its VIPs on every
            # network it is on, and a pair's standby steals the active's
            # traffic: a start-up error with the fix, never a warning.
            self.write_sysctl(
                name,
                value,
                hint=f"start the director with --sysctl {name}={value} "
                f'(compose: sysctls: {{{name}: "{value}"}})',
            )
        for name, value in ipvs_sysctls(self._settings.conn_reuse_mode).items():
            try:
                self.write_sysctl(name, value, missing_ok=True)
            except DirectorError as e:
                # Drains still work without them, less cleanly: say so, go on.
                logger.warning("{}", e)

    def _ensure_interface(self) -> int:
        idx = self._index()
        if idx is None:
            try:
                self._ipr.link("add", ifname=self._ifname, kind="dummy")
            except NetlinkError as e:
                if e.code == errno.EOPNOTSUPP:
                    raise DirectorError(
                        f"cannot create interface {self._ifname}: this kernel has no dummy "
                        "interfaces (CONFIG_DUMMY / modprobe dummy)"
                    ) from e
                if e.code != errno.EEXIST:
                    raise DirectorError(f"cannot create interface {self._ifname}: {e}") from e
            idx = self._index()
            if idx is None:
                raise DirectorError(f"interface {self._ifname} vanished right after creation")
            logger.info("created dummy interface {} for VIPs", self._ifname)
        if idx != self._claimed:  # once per interface, not on every VIP added
            self._claim_interface(idx)
            self._claimed = idx
        self._ipr.link("set", index=idx, state="up")
        return idx

    def _claim_interface(self, idx: int) -> None:
        """The interface must be a dummy, and this controller's (its alias
        names the label prefix): every address on it counts as a VIP we own,
        so lo, eth0 or another controller's interface would be ours to empty."""
        (link,) = self._ipr.get_links(idx)
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "dummy":
            raise DirectorError(
                f"interface {self._ifname} is not a dummy interface (kind: {kind or 'none'}); every "
                "address on --interface counts as a VIP dockerlb owns: pick a name of its own"
            )
        alias = link.get_attr("IFLA_IFALIAS")
        if alias and alias != self._alias:
            raise DirectorError(
                f"interface {self._ifname} belongs to another controller ({alias}); give each "
                "controller in one namespace its own --interface"
            )
        if not alias:
            try:
                self._ipr.link("set", index=idx, ifalias=self._alias)
            except NetlinkError as e:
                raise DirectorError(f"cannot mark interface {self._ifname} as ours: {e}") from e

    def _index(self) -> int | None:
        found = self._ipr.link_lookup(ifname=self._ifname)
        return found[0] if found else None

    # -- VIPs (and ownership) ----------------------------------------------
    def vips(self) -> frozenset[IPAddress]:
        """The VIPs on the interface: exactly the VIPs the controller owns."""
        idx = self._index()
        if idx is None:
            return frozenset()
        # Only what add_vip puts there: host routes, never the link-local
        # address the kernel gives an interface once IPv6 is on.
        return frozenset(
            a.address
            for a in self._all_addresses()
            if a.index == idx and a.prefixlen == a.address.max_prefixlen and not a.address.is_link_local
        )

    def _all_addresses(self) -> list[InterfaceAddress]:
        try:
            return self._addrs.addresses()
        except (DumpFailed, OSError) as e:
            raise DirectorError(f"cannot read the director's addresses: {e}") from e

    def add_vips(self, vips: Sequence[IPAddress]) -> list[DirectorError | None]:
        """Put these VIPs on the interface, many to a netlink send (a cold
        start adds 1,000: one request each, with a link lookup and a link
        set before it, was a second of a start-up in the guest). One result
        per VIP, in order: None when it is there (already there counts)."""
        if not vips:
            return []
        idx = self._ensure_interface()
        refused6 = None
        if any(v.version == 6 for v in vips):
            try:
                self._ipv6_on()
            except DirectorError as e:
                refused6 = e  # the IPv6 VIPs' failure alone
        todo = [v for v in vips if v.version == 4 or refused6 is None]
        try:
            codes = dict(zip(todo, self._addrs.add_hosts(idx, todo), strict=True))
        except OSError as e:
            return [DirectorError(f"cannot add VIP {v} to {self._ifname}: {e}") for v in vips]
        results: list[DirectorError | None] = []
        for v in vips:
            code = codes.get(v, 0)
            if v not in codes:
                results.append(refused6)
            elif code in (0, errno.EEXIST):
                results.append(None)
            else:
                reason = os.strerror(code)
                results.append(DirectorError(f"cannot add VIP {v} to {self._ifname}: {reason}"))
        return results

    def add_vip(self, vip: IPAddress) -> None:
        (error,) = self.add_vips([vip])
        if error is not None:
            raise error

    def _ipv6_on(self) -> None:
        # Docker turns IPv6 off in containers (`all` and `default`; only the
        # interfaces of IPv6 networks get it on), and a new interface
        # inherits `default`: turn it on for this interface alone. In a
        # container that cannot write /proc/sys, only `default` can be set
        # beforehand: the interface does not exist when the container starts.
        self.write_sysctl(
            f"net.ipv6.conf.{self._ifname}.disable_ipv6",
            "0",
            hint="in a container, start it with --sysctl net.ipv6.conf.default.disable_ipv6=0: "
            f"{self._ifname}, made later, takes the default",
        )
        before = self._read_or_none(FORWARDING6)
        if before is not None and before != "1" and self._forwarding6_before is None:
            self._forwarding6_before = before
        self.write_sysctl(FORWARDING6, "1")

    def remove_vip(self, vip: IPAddress) -> None:
        idx = self._index()
        if idx is None:
            return
        try:
            self._ipr.addr("del", index=idx, address=str(vip), prefixlen=vip.max_prefixlen)
        except NetlinkError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise DirectorError(f"cannot remove VIP {vip} from {self._ifname}: {e}") from e
        except (OSError, ValueError) as e:
            raise DirectorError(f"cannot remove VIP {vip} from {self._ifname}: {e}") from e

    def addresses(self) -> dict[IPAddress, str]:
        """The director's own addresses (not its VIPs), its default gateways
        and the pair's floating DIP, for refusing a VIP that equals one:
        address -> what it is.

        In a director pair (a sync interface set) a host-route address on
        another interface is not the director's own when it lies in the
        allowed VIP ranges (--vip-cidr; any, when none are given): keepalived
        puts the pair's VIPs there on the VRRP master, /32 or /128, and they
        come and go with failovers. dockerlb keeps its VIPs on its own
        interface in both directors; keepalived's copy decides which one
        answers ARP (arp_ignore=1). Without that exception the master would
        refuse its own VIPs."""
        found = {a.address: _own(ifname) for a, ifname in self._own_addresses() if not self._floating_copy(a)}
        if self._dip is not None:
            found[self._dip] = "the pair's floating DIP (--floating-dip)"
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                for route in self._ipr.get_default_routes(family=family):
                    gateway = route.get_attr("RTA_GATEWAY")
                    if gateway:
                        found.setdefault(parse_ip(gateway), "the director's default gateway")
        except (NetlinkError, OSError, ValueError) as e:
            raise DirectorError(f"cannot read the director's routes: {e}") from e
        return found

    def _floating_copy(self, a: InterfaceAddress) -> bool:
        """keepalived's copy of a VIP, as addresses() tells it."""
        if not self._settings.pair or a.prefixlen != a.address.max_prefixlen:
            return False
        return not self._vip_ranges or any(a.address in net for net in self._vip_ranges)

    def interface_names(self) -> set[str]:
        """Every interface in the director's namespace, by name."""
        return set(self._names().values())

    def local_addresses(self) -> dict[IPAddress, str]:
        """The addresses on the director's own interfaces (not its VIPs)."""
        return {a.address: _own(ifname) for a, ifname in self._own_addresses()}

    def interfaces(self) -> dict[IPAddress, str]:
        """The addresses on the director's own interfaces -> each one's name."""
        return {a.address: ifname for a, ifname in self._own_addresses()}

    def _names(self) -> dict[int, str]:
        """Interface index -> name."""
        try:
            return {link["index"]: link.get_attr("IFLA_IFNAME") for link in self._ipr.get_links()}
        except (NetlinkError, OSError, ValueError) as e:
            raise DirectorError(f"cannot read the director's interfaces: {e}") from e

    def _own_addresses(self) -> list[tuple[InterfaceAddress, str]]:
        """Each address on an interface other than the VIPs', with that
        interface's name; no loopback, no link-local."""
        names = self._names()
        return [
            (a, ifname)
            for a in self._all_addresses()
            if (ifname := names.get(a.index, "?")) != self._ifname
            and not a.address.is_loopback
            and not a.address.is_link_local
        ]

    def _dip_interfaces(self) -> list[str]:
        """The interfaces whose own subnets hold the floating DIP: the
        servers reached through them can answer it."""
        if self._dip is None:
            return []
        return sorted(
            {
                ifname
                for a, ifname in self._own_addresses()
                if a.address.version == self._dip.version
                and a.prefixlen < a.address.max_prefixlen
                and self._dip in ip_network(f"{a.address}/{a.prefixlen}", strict=False)
            }
        )

    def _reaches_on_dip_link(self, route, addr: IPAddress) -> bool:
        """The route to ``addr`` is on-link (no gateway) through an interface
        whose subnet holds the DIP."""
        assert self._dip is not None
        if self._dip.version != addr.version or route.get_attr("RTA_GATEWAY"):
            return False
        return self._names().get(route.get_attr("RTA_OIF")) in self._dip_interfaces()

    def address_towards(self, addr: IPAddress) -> IPAddress | None:
        """Where real server ``addr``'s default route must point for routed
        NAT: the pair's floating DIP when the server is on-link through an
        interface whose subnet holds it (it moves with the VIPs), else the
        director's own address on the way to it."""
        try:
            routes = self._ipr.route("get", dst=str(addr))
        except NetlinkError as e:
            raise DirectorError(f"the director has no route to real server {addr}: {e}") from e
        for msg in routes:
            if self._dip is not None and self._reaches_on_dip_link(msg, addr):
                return self._dip
            src = msg.get_attr("RTA_PREFSRC")
            if src:
                return parse_ip(src)
        return None

    # -- masquerade ----------------------------------------------------------
    def sync_masquerade(self, keys: Iterable[ServiceKey], force: bool = False) -> None:
        """Make the SNAT rules cover exactly these services (the VIP:ports
        whose NAT servers see the director's address, not the client's), by
        protocol and family: one set of VIP . port each, one atomic nft
        transaction. Per VIP:port, not per VIP: another group's service on
        the same VIP never changes this one's return path.

        Established connections keep their NAT binding in conntrack, so
        rewriting the sets never breaks them. Skipped when nothing changed,
        unless ``force`` (full resyncs: repairs a rule changed by hand). A
        change to sets this made, not forced, is a batch of set elements
        (nft_wire.py: an event's new NAT service costs no nft process); if
        the kernel refuses it (someone changed the table), nft makes all.
        """
        wanted = frozenset(keys)  # the same object when handed a frozenset
        old = self._masqueraded
        if not force and (wanted is old or wanted == old):
            return
        if not force and old and wanted and self._elements is not None:
            before = self._generation()
            try:
                self._elements.change(NFT_TABLE, _by_set(wanted - old), _by_set(old - wanted))
            except (Refused, OSError) as e:
                self._nft_gen = None
                logger.debug("changing the SNAT sets' elements failed ({}): nft makes the table again", e)
            else:
                self._nft_gen = continued(self._nft_gen, before, self._generation())
                self._masqueraded = wanted
                return
        if not wanted:
            # Nothing to SNAT (every service keeps its clients' addresses, or
            # none exists): no rule at all, and no need for nft to be installed.
            with contextlib.suppress(DirectorError):
                self._nft(f"delete table inet {NFT_TABLE}\n", check=False)
            self._masqueraded = wanted
            return
        # netfilter NAT sees IPVS connections only with this on; it exists once
        # ip_vs is loaded (without IPVS there is nothing of it to NAT).
        self.write_sysctl("net.ipv4.vs.conntrack", "1", missing_ok=True)
        t = f"inet {NFT_TABLE}"
        sets = [(proto, version) for proto in Proto for version in (4, 6)]
        script = (
            f"table {t} {{\n"
            + "".join(f"  set {proto}{v} {{ type ipv{v}_addr . inet_service; }}\n" for proto, v in sets)
            # The sets before issue 29 (per VIP): declared so that deleting them cannot fail.
            + "  set vips4 { type ipv4_addr; }\n  set vips6 { type ipv6_addr; }\n"
            + "  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }\n"
            "}\n"
            f"flush chain {t} postrouting\n"
            f"delete set {t} vips4\ndelete set {t} vips6\n"
            + "".join(f"flush set {t} {proto}{v}\n" for proto, v in sets)
            + "".join(self._snat(t, proto, v) for proto, v in sets)
        )
        for proto, v in sets:
            members = sorted(
                (k for k in wanted if k.proto is proto and k.vip.version == v), key=ServiceKey.sort_key
            )
            if members:
                elements = ", ".join(f"{k.vip} . {k.port}" for k in members)
                script += f"add element {t} {proto}{v} {{ {elements} }}\n"
        self._nft(script)
        self._masqueraded = wanted

    def _snat(self, table: str, proto: Proto, version: int) -> str:
        """The rules for one protocol and family: to the pair's floating DIP
        through the interfaces whose subnets hold it (a connection keeps its
        source address across a failover), else to whichever address the
        director has towards the server. ``meta l4proto`` first: it gives
        the original destination port its type."""
        family = "ip" if version == 4 else "ip6"
        match = (
            f"add rule {table} postrouting meta l4proto {proto} "
            f"ct original {family} daddr . ct original proto-dst @{proto}{version}"
        )
        rules = ""
        if self._dip is not None and self._dip.version == version:
            for ifname in self._dip_interfaces():
                rules += f'{match} oifname "{ifname}" snat {family} to {self._dip}\n'
        return rules + f"{match} masquerade\n"

    # -- the sync channel -----------------------------------------------------
    def sync_filter(self, interface: str, peers: Iterable[IPAddress] | None) -> None:
        """Drop sync packets on ``interface`` unless they come from one of
        ``peers``: one atomic nft transaction that declares, flushes and
        fills the table, so every call repairs it (full passes make one) and
        no packet ever meets a half-written rule. No interface or no peers
        (None): the table goes, once per director (nft may be missing then)."""
        if not interface or peers is None:
            if self._sync_filtered is not False:
                with contextlib.suppress(DirectorError):
                    self._nft(f"delete table inet {SYNC_TABLE}\n", check=False)
                self._sync_filtered = False
            return
        try:
            self._nft(sync_filter_script(interface, peers))
        except DirectorError as e:
            raise DirectorError(f"the sync filter on {interface}: {e}") from e
        self._sync_filtered = True

    # -- the owners' record -----------------------------------------------------
    def record_owners(self, owners: Mapping[ServiceKey, str], force: bool = False) -> None:
        """Write who owns each VIP:port into the kernel (one atomic nft
        transaction), unless it is what was last written (``force``: full
        passes, which repair a record changed by hand)."""
        wanted = dict(owners)
        if wanted == self._owners_recorded and not force:
            return
        self._nft(owners_script(wanted))
        self._owners_recorded = wanted

    def recorded_owners(self) -> dict[ServiceKey, str]:
        """Who owns each VIP:port as the kernel's record says (none: {})."""
        done = self._nft("", argv=["-j", "list", "table", "inet", OWNERS_TABLE], check=False)
        if done.returncode != 0:
            return {}  # no record yet
        try:
            return owners_of(json.loads(done.stdout))
        except (ValueError, KeyError, TypeError) as e:
            raise DirectorError(f"the owners' record (table inet {OWNERS_TABLE}) cannot be read: {e}") from e

    def rules_changed(self) -> bool:
        """Whether anything may have changed the namespace's nftables ruleset
        since dockerlb's own last write (True when it cannot tell). When
        it did, the generation now is where the full pass that asked, which
        then rewrites every table of dockerlb's, continues from."""
        now = self._generation()
        if now is not None and now == self._nft_gen:
            return False
        self._nft_gen = now
        return True

    def _generation(self) -> int | None:
        if self._elements is None:
            return None
        try:
            return self._elements.generation()
        except (OSError, TimeoutError) as e:
            logger.debug("the ruleset's generation cannot be read ({}): full passes rewrite the tables", e)
            return None

    def check_nft(self) -> None:
        """Raise DirectorError unless nft works in the director namespace (changes nothing)."""
        self._nft("list tables\n")

    def _nft(
        self, script: str, check: bool = True, argv: list[str] | None = None
    ) -> subprocess.CompletedProcess:
        before = self._generation()
        self._nft_gen, known = None, self._nft_gen  # until it is known what the run did
        try:
            with sysctl.entered(self._path):
                done = subprocess.run(
                    ["nft", *(argv or ["-f", "-"])], input=script, capture_output=True, text=True, timeout=30
                )
        except FileNotFoundError as e:
            raise DirectorError(
                "masquerade needs the nft command (package nftables); install it, or label "
                "every NAT service dockerlb.masquerade=false"
            ) from e
        except OSError as e:  # the namespace is gone
            raise DirectorError(str(e)) from e
        except subprocess.TimeoutExpired as e:
            raise DirectorError(f"nft did not finish within {e.timeout:g} s") from e
        if check and done.returncode != 0:
            raise DirectorError(f"nft refused: {done.stderr.strip()}")
        # A refusal that was allowed (``check=False``: a table deleted that
        # was not there) committed nothing: what it wanted holds.
        self._nft_gen = continued(known, before, self._generation())
        return done

    # -- sysctls -------------------------------------------------------------
    def write_sysctl(self, name: str, value: str, missing_ok: bool = False, hint: str = "") -> None:
        """Set a sysctl unless it already has the value (see ``sysctl.write``);
        ``hint`` replaces the fix a refusal names."""
        try:
            sysctl.write(self._path, name, value)
        except FileNotFoundError:
            if not missing_ok:
                raise DirectorError(f"{name} does not exist in the director namespace") from None
        except OSError as e:
            fix = hint or f"in a container, set it with --sysctl {name}={value}"
            raise DirectorError(f"cannot set {name}={value} in the director namespace: {e} ({fix})") from e

    def read_sysctl(self, name: str) -> str:
        return sysctl.read(self._path, name)

    def _read_or_none(self, name: str) -> str | None:
        try:
            return self.read_sysctl(name)
        except OSError:
            return None

    def restore_forwarding(self) -> None:
        """Put IPv6 forwarding back as it was before an IPv6 VIP turned it on.
        Only for a director that is the host's own namespace (on stop): there,
        forwarding on makes the host ignore router advertisements. A director
        namespace of its own keeps forwarding, so IPv6 VIPs keep working
        across a controller restart."""
        if self._forwarding6_before is None:
            return
        self.write_sysctl(FORWARDING6, self._forwarding6_before)
        logger.info("restored {}={}", FORWARDING6, self._forwarding6_before)
        self._forwarding6_before = None


def owners_script(owners: Mapping[ServiceKey, str]) -> str:
    """The nft script that makes the owners' record say exactly ``owners``."""
    t = f"inet {OWNERS_TABLE}"
    script = (
        f"table {t} {{\n"
        "  set owners4 { type ipv4_addr . inet_proto . inet_service; }\n"
        "  set owners6 { type ipv6_addr . inet_proto . inet_service; }\n"
        "}\n"
        f"flush set {t} owners4\nflush set {t} owners6\n"
    )
    for version in (4, 6):
        keys = sorted((k for k in owners if k.vip.version == version), key=ServiceKey.sort_key)
        if keys:
            # Group names are letters, digits, _ . - (labels.py, ownership.py): no quoting needed.
            elements = ", ".join(f'{k.vip} . {k.proto} . {k.port} comment "{owners[k]}"' for k in keys)
            script += f"add element {t} owners{version} {{ {elements} }}\n"
    return script


# nft names a protocol from /etc/protocols, and where that file is missing
# gives its number: dockerlb's own image has none (debootstrap's minbase has
# no netbase), so the record reads 6 where a full system reads "tcp".
_PROTO_BY_NUMBER = {number: proto for proto, number in PROTO_NUMBERS.items()}


def owners_of(listing: dict) -> dict[ServiceKey, str]:
    """The record, from `nft -j list table inet dockerlb_owners`."""
    found = {}
    for item in listing["nftables"]:
        for elem in (item.get("set") or {}).get("elem", []):
            value = elem.get("elem", {"val": elem})  # an element with a comment comes wrapped
            vip, proto, port = value["val"]["concat"]
            named = _PROTO_BY_NUMBER[proto] if isinstance(proto, int) else Proto(proto)
            key = ServiceKey(named, parse_ip(vip), int(port))
            found[key] = str(value.get("comment", ""))
    return found


def sync_filter_script(interface: str, peers: Iterable[IPAddress]) -> str:
    """The nft script of the sync filter: UDP to the sync port on
    ``interface`` is dropped unless its source is a peer (a packet that
    spoofs a peer's address on that network still passes: docs/trust.md).
    Its own table, so that deleting ``inet dockerlb`` (no SNAT wanted)
    never takes it; the input hook, so it runs before the kernel's
    backup daemon reads the packet. Declare, flush, fill: one transaction."""
    t = f"inet {SYNC_TABLE}"
    script = (
        f"table {t} {{\n"
        "  set peers4 { type ipv4_addr; }\n"
        "  set peers6 { type ipv6_addr; }\n"
        "  chain input { type filter hook input priority filter; policy accept; }\n"
        "}\n"
        f"flush chain {t} input\n"
        f"flush set {t} peers4\n"
        f"flush set {t} peers6\n"
    )
    given = set(peers)
    for version in (4, 6):
        found = [str(p) for p in sorted(p for p in given if p.version == version)]
        if found:
            script += f"add element {t} peers{version} {{ {', '.join(found)} }}\n"
    match = f'add rule {t} input iifname "{interface}" udp dport {SYNC_PORT}'
    return (
        script
        + f"{match} ip saddr @peers4 accept\n"
        + f"{match} ip6 saddr @peers6 accept\n"
        + f"{match} drop\n"
    )


def _own(ifname: str) -> str:
    return f"the director's address on {ifname}"


def _by_set(keys: frozenset[ServiceKey]) -> dict[str, list[ServiceKey]]:
    """Services by the SNAT set that holds them (``tcp4``, ``udp6``, ...)."""
    found: dict[str, list[ServiceKey]] = {}
    for k in sorted(keys, key=ServiceKey.sort_key):
        found.setdefault(f"{k.proto}{k.vip.version}", []).append(k)
    return found
