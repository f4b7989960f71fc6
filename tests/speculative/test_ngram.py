"""The n-gram drafter and the draft length control, alone (no engine)."""

from __future__ import annotations

import pytest

from erllama.speculative import DraftControl, NGramDrafter
from erllama.speculative.control import MAX_PAUSE, best_length
from erllama.speculative.cost import PassCost


def test_a_copy_is_drafted_from_the_prompt() -> None:
    passage = list(range(100, 140))
    prompt = [1, 2, *passage, 3, 4]
    drafter = NGramDrafter(ngram_min=2, ngram_max=4)
    # The reply has begun to copy the passage: its first three tokens are out.
    context = [*prompt, *passage[:2]]
    assert drafter.draft(context, passage[2], 8) == passage[3:11]


def test_the_latest_occurrence_wins_and_the_longest_run_first() -> None:
    drafter = NGramDrafter(ngram_min=1, ngram_max=3)
    # (5, 6) is followed by 7 first and by 9 later; (4, 5, 6) only by 7.
    context = [4, 5, 6, 7, 0, 5, 6, 9, 0, 4, 5]
    assert drafter.draft(context, 6, 1) == [7]
    drafter = NGramDrafter(ngram_min=1, ngram_max=2)
    assert drafter.draft(context, 6, 1) == [9]


def test_nothing_matched_is_an_empty_draft() -> None:
    drafter = NGramDrafter(ngram_min=2, ngram_max=3)
    assert drafter.draft([1, 2, 3, 4], 9, 5) == []
    assert drafter.draft([1, 2, 3, 4], 2, 0) == []
    assert drafter.draft([], 1, 4) == []


def test_a_draft_may_run_into_the_sampled_token() -> None:
    drafter = NGramDrafter(ngram_min=1, ngram_max=1)
    # The run (1,) occurred at position 0 (position 2's continuation is not known yet),
    # followed by 2, 1 (the end of context) and then the sampled token itself.
    assert drafter.draft([1, 2, 1], 1, 5) == [2, 1, 1]
    assert NGramDrafter(ngram_min=1, ngram_max=1).draft([7, 1, 2, 3], 1, 5) == [2, 3, 1]


def test_the_index_grows_with_the_sequence_and_restarts_on_a_new_one() -> None:
    drafter = NGramDrafter(ngram_min=2, ngram_max=2)
    context = [10, 11, 12, 13]
    assert drafter.draft(context, 14, 3) == []
    context += [14, 10]
    assert drafter.draft(context, 11, 3) == [12, 13, 14]
    # A shorter context is another sequence: nothing of the first is proposed.
    assert drafter.draft([10, 99], 11, 3) == []


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="ngram_min <= ngram_max"):
        NGramDrafter(ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="ngram_min <= ngram_max"):
        NGramDrafter(ngram_min=0, ngram_max=2)


class _Fixed:
    def draft(self, context: object, last: int, n: int) -> list[int]:
        return [last] * n


def cost(slope: float) -> PassCost:
    pc = PassCost()
    pc.slope, pc.measured = slope, True
    return pc


def test_the_best_length_trades_tokens_brought_for_the_pass_cost() -> None:
    # Nothing accepted: one token is all a draft brings, never worth a bigger pass.
    assert best_length(0.0, 0.3, 16)[1] < 1.0
    # Always accepted and free: the longest draft.
    assert best_length(1.0, 0.0, 16) == (16, 17.0)
    # Always accepted at the CPU's cost: longer is better, with diminishing returns.
    k, gain = best_length(1.0, 0.3, 16)
    assert k == 16 and gain == pytest.approx(17 / 5.8)
    # Often accepted: a middle length.
    k, _ = best_length(0.9, 0.3, 16)
    assert 3 <= k <= 8
    # Rarely accepted: one token, or nothing worth it.
    assert best_length(0.3, 0.3, 16)[0] == 1


def test_drafts_grow_with_acceptance() -> None:
    control = DraftControl(_Fixed(), limit=16, cost=cost(0.3))
    first = control.size()
    for _ in range(10):
        n = control.size()
        control.update(n, n)
    assert control.size() > first
    assert control.p > 0.9
    assert control.accepted == control.drafted > 0


def test_failing_drafts_pause_drafting_longer_each_time() -> None:
    control = DraftControl(_Fixed(), limit=8, cost=cost(0.3))
    pauses = []
    for _ in range(10):
        n = control.size()
        while n > 0:  # drafts keep failing until none is worth it
            control.update(n, 0)
            n = control.size()
        paused = 1
        while (n := control.size()) == 0:
            paused += 1
        pauses.append(paused)
        assert n == 1  # a probe of one token
        control.update(1, 0)
    # Steps without a draft: the one that found no length worth it, then the pause.
    assert [n - 1 for n in pauses[:5]] == [1, 2, 4, 8, 16]
    assert max(pauses) == MAX_PAUSE + 1
    # An accepted probe ends the backoff.
    for _ in range(MAX_PAUSE + 1):
        if control.size():
            break
    control.update(1, 1)
    assert control._next_pause == 1


def test_an_empty_draft_changes_nothing() -> None:
    control = DraftControl(_Fixed(), limit=8)
    before = control.p
    control.update(0, 0)
    assert (control.p, control.drafted, control.accepted) == (before, 0, 0)


def test_the_pass_cost_is_learnt_from_plain_and_drafting_steps() -> None:
    pc = PassCost()
    assert not pc.measured
    pc.observe(1, 3, 0.03)  # no plain step to compare with yet: ignored
    assert not pc.measured
    for _ in range(5):
        pc.observe(1, 0, 0.010)
    pc.observe(1, 4, 0.014)  # four tokens added 40%: 0.1 each
    assert pc.measured and pc.slope == pytest.approx(0.1)
    pc.observe(2, 4, 1.0)  # no plain two-row step yet: ignored
    assert pc.slope == pytest.approx(0.1)


def test_propose_reads_the_context_when_called() -> None:
    seen: list[list[int]] = []

    class Spy:
        def draft(self, context: list[int], last: int, n: int) -> list[int]:
            seen.append([*context, last])
            return [last + 1] * n

    context = [1, 2]
    control = DraftControl(Spy(), limit=4, context=lambda: context)
    draft = control.propose(3, greedy=True)
    context.append(3)
    assert draft(4) == [5, 5, 5]
    assert seen == [[1, 2, 3, 4]]


def test_a_given_token_cost_is_not_learnt() -> None:
    pc = PassCost(fixed=0.05)
    assert pc.measured and pc.slope == 0.05
    for _ in range(5):
        pc.observe(1, 0, 0.010)
    pc.observe(1, 4, 0.030)
    assert pc.slope == 0.05
