"""Functional core: pure functions from (spec, observations) to desired objects, actions and status.

Nothing here talks to the API server; ``tpi_operator.handlers`` is the imperative shell.
"""
