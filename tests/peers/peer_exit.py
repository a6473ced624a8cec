"""How the gRPC peers here end: a watchdog for hangs, and an exit past the interpreter's shutdown.

Not a client of anything: the peers import it for these two functions only.
"""

import faulthandler
import json
import os


def watchdog(seconds):
    """After `seconds`, every thread's stack on stderr and exit 1, so that a hang names its line
    well before the test's own limit (15 minutes, .config/nextest.toml)."""
    faulthandler.dump_traceback_later(seconds, exit=True)


def finish(result):
    """Prints `result`, the peer's one JSON object, and exits 0 without the interpreter's shutdown:
    grpcio can hang there on a channel that still has a call in flight (grpc/grpc#4969 and its kin),
    which is grpcio's, not what the tests check."""
    print(json.dumps(result, indent=1, sort_keys=True), flush=True)
    os._exit(0)
