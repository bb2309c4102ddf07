"""Names vulture reports as unused that are used, by the standard library or by aiohttp.

``vulture clipia_proxy .ci/vulture_whitelist.py`` then lists only real leftovers. CI runs
``vulture clipia_proxy bench --min-confidence 61`` (unused imports, variables, unreachable
code); the 60 %-confidence findings (attributes and methods another library may use) are
reviewed by hand against this file.
"""

import logging

from clipia_proxy.connections import GatewayProtocol

# logging reads these switches on every record (the logging HOWTO, "Optimization").
logging.logThreads  # noqa: B018
logging.logProcesses  # noqa: B018
logging.logMultiprocessing  # noqa: B018
logging.Logger.disabled  # noqa: B018 - logs.apply_logging turns the access logger off

# aiohttp calls a request handler's handle_error for a request that raised.
GatewayProtocol.handle_error  # noqa: B018
