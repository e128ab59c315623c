"""The project's own error types.

Adapters translate what the outside world raises (``NetlinkError``, docker's
``APIError``/``NotFound``, ``OSError``) into these at the boundary, so the
controller decides on retry by type: ``Retryable`` may succeed if tried again,
``Permanent`` will not.
"""


class DockerlbError(Exception):
    """Base of every error the project raises on purpose."""


class Retryable(DockerlbError):
    """A transient fault: the same call may succeed later."""


class Permanent(DockerlbError):
    """Trying again will not help; report and move on."""


class ConfigError(Permanent):
    """A setting (CLI option or env var) is unusable."""


class NetnsError(Permanent):
    """A network namespace (the director's, a real server's) cannot be resolved or entered."""


class NetnsStuck(BaseException):
    """A thread entered a network namespace and cannot get back: whatever it
    runs next would act on the wrong namespace. Not a DockerlbError, not even
    an Exception, so that no handler keeping a pass or a thread going catches
    it: the thread ends (the main thread's: the controller)."""


class DirectorMoved(Retryable):
    """The director's namespace is not the one the adapters opened (the
    director container was restarted): reopen everything on the new one."""


class DockerUnavailable(Retryable):
    """The Docker engine did not answer (socket gone, daemon restarting)."""


class DockerRefused(Permanent):
    """The Docker engine answered with a client error (4xx other than 404)."""


class ContainerGone(Permanent):
    """The container no longer exists."""


class IpvsUnavailable(Permanent):
    """This kernel has no IPVS (no ip_vs module, or no permission to load it)."""


class IpvsExists(Permanent):
    """IPVS said EEXIST: the service or real server is already there."""


class IpvsNotFound(Permanent):
    """IPVS said ENOENT/ESRCH: no such service, real server or scheduler."""


class IpvsRejected(Permanent):
    """IPVS said EINVAL or similar: the request itself is not acceptable."""


class IpvsBusy(Retryable):
    """IPVS or the netlink socket was busy (EAGAIN, ENOBUFS, EINTR, EBUSY)."""


class VipInUse(Retryable):
    """A VIP dockerlb no longer needs still carries services in the kernel
    (a removal failed): it stays on the director until they are gone."""


class DirectorError(Permanent):
    """The director namespace could not be set up (interface, sysctl, nftables)."""


class RealServerError(Permanent):
    """A real server's namespace could not be set up (or cleaned) for its forwarding."""


class Unexpected(Permanent):
    """An error an adapter did not translate (a bug): it fails its own
    operation, never a whole pass."""


class AnnounceError(Permanent):
    """dockerlb's routing table of announced VIPs could not be read or written."""
