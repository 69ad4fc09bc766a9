"""Start pproxy (as installed in the virtualenv) on uvloop, as its own ``main`` intends.

pproxy 2.7.9 calls ``uvloop.install()`` and then ``asyncio.get_event_loop()``; with
uvloop >= 0.21 that call raises because no loop has been set.  This shim installs the
uvloop policy, sets a loop, and turns pproxy's own ``install()`` call into a no-op so
that loop is the one pproxy gets.  Arguments are passed to pproxy unchanged.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from pproxy.server import main  # type: ignore[import-untyped]


def _keep_loop() -> None:
    pass


def run() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())
    uvloop.install = _keep_loop
    sys.argv[0] = "pproxy"
    main()


if __name__ == "__main__":
    run()
