"""A draft is verified in one mode (greedy, or the request's draw), and a request that draws
chooses its tool calls' syntax greedily: the draft is cut where plain decoding would switch.
"""

from __future__ import annotations

from collections.abc import Sequence

from erllama.events import Event
from erllama.model.output import Output
from erllama.model.spans import Markers
from erllama.speculative.control import DraftControl

PIECES = {
    1: b"Sure",
    2: b" <tool",
    3: b"_call>",
    4: b'{"name": "f"}',
    5: b"</tool_call>",
    6: b" done",
}
MARKERS = Markers(tool_start=b"<tool_call>", tool_end=b"</tool_call>")


def output() -> Output:
    return Output(PIECES.__getitem__, markers=MARKERS)


def test_a_draft_is_cut_where_a_tool_call_starts_and_where_it_ends() -> None:
    out = output()
    assert not out.greedy
    # "Sure <tool_call>": the token after the marker is chosen greedily, so the draft
    # ends with the marker's last token.
    assert out.steady(False, [1, 2, 3, 4, 5]) == 3
    assert out.steady(True, [1, 2, 3]) == 0  # the next token is drawn, not greedy
    assert out.steady(False, [1, 6, 1]) == 3  # no switch: all of it
    events: list[Event] = []
    for token in (1, 2, 3):
        out.token(token, False, events)
    assert out.greedy  # inside the call's syntax now
    assert out.steady(False, [4]) == 0
    assert out.steady(True, [4, 5, 6, 1]) == 2  # the call ends with token 5
    assert out.steady(True, []) == 0


def test_without_tool_call_markers_every_token_counts() -> None:
    out = Output(PIECES.__getitem__)
    assert out.steady(False, [1, 2, 3, 4, 5, 6]) == 6


class Fixed:
    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = list(tokens)

    def draft(self, context: Sequence[int], last: int, n: int) -> list[int]:
        return self.tokens[:n]


def test_the_control_cuts_its_drafts_in_the_mode_the_step_verifies_them() -> None:
    out = output()
    control = DraftControl(Fixed([1, 2, 3, 4, 5]), limit=8, steady=out.steady)
    assert list(control.propose(5, greedy=False)(0)) == [1, 2, 3]
    assert list(control.propose(5, greedy=True)(0)) == []
    assert list(control.propose(2, greedy=False)(0)) == [1, 2]
    unbound = DraftControl(Fixed([1, 2, 3, 4, 5]), limit=8)  # no steady: every token
    assert list(unbound.propose(5, greedy=False)(0)) == [1, 2, 3, 4, 5]
