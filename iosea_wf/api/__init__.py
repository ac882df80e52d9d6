"""The Workflow Manager as a site service: its HTTP/JSON API (app), who calls it (auth), its client.

Nothing here is imported by the CLI unless a Workflow Manager URL is configured (``settings`` is
the cheap exception): in-process commands never pay for FastAPI or httpx.
"""
