"""pyroute2's netlink classes, without running pyroute2's package ``__init__`` up front.

pyroute2 0.9's ``__init__`` imports every family it has (NDB, IPDB, conntrack, IPVS, nl80211,
plan9, WireGuard …) to offer them at its top level, and importing any of its submodules runs
it first. The agent uses ``IPRoute`` and ``netns``: the rest cost 0.1 s of the agent's start
on a host and 1.2 s on an emulated node, on every boot and every restart (and about 19 MB of
memory: pyroute2's issue 1404).

So ``pyroute2`` is put in ``sys.modules`` as its bare package (its ``__path__``, nothing run),
with a module ``__getattr__`` (PEP 562): a name that is a submodule is imported as usual; any
other (``from pyroute2 import IPRoute``, as pyroute2's own code does at run time) runs the
real ``__init__`` into that same module, once, and answers from it. Nothing is lost, only
deferred. If ``pyroute2`` was imported before this module, it is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType


def _bare_package() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:  # not installed: let the import below say so
        return
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    once = threading.Lock()  # pyroute2's calls come from worker threads too

    def whole(name: str) -> object:
        if name.startswith("__"):  # the import system probes dunders: never a reason to run it
            raise AttributeError(name)
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:
            module: ModuleType = importlib.import_module(f"pyroute2.{name}")
            return module
        with once:  # a name only the __init__ defines: run it, once
            if "__getattr__" in vars(package):
                del package.__getattr__
                loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = whole  # type: ignore[method-assign]
    sys.modules["pyroute2"] = package


_bare_package()

from pyroute2 import netns  # noqa: E402  (after the bare package is in place)
from pyroute2.iproute import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

__all__ = ["IPRoute", "NetlinkError", "netns"]
