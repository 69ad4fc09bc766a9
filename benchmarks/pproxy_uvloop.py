"""Start pproxy (as installed in the virtualenv) on uvloop, as its own ``main`` intends,
or with ``--asyncio`` as the first argument on the standard asyncio event loop.

pproxy 2.7.9 calls ``uvloop.install()`` and then ``asyncio.get_event_loop()``; with
uvloop >= 0.21 that call raises because no loop has been set.  This shim installs the
uvloop policy, sets a loop, and turns pproxy's own ``install()`` call into a no-op so
that loop is the one pproxy gets.

With ``--asyncio`` it makes ``import uvloop`` fail (pproxy then stays on asyncio, as it
does wherever uvloop is not installed, which is how most people run it) and sets a
standard asyncio loop first, so pproxy's ``get_event_loop()`` call does not depend on
the deprecated implicit loop creation.  All other arguments go to pproxy unchanged.
"""

from __future__ import annotations

import asyncio
import sys


def _keep_loop() -> None:
    pass


def run() -> None:
    if sys.argv[1:2] == ["--asyncio"]:
        del sys.argv[1]
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # import uvloop -> ImportError
        asyncio.set_event_loop(asyncio.new_event_loop())
    else:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.set_event_loop(asyncio.new_event_loop())
        uvloop.install = _keep_loop
    from pproxy.server import main  # type: ignore[import-untyped]

    sys.argv[0] = "pproxy"
    main()


if __name__ == "__main__":
    run()
