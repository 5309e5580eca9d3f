"""Suite-wide hygiene: tests that run deploy.py in-process must not leak logging handlers, environment variables
or signal handlers into later tests."""

import logging

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
