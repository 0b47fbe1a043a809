"""One progress bar for long work (pretraining, training, evaluation): rich, with live fields."""

from __future__ import annotations


class Bar:
    """`with Bar(total, "train", "loss {task.fields[loss]:.4f}", loss=nan) as b: b.update(completed=..., loss=...)`.

    Disabled bars cost nothing, so hot loops can call update unconditionally."""

    def __init__(self, total: int, label: str, fields_fmt: str = "", enabled: bool = True, **fields):
        self.total, self.label, self.fmt, self.enabled, self.fields = total, label, fields_fmt, enabled, fields
        self._p = None

    def __enter__(self) -> "Bar":
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            cols = [TextColumn(self.label), BarColumn(), MofNCompleteColumn()]
            if self.fmt:
                cols.append(TextColumn(self.fmt))
            cols += [TimeElapsedColumn(), TimeRemainingColumn()]
            self._p = Progress(*cols)
            self._p.__enter__()
            self._task = self._p.add_task(self.label, total=self.total, **self.fields)
        return self

    def update(self, completed: int | None = None, advance: int | None = None, **fields) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=completed, advance=advance, **fields)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
