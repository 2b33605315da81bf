"""The one progress protocol: the library reports, the CLI renders (Rich bars). The default reports nothing.

`start(task, total)`, then `advance(task, n)` any number of times, then `finish(task)`. Conversions count bytes
read from the source; evaluation counts forward passes.
"""

from __future__ import annotations


class Reporter:
    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str, n: int) -> None: ...

    def finish(self, task: str) -> None: ...
