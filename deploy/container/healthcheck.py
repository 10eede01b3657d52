#!/usr/bin/env python3
"""peerd-healthcheck: exit 0 when the local node's API answers
``GET /v1/status`` with 200, 1 otherwise (the container's HEALTHCHECK and
the Kubernetes readiness probe).

Environment (the node's own, so the image needs no extra settings):

- ``PEERD_API``: the node's ``--api`` (default 127.0.0.1:7701); a wildcard
  host is asked on loopback.
- ``PEERD_API_TOKEN``, else the first line of ``PEERD_API_TOKEN_FILE``:
  sent as the bearer token.
- ``PEERD_API_TLS_CERT``: when set the node serves https; the check then
  trusts exactly that certificate (it talks to its own node, so the
  certificate's host names are not checked), or the CA bundle in
  ``PEERD_HEALTHCHECK_CA_CERT`` if that is set.
- ``PEERD_HEALTHCHECK_TIMEOUT_S``: default 4.

Stdlib only.
"""
import os
import ssl
import sys
import urllib.error
import urllib.request


def _token() -> str:
    token = os.environ.get("PEERD_API_TOKEN", "").strip()
    path = os.environ.get("PEERD_API_TOKEN_FILE", "")
    if token or not path:
        return token
    with open(path, encoding="utf-8") as f:
        return (f.readline() or "").strip()


def _tls_context(cert: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.environ.get("PEERD_HEALTHCHECK_CA_CERT") or cert)
    ctx.check_hostname = False  # our own node on loopback; the chain is still verified
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the node's certificate itself as the anchor
    return ctx


def main() -> int:
    api = os.environ.get("PEERD_API", "127.0.0.1:7701").strip()
    host, _, port = api.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "[::1]" if host in ("[::]", "::") else "127.0.0.1"
    cert = os.environ.get("PEERD_API_TLS_CERT", "")
    url = f"{'https' if cert else 'http'}://{host}:{port}/v1/status"
    try:
        req = urllib.request.Request(url)
        token = _token()
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        timeout = float(os.environ.get("PEERD_HEALTHCHECK_TIMEOUT_S", "4"))
        ctx = _tls_context(cert) if cert else None
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            ok = resp.status == 200
    except urllib.error.HTTPError as e:
        print(f"peerd-healthcheck: {url}: HTTP {e.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ssl.SSLError) as e:
        print(f"peerd-healthcheck: {url}: {getattr(e, 'reason', None) or e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
