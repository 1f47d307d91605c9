"""`make demo`, the README's first command, run as a newcomer runs it, on this tier's node.

It runs last in the tier (conftest.pytest_collection_modifyitems): hack/demo.py re-installs the
operator's release watching only the demo namespace, which the other tests' clusters would not
survive. The session's `operator` fixture uninstalls the release afterwards either way.
"""

from __future__ import annotations

import time

from tpikit.kube import nested_make
from tpikit.provider import Provider

from tests.e2e.conftest import record_timing

DEMO_NAMESPACE = "tpi-demo"  # hack/demo.py's


def test_make_demo_answers_a_question_from_smollm2_at_tp3(provider: Provider) -> None:
    t0 = time.monotonic()
    try:
        out = nested_make("demo", timeout=1200)
        record_timing("make demo (node and images already up)", time.monotonic() - t0)
        log = f"stdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-4000:]}"
        assert out.returncode == 0, log
        assert '"answer": ' in out.stdout and "Paris" in out.stdout.split('"answer": ', 1)[1], log
        tpic = provider.kubectl(
            "get", "tpic", "demo", "-n", DEMO_NAMESPACE, "-o",
            "jsonpath={.status.phase} {.status.readyReplicas} {.status.currentTensorParallelSize} {.status.ready}",
        )  # fmt: skip
        assert tpic.split() == ["Running", "1", "3", "3/3"], tpic
    finally:  # give the node back (the demo's 3 ranks hold 6 GiB) and leave no demo behind
        provider.kubectl("delete", "namespace", DEMO_NAMESPACE, "--ignore-not-found", "--wait=false", check=False)
        provider.kubectl("wait", "--for=delete", f"namespace/{DEMO_NAMESPACE}", "--timeout=180s", check=False)
