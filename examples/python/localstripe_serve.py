"""Serves localstripe, a stateful stand-in for the Stripe API (PyPI:
localstripe), for the get-or-create examples: on 127.0.0.1 only, its store
in memory only.

Usage: python localstripe_serve.py PORT

Then point a Stripe library at http://127.0.0.1:PORT with any secret key
that starts with `sk_` (get_or_create.py and ../node/get-or-create.js take
it as --stripe). `localstripe --port PORT` would do the same, except that it
listens on every interface ([::]) and writes its whole store to
/tmp/localstripe.pickle after every change, for the next start to reload
(unless --from-scratch): a file that every localstripe on the machine shares.
Stop it with Ctrl-C (SIGINT) or SIGTERM.
"""

import sys

from aiohttp import web
from localstripe import resources, server

resources.Store.dump_to_disk = lambda self: None  # memory only: no /tmp/localstripe.pickle

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) == 2 else 8420
    web.run_app(server.app, host="127.0.0.1", port=port, access_log=None)
