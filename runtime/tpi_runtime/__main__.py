"""`python -m tpi_runtime serve|generate|launch ...` (also the `tpi-runtime` console script).

``launch [--ranks-per-pod N] serve|generate ...`` runs N local ranks, one process each, that stop
together (``tpi_runtime.launcher``; docs/contracts.md, "Several ranks per pod").

Every setting is read once, into ``RuntimeSettings`` (``tpi_runtime.settings``): every
configuration flag defaults from `TPI_<FLAG>` (e.g. TPI_MAX_BATCH_SIZE), and process-group settings
come from torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK; without them
this is a group of one. Exit codes: ``tpi_contract.exitcodes``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import NoReturn

from tpi_contract import exitcodes

from .settings import RuntimeSettings, SettingsError, build_parser

__all__ = ["build_parser", "main"]


def _generate(settings: RuntimeSettings) -> int:
    from .engine import Engine, SamplingParams

    engine = Engine.from_settings(settings)
    if engine.rank != 0:
        engine.run_forever(threading.Event())  # follow rank 0 until it broadcasts shutdown
        return 0
    if settings.prompt_ids is not None:
        ids = list(settings.prompt_ids)
    else:
        if engine.tokenizer is None:
            raise SystemExit(f"--prompt needs a tokenizer ({settings.model} has no tokenizer.json); use --prompt-ids")
        ids = engine.tokenizer.encode(settings.prompt).ids
    params = SamplingParams(
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
    )
    req = engine.submit(ids, params)
    stop = threading.Event()
    out: list[int] = []
    err: list[BaseException] = []

    def consume() -> None:
        try:
            out.extend(req)
        except Exception as e:
            err.append(e)
        finally:
            stop.set()

    threading.Thread(target=consume, daemon=True).start()
    engine.run_forever(stop)
    if err:
        print(f"error: {err[0]}", file=sys.stderr)
        return 1
    if engine.tokenizer is not None:
        print(f"text: {engine.tokenizer.decode(out)}")
    print(f"token_ids: {','.join(map(str, out))}")
    print(f"finish_reason: {req.finish_reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "launch":  # several local ranks: a supervisor of runtime processes, no torch
        from .launcher import main as launch

        return launch(args, os.environ)
    try:
        settings = RuntimeSettings.from_args(args, os.environ)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return exitcodes.BAD_CONFIG
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s rank{settings.rank} %(levelname)s %(name)s: %(message)s",
    )
    from .loader import CheckpointError

    try:
        if settings.command == "generate":
            return _generate(settings)
        from .serving.lifecycle import serve_main  # the HTTP layer; imported lazily so `generate` needs none of it

        return int(serve_main(settings) or 0)
    except (ValueError, CheckpointError) as e:  # bad tp, dtype, lengths, checkpoint: config, not a crash
        logging.getLogger("tpi_runtime").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        _exit_now(exitcodes.BAD_CONFIG)


def _exit_now(code: int) -> NoReturn:
    """Flush and end the process without interpreter teardown.

    A config error can come after the process group formed (the KV budget is agreed by all ranks).
    Tearing the interpreter down with the group's C++ threads alive may abort ("terminate called
    without an active exception", SIGABRT), which the operator would read as a crash, not exit 2.
    Nothing needs cleanup: the shared-memory segment is unlinked once every rank mapped it.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
