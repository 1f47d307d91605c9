"""tpi_contract.ranks and tpi_contract.termination: the arithmetic and names of several ranks per pod."""

from __future__ import annotations

import pytest
from tpi_contract import exitcodes, ranks, termination


@pytest.mark.parametrize(
    ("tp", "rpp", "pods"),
    [(1, 1, 1), (4, 1, 4), (4, 2, 2), (4, 4, 1), (8, 4, 2), (6, 3, 2), (6, 6, 1)],
)
def test_pods_per_group(tp: int, rpp: int, pods: int) -> None:
    assert ranks.ranks_per_pod_problems(tp, rpp) == []
    assert ranks.pods_per_group(tp, rpp) == pods


@pytest.mark.parametrize(
    ("tp", "rpp", "says"),
    [
        (4, 3, "ranksPerPod=3 does not divide tensorParallelSize=4"),
        (2, 4, "ranksPerPod=4 does not divide tensorParallelSize=2"),
        (4, 0, "ranksPerPod=0 must be >= 1"),
        (0, 1, "tensor-parallel size 0 must be >= 1"),
    ],
)
def test_ranks_per_pod_must_divide_the_group(tp: int, rpp: int, says: str) -> None:
    assert ranks.ranks_per_pod_problems(tp, rpp) == [says] or says in ranks.ranks_per_pod_problems(tp, rpp)[0]
    with pytest.raises(ValueError, match=says.split(" ")[0]):
        ranks.pods_per_group(tp, rpp)


@pytest.mark.parametrize(
    ("tp", "configured", "expected"),
    [
        (8, 8, 8),  # the spec's own size
        (8, 4, 4),
        (4, 8, 4),  # a one-pod group halved: still one pod
        (2, 8, 2),
        (1, 8, 1),
        (4, 4, 4),
        (2, 4, 2),
        (6, 4, 3),  # 12 ranks, 4 per pod, halved to 6: 2 pods of 3 (4 does not divide 6)
        (3, 2, 1),  # 6 ranks, 2 per pod, halved to 3: a prime, one rank per pod
        (4, 1, 1),
    ],
)
def test_ranks_per_pod_at_a_degraded_size(tp: int, configured: int, expected: int) -> None:
    got = ranks.ranks_per_pod_at(tp, configured)
    assert got == expected
    assert tp % got == 0 and got <= configured


@pytest.mark.parametrize(("ordinal", "rpp", "local", "rank"), [(0, 1, 0, 0), (3, 1, 0, 3), (1, 2, 1, 3), (2, 4, 0, 8)])
def test_global_rank_and_back(ordinal: int, rpp: int, local: int, rank: int) -> None:
    assert ranks.global_rank(ordinal, rpp, local) == rank
    assert ranks.placement(rank, rpp) == (ordinal, local)


def test_global_rank_rejects_a_local_rank_outside_the_pod() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        ranks.global_rank(0, 2, 2)
    with pytest.raises(ValueError, match="ordinal"):
        ranks.global_rank(-1, 2, 0)


@pytest.mark.parametrize(
    ("pod", "local", "rpp", "lease"),
    [
        ("c-g0-1", 0, 1, "c-g0-1"),  # one rank per pod: today's name, the pod's
        ("c-g0-1", 0, 2, "c-g0-1-r0"),
        ("c-g2-0", 3, 4, "c-g2-0-r3"),
    ],
)
def test_lease_names(pod: str, local: int, rpp: int, lease: str) -> None:
    assert ranks.lease_name(pod, local, rpp) == lease
    assert ranks.lease_owner(lease, rpp) == (pod, local)


def test_every_lease_of_a_pod_and_no_lease_takes_a_pod_name() -> None:
    names = ranks.lease_names("c-g0-1", 2)
    assert names == ["c-g0-1-r0", "c-g0-1-r1"]
    pods = {f"c-g{g}-{o}" for g in range(3) for o in range(12)}
    assert not pods & {ranks.lease_name(p, lr, 4) for p in pods for lr in range(4)}


@pytest.mark.parametrize("name", ["c-g0-1", "c-g0-1-r2", "c-g0-1-rx", "-r1", "c-g0-1-r01"])
def test_lease_owner_rejects_names_it_did_not_make(name: str) -> None:
    with pytest.raises(ValueError, match="not a local rank's Lease"):
        ranks.lease_owner(name, 2)


# ------------------------------------------------------------------------------ termination
@pytest.mark.parametrize(
    ("end", "line"),
    [
        (
            termination.RankEnd(1, 3, 4),
            "local rank 1 (rank 3) exited 4: out of GPU memory in the middle of a forward pass",
        ),
        (
            termination.RankEnd(1, 3, 137, oom_killed=True, detail="oom_kill 0 -> 1"),
            "local rank 1 (rank 3) exited 137: OOMKilled: the kernel's OOM killer struck in this container's "
            "cgroup (oom_kill 0 -> 1)",
        ),
        (termination.RankEnd(0, 2, 137), "local rank 0 (rank 2) exited 137: killed by SIGKILL"),
        (
            termination.RankEnd(0, 2, 143, stopped=True),
            "local rank 0 (rank 2) exited 143 after the launcher stopped it: killed by SIGTERM",
        ),
        (termination.RankEnd(0, 0, 3), "local rank 0 (rank 0) exited 3: a collective failed or timed out"),
    ],
)
def test_termination_lines_read_as_sentences_and_parse_back(end: termination.RankEnd, line: str) -> None:
    assert end.line() == line
    text = termination.message(end, [termination.RankEnd(5, 7, 0, stopped=True)])
    assert text.splitlines()[0] == line
    back = termination.parse(text)
    assert back == termination.RankEnd(end.local_rank, end.rank, end.exit_code, end.oom_killed, end.stopped)


@pytest.mark.parametrize(
    "text", [None, "", "all 2 local ranks exited 0 after SIGTERM", "launcher: bad configuration: x"]
)
def test_termination_without_a_cause_parses_to_none(text: str | None) -> None:
    assert termination.parse(text) is None


def test_termination_message_fits_kubernetes_limit() -> None:
    others = [termination.RankEnd(i, i, 143, stopped=True, detail="é" * 50) for i in range(200)]
    text = termination.message(termination.RankEnd(0, 0, 1), others)
    assert len(text.encode()) <= termination.MAX_BYTES
    assert termination.parse(text) == termination.RankEnd(0, 0, 1)


def test_exit_code_meanings() -> None:
    assert exitcodes.describe(137) == "killed by SIGKILL"
    assert exitcodes.describe(143) == "killed by SIGTERM"
    assert exitcodes.describe(200) == "killed by signal 72"
    assert exitcodes.KERNEL_OOM_KILLED == exitcodes.SIGNAL_BASE + 9
