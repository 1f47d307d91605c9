"""The runtime's HTTP side: OpenAI-compatible API on rank 0, probes and metrics on every rank.

Modules, one concern each: ``protocol`` (pydantic request/response models), ``chat_template``
(Jinja chat templates), ``detokenizer`` (incremental text with stop strings), ``generation``
(bridging one engine request into asyncio), ``completions`` and ``chat`` (the endpoints), ``app``
(routes and errors), ``lifecycle`` (ports, signals, drain, exit codes).
"""
