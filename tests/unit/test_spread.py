"""One round's load spread over client processes (spread.py): the slots each process gets,
the process counts refused, and a round's kernel stamps, without starting a process."""

from __future__ import annotations

import pytest

from pytest_kvcache.spread import ClientProcesses, split_slots


def test_slots_are_dealt_out_in_turn() -> None:
    assert split_slots(16, 2) == [8, 8]
    assert split_slots(5, 2) == [3, 2]
    assert split_slots(3, 8) == [1, 1, 1]  # never more processes than slots


def test_bad_process_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="1 or more"):
        ClientProcesses("http://127.0.0.1:9", 4, 0)


def test_a_round_says_kernel_stamps_only_when_every_part_had_them() -> None:
    from pytest_kvcache.models import RoundResult

    def part(stamps: str) -> RoundResult:
        return RoundResult(round="measured", records=(), duration=1.0, summary={}, max_loop_lag_ms=0.0,
                           client_stamps=stamps)

    assert RoundResult.stamps_of([part("kernel"), part("kernel")]) == "kernel"
    assert RoundResult.stamps_of([part("kernel"), part("user")]) == "user"
