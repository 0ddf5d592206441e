"""DNS that follows the app (sans-I/O): messages, the per-app route of a lookup, the per-route cache.

An app's query to the local resolver on loopback is answered through the app's own route
(docs/DNS.md); the asyncio side is ``dns_forwarder.py``, the kernel redirect
``platform/linux/dns_redirect.py``.
"""
