"""The cost model's arithmetic (pipeline/bench/cost.py)."""

from __future__ import annotations

import pytest

from pipeline.bench import cost


def test_host_capacity_scales_with_cores() -> None:
    assert cost.host_capacity_rtfx(3.0, 16) == pytest.approx(16 * 1000 / 3.0)
    assert cost.host_capacity_rtfx(2.0, 1) == pytest.approx(500.0)


def test_in_process_is_the_stages_one_after_the_other() -> None:
    assert cost.in_process_rtfx(3.0, 2.0) == pytest.approx(200.0)


def test_node_is_limited_by_its_slower_side() -> None:
    # a GPU node: 16 cores carry 16000 / 4 = 4000 x on the host work; one GPU at 0.1 ms/s carries 10000 x
    assert cost.node_rtfx(4.0, 0.1, 16, accelerators=1) == pytest.approx(4000.0)
    # two slow accelerators limit it instead
    assert cost.node_rtfx(1.0, 2.0, 16, accelerators=2) == pytest.approx(1000.0)
    # no accelerator: every stage shares the cores
    assert cost.node_rtfx(3.0, 7.0, 16) == pytest.approx(1600.0)


def test_streams_sustained_is_whole_streams() -> None:
    assert cost.streams_sustained(62.5, 16) == 256
    assert cost.streams_sustained(63.0, 16) == 253


def test_agreement_is_relative_to_the_measurement() -> None:
    assert cost.agreement(130.0, 100.0) == pytest.approx(0.3)
    assert cost.agreement(80.0, 100.0) == pytest.approx(0.2)


@pytest.mark.parametrize("call", [lambda: cost.host_capacity_rtfx(0.0, 16), lambda: cost.host_capacity_rtfx(3.0, 0),
                                  lambda: cost.streams_sustained(-1.0, 16), lambda: cost.agreement(1.0, 0.0),
                                  lambda: cost.node_rtfx(1.0, 0.0, 16, accelerators=1)])
def test_nonsense_is_refused(call) -> None:
    with pytest.raises(ValueError):
        call()
