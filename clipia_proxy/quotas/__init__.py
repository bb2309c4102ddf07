"""Quotas: budgets in credits per calendar period, request/token rate limits and concurrency.

Pure value types and decisions live in ``model``, ``periods`` and ``estimate``; the ``Store``
protocol and its backends (``memory``, ``sqlite``, ``redis``) keep the state; ``service``
is what the handlers call (admit, settle, headers).
"""
