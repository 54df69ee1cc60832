"""Result tables that survive an interruption: every finished row is written at once, and committed.

A long benchmark (hours of CPU) keeps its rows in a JSON file; after each row the file is rewritten
(atomically), the markdown tables it feeds are rewritten between their markers in a docs page
(``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``), and with ``commit=True`` the files are committed
with a message naming the row. A rerun loads the file and skips the rows it already has.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path


class ResultRows:
    def __init__(
        self,
        path: Path,
        tables: dict[str, Callable[[dict], str]] | None = None,
        page: Path | None = None,
        commit: bool = False,
    ):
        """``tables``: marker name -> function of all rows giving that table's markdown, written into ``page``."""
        self.path, self.tables, self.page, self.commit = Path(path), tables or {}, page, commit
        self.rows: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, key: str, row: dict, files: tuple[Path, ...] = ()) -> None:
        """Record a finished row: JSON, docs tables, and (``commit``) a commit of those and ``files``."""
        self.rows[key] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.rows, indent=2) + "\n")
        os.replace(tmp, self.path)
        changed = [self.path, *files]
        if self.page is not None and self.tables:
            text = self.page.read_text()
            for name, render in self.tables.items():
                text = replace_between_markers(text, name, render(self.rows))
            self.page.write_text(text)
            changed.append(self.page)
        print(f"[rows] {key}: {json.dumps(row)}", flush=True)
        if self.commit:  # in the repository that holds the results file
            where = {"cwd": self.path.parent, "check": True}
            subprocess.run(["git", "add", *(str(Path(f).resolve()) for f in changed)], **where)
            subprocess.run(["git", "commit", "-q", "-m", f"{self.path.stem}: {key} row"], **where)


def replace_between_markers(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"the page has no {begin} ... {end} markers")
    return pattern.sub(lambda _: f"{begin}\n{body.strip()}\n{end}", text)
