"""The n-gram drafter and the draft length control, alone (no engine)."""

from __future__ import annotations

import pytest

from erllama.speculative import DraftControl, NGramDrafter
from erllama.speculative.control import MAX_PAUSE


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


def test_the_length_doubles_when_drafts_are_accepted_whole() -> None:
    control = DraftControl(_Fixed(), limit=16, length=2)
    control.update(2, 2)
    assert control.size() == 4
    control.update(4, 4)
    control.update(8, 8)
    control.update(16, 16)
    assert control.size() == 16  # never past the limit
    control.update(16, 3)
    assert control.size() == 4  # just past what was accepted
    assert (control.drafted, control.accepted) == (46, 33)


def test_failing_drafts_pause_drafting_longer_each_time() -> None:
    control = DraftControl(_Fixed(), limit=8)
    pauses = []
    for _ in range(12):
        control.update(control.length, 0)
        control.update(control.length, 0)
        paused = 0
        while control.size() == 0:
            paused += 1
        pauses.append(paused)
    assert pauses[:5] == [1, 2, 4, 8, 16]
    assert max(pauses) == MAX_PAUSE
    # One accepted token ends the backoff.
    control.update(1, 1)
    control.update(1, 0)
    control.update(1, 0)
    paused = 0
    while control.size() == 0:
        paused += 1
    assert paused == 1


def test_an_empty_draft_changes_nothing() -> None:
    control = DraftControl(_Fixed(), limit=8)
    control.update(0, 0)
    assert (control.size(), control.drafted, control.accepted) == (8, 0, 0)


def test_propose_reads_the_context_when_called() -> None:
    seen: list[list[int]] = []

    class Spy:
        def draft(self, context: list[int], last: int, n: int) -> list[int]:
            seen.append([*context, last])
            return [last + 1] * n

    context = [1, 2]
    control = DraftControl(Spy(), limit=4, context=lambda: context)
    draft = control.propose(3)
    context.append(3)
    assert draft(4) == [5, 5, 5]
    assert seen == [[1, 2, 3, 4]]
