"""Fetching ``http(s)`` images, only when the user allows it (``--allow-remote-images``).

LLaVA's CLI and ``run_llava`` accepted image URLs; a service that fetches whatever URL it is given can be turned
against its own network (server-side request forgery). So fetching is off unless asked for, and then:

* only ``http`` and ``https``, at most :data:`MAX_REDIRECTS` redirects, each hop checked again;
* every address the host resolves to must be a public (global) address: loopback, private, link-local (cloud
  metadata at 169.254.169.254), multicast, reserved and unspecified addresses are refused, unless they fall in
  an explicit allow-list of networks (``--remote-image-allow-network 127.0.0.1/32``; documented for local test
  servers and intranets, never on by default). The connection goes to the address that was checked (the URL's
  host is kept for ``Host`` and TLS), so a second DNS answer cannot swap in another address;
* the body may not exceed ``max_bytes`` (checked against ``Content-Length`` and while reading) and the whole fetch,
  redirects included, must finish within ``timeout`` seconds.

Every refusal raises :class:`RemoteImageError` (a :class:`palo.mm_utils.ImageLoadError`) saying why.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit, urlunsplit

from palo.constants import REMOTE_URL_SCHEMES
from palo.image_io import ImageLoadError

MAX_REDIRECTS = 3
DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # far above any photo CLIP needs (it sees 336x336)
DEFAULT_TIMEOUT_S = 10.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network



class RemoteImageError(ImageLoadError):
    """A remote image was not fetched: not allowed, refused address, too large, too slow, or an HTTP error."""


@dataclass(frozen=True)
class RemoteImagePolicy:
    """What fetching a remote image may do.

    Attributes:
        max_bytes: Largest body accepted.
        timeout: Seconds for the whole fetch, redirects included.
        allow_networks: Non-public networks that may be fetched anyway (e.g. ``127.0.0.1/32`` for a test server).
        resolve: ``host -> addresses`` (default: the system resolver).
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT_S
    allow_networks: tuple[Network, ...] = ()
    resolve: Callable[[str], list[str]] | None = field(default=None, compare=False)

    @classmethod
    def from_strings(cls, allow_networks: Sequence[str] = (), **kwargs: object) -> RemoteImagePolicy:
        """A policy with networks given as CIDR strings (``--remote-image-allow-network``).

        Raises:
            ValueError: For a string that is not a network.
        """
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)
        except ValueError as exc:
            raise ValueError(f"not an IP network: {exc}") from exc
        return cls(allow_networks=networks, **kwargs)  # type: ignore[arg-type]


def is_remote(path_or_url: str) -> bool:
    return path_or_url.lower().startswith(REMOTE_URL_SCHEMES)


def _system_resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RemoteImageError(f"cannot resolve {host!r}: {exc}") from exc
    return [info[4][0] for info in infos]


