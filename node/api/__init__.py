"""The HTTP API: routes and the HTTP/1.1 server (shells), the read model the
routes answer with, API tokens and roles, and the status page.

Cores (sans-IO; their classes and constants are re-exported here, their
functions stay with their module, e.g. ``node.api.messages.<function>``):
    messages       HTTP messages of the API (core): the request a route receive
    status_page    The status page at ``/`` of every node's HTTP API (routes in
    tokens         API tokens with names and roles (sans-IO: parsing and checki
    views          The read model: the JSON the HTTP API answers with, built fr

Shells (I/O; import them by their full path, e.g. ``node.api.http_shell``):
    http_shell     A small HTTP/1.1 server on trio + h11 (the trio shell for th
    routes_shell   The HTTP API routes (the contract: the :data:`ROUTES` table 
"""
from node.api.messages import (
    HTTPError, Request, Response,
)
from node.api.status_page import (
    ASSETS, SECURITY_HEADERS,
)
from node.api.tokens import (
    ROLES, ApiToken, TokenSet, TokenFileError,
)
from node.api.views import (
    RUN_KEYS, CONFLICT_RULE,
)

__all__ = [
    'HTTPError', 'Request', 'Response', 'ASSETS', 'SECURITY_HEADERS', 'ROLES',
    'ApiToken', 'TokenSet', 'TokenFileError', 'RUN_KEYS', 'CONFLICT_RULE',
]
