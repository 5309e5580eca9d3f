"""Suite-wide hygiene: tests that run deploy.py in-process must not leak logging handlers, environment variables
or signal handlers into later tests; and no test reaches the network unless it is marked `network`."""

import errno
import ipaddress
import logging
import socket

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_process_state():
    """In-process deploy runs install signal handlers and set environment variables (torchrun's, stop files);
    later tests' subprocesses would inherit them (an inherited ignored SIGINT makes Ctrl-C do nothing there)."""
    import os
    import signal

    environ = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update(environ)
    for sig, handler in handlers.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------- network
#
# The default suite must pass with the network unplugged after set-up (README, "Tests"). This guard makes that the
# case in every run of pytest: inside the test process, a socket connect to anything but this machine and a name
# lookup of anything but this machine fail the way an unplugged cable does (ENETUNREACH / EAI_NONAME), with a
# message naming this file. Loopback stays open: torchrun's rendezvous, the chat server, chromedriver, wandb's
# local service. Subprocesses are not covered here; `unshare -rn` (README) checks those.
# A test that must reach the network is marked `@pytest.mark.network` (and `slow`, so the default suite has none).

_REAL_CONNECT = socket.socket.connect
_REAL_CONNECT_EX = socket.socket.connect_ex
_REAL_GETADDRINFO = socket.getaddrinfo
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", socket.gethostname()}
_network = {"allowed": False}
_REFUSAL = ("tests/conftest.py: {what} {target!r} refused: tests run with the network unplugged "
            "(mark a test that must reach the network @pytest.mark.network and slow)")


def _is_local_host(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host)
    if host in _LOCAL_NAMES or host.endswith(".localhost") or not host:  # "" binds/looks up this machine
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a name other than this machine's: resolving it needs DNS
    return address.is_loopback or address.is_unspecified


def _is_local_address(address) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths (str/bytes) never leave the machine
    return _is_local_host(address[0])


def _guarded_connect(self, address):
    if not _network["allowed"] and not _is_local_address(address):
        raise OSError(errno.ENETUNREACH, _REFUSAL.format(what="connect to", target=address))
    return _REAL_CONNECT(self, address)


def _guarded_connect_ex(self, address):
    if not _network["allowed"] and not _is_local_address(address):
        raise OSError(errno.ENETUNREACH, _REFUSAL.format(what="connect to", target=address))
    return _REAL_CONNECT_EX(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _network["allowed"] and not _is_local_host(host):
        raise socket.gaierror(socket.EAI_NONAME, _REFUSAL.format(what="name lookup of", target=host))
    return _REAL_GETADDRINFO(host, *args, **kwargs)


def pytest_configure(config):
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.getaddrinfo = _guarded_getaddrinfo


def pytest_unconfigure(config):
    socket.socket.connect = _REAL_CONNECT
    socket.socket.connect_ex = _REAL_CONNECT_EX
    socket.getaddrinfo = _REAL_GETADDRINFO


@pytest.fixture(autouse=True)
def _network_only_for_marked_tests(request):
    _network["allowed"] = request.node.get_closest_marker("network") is not None
    yield
    _network["allowed"] = False


@pytest.fixture(scope="session", autouse=True)
def _temporary_cache(tmp_path_factory):
    """The suite's cache ($INTEGRATION_TRAINING_CACHE) is a temporary directory, so prepared data (and anything
    else runs cache) never lands in the user's ~/.cache/integration_training. The user's provisioned offline model
    and downloaded wheels (scripts/setup.sh) are linked in, not copied or converted again."""
    import os

    from integration_training import models

    user_cache = models.cache_root()
    cache = tmp_path_factory.mktemp("cache")
    for name in ("models", "wheels"):
        if (user_cache / name).is_dir():
            (cache / name).symlink_to(user_cache / name, target_is_directory=True)
    before = os.environ.get(models.CACHE_ENV)
    os.environ[models.CACHE_ENV] = str(cache)
    yield cache
    if before is None:
        os.environ.pop(models.CACHE_ENV, None)
    else:
        os.environ[models.CACHE_ENV] = before
