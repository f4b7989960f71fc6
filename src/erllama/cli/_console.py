"""What the commands write: replies on stdout, everything else on stderr, every line ended."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Console", "Stream"]


class Stream:
    """A text stream that remembers whether its last character ended a line, so a reply cut
    short (by its token limit, Ctrl-C or an error) still leaves a finished line behind."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._open = False

    def write(self, text: str) -> None:
        if text:
            self._stream.write(text)
            self._stream.flush()
            self._open = not text.endswith("\n")

    def line(self, text: str = "") -> None:
        """Write ``text`` as a line of its own, ending any open one first."""
        self.end_line()
        self.write(text + "\n")

    def end_line(self) -> None:
        if self._open:
            self.write("\n")

    def line_ended_elsewhere(self) -> None:
        """A terminal's echo of what the user typed ended the open line (a prompt's)."""
        self._open = False


class Console:
    """stdout carries what the model says (so it can be piped); stderr carries prompts,
    statistics and errors."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = Stream(out or sys.stdout)
        self.err = Stream(err or sys.stderr)
        #: A progress bar would fill a log or a pipe with carriage returns.
        self.interactive = (err or sys.stderr).isatty()

    def note(self, text: str) -> None:
        """A line on stderr, after ending any open line on stdout (a terminal shows both)."""
        self.out.end_line()
        self.err.line(text)

    def close(self) -> None:
        self.out.end_line()
        self.err.end_line()