def _checked_address(host: str, policy: RemoteImagePolicy) -> Address:
    """The address to connect to; every address of ``host`` must be public or explicitly allowed."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in (policy.resolve or _system_resolve)(host)]
    if not addresses:
        raise RemoteImageError(f"{host!r} resolves to no address")
    for address in addresses:
        if address.is_global and not address.is_multicast:
            continue
        if any(address in network for network in policy.allow_networks):
            continue
        kind = ("loopback" if address.is_loopback else "link-local" if address.is_link_local
                else "unspecified" if address.is_unspecified else "multicast" if address.is_multicast
                else "private" if address.is_private else "non-public")
        raise RemoteImageError(
            f"refusing to fetch from {host!r}: it resolves to the {kind} address {address} (only public addresses "
            "are fetched; see --remote-image-allow-network)"
        )
    return addresses[0]


def fetch_image_bytes(url: str, policy: RemoteImagePolicy = RemoteImagePolicy()) -> bytes:
    """The body of ``url`` under ``policy`` (see the module doc).

    The fetch runs in a thread of its own, waited for ``policy.timeout`` seconds by the clock: httpx's timeout bounds
    each read, so a server that sends its headers a line a second kept a fetch (and the worker's place for reading
    images) for good. A fetch still running at the deadline has its connection closed, which ends it at its next
    read.

    Raises:
        RemoteImageError: If the fetch is refused or fails.
    """
    deadline = time.monotonic() + policy.timeout
    outcome: list[bytes | BaseException] = []
    clients: list = []  # the fetch's HTTP client, closed here if the fetch overruns
    fetch = threading.Thread(target=_fetch_into, args=(url, policy, deadline, outcome, clients), daemon=True,
                             name="palo-image-fetch")
    fetch.start()
    fetch.join(policy.timeout)
    if fetch.is_alive():
        for client in clients:
            with contextlib.suppress(Exception):  # the fetch's thread is left to end on its own
                client.close()
        raise RemoteImageError(f"{url}: timed out after {policy.timeout:g} s")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _fetch_into(url: str, policy: RemoteImagePolicy, deadline: float, outcome: list, clients: list) -> None:
    try:
        outcome.append(_fetch(url, policy, deadline, clients))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, which raises it
        outcome.append(exc)


def _fetch(url: str, policy: RemoteImagePolicy, deadline: float, clients: list) -> bytes:
    import httpx

    for _hop in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteImageError(f"{url}: only http(s) URLs with a host are fetched")
        try:
            port = parts.port
        except ValueError as exc:  # "Port out of range 0-65535": a malformed URL, not a server error
            raise RemoteImageError(f"{url}: {exc}") from None
        address = _checked_address(parts.hostname, policy)
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = literal + (f":{port}" if port else "")
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = parts.hostname + (f":{port}" if port else "")
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RemoteImageError(f"{url}: timed out after {policy.timeout:g} s")
        try:
            with httpx.Client(timeout=remaining, follow_redirects=False) as client:
                clients[:] = [client]
                with client.stream("GET", pinned, headers={"Host": host_header}, extensions=extensions) as response:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise RemoteImageError(f"{url}: redirect without a Location")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise RemoteImageError(f"{url}: HTTP {response.status_code}")
                    length = response.headers.get("content-length")
                    if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                        raise RemoteImageError(f"{url}: {int(length):,} bytes is over the limit of "
                                               f"{policy.max_bytes:,}")
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body.extend(chunk)
                        if len(body) > policy.max_bytes:
                            raise RemoteImageError(f"{url}: larger than the limit of {policy.max_bytes:,} bytes")
                        if time.monotonic() > deadline:
                            raise RemoteImageError(f"{url}: timed out after {policy.timeout:g} s")
                    return bytes(body)
        except httpx.TimeoutException as exc:
            raise RemoteImageError(f"{url}: timed out after {policy.timeout:g} s") from exc
        except httpx.HTTPError as exc:
            raise RemoteImageError(f"{url}: {type(exc).__name__}: {exc}") from exc
    raise RemoteImageError(f"{url}: more than {MAX_REDIRECTS} redirects")


def add_remote_image_args(parser: object) -> None:
    """The flags of every command that takes ``--image-file`` (argparse parser or group)."""
    parser.add_argument("--allow-remote-images", action="store_true",  # type: ignore[attr-defined]
                        help="fetch http(s) image URLs (public addresses only, size and time limits)")
    parser.add_argument("--remote-image-max-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20,  # type: ignore[attr-defined]
                        help="largest remote image in MiB")
    parser.add_argument("--remote-image-timeout", type=float, default=DEFAULT_TIMEOUT_S,  # type: ignore[attr-defined]
                        help="seconds for fetching one remote image, redirects included")
    parser.add_argument("--remote-image-allow-network", action="append", default=[],  # type: ignore[attr-defined]
                        metavar="CIDR", help="also fetch from this non-public network (repeatable), e.g. a local test "
                        "server at 127.0.0.1/32 or an intranet; by default loopback/private/link-local are refused")


def policy_from_args(args: object) -> RemoteImagePolicy:
    """The policy the flags of :func:`add_remote_image_args` describe."""
    return RemoteImagePolicy.from_strings(
        getattr(args, "remote_image_allow_network", ()) or (),
        max_bytes=int(getattr(args, "remote_image_max_mb", DEFAULT_MAX_BYTES / 2**20) * 2**20),
        timeout=float(getattr(args, "remote_image_timeout", DEFAULT_TIMEOUT_S)),
    )
