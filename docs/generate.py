"""Rewrites the generated part of docs/configuration.md, the table of every key, from `fastdqn.config.Config`.

Run `python docs/generate.py` after changing a Config field; tests/test_docs.py checks that the page is current.
"""

from __future__ import annotations

from pathlib import Path

from fastdqn.config import markdown_table

PAGE = Path(__file__).resolve().parent / "configuration.md"
START, END = "<!-- config-table -->\n", "\n<!-- /config-table -->"


def with_config_table(page: str) -> str:
    """The page with the text between its config-table markers replaced by the table generated from Config."""
    if START not in page or END not in page:
        raise SystemExit(f"{PAGE} lost its config-table markers ({START.strip()} ... {END.strip()})")
    head, rest = page.split(START, 1)
    return head + START + markdown_table() + END + rest.split(END, 1)[1]


if __name__ == "__main__":
    PAGE.write_text(with_config_table(PAGE.read_text()))
    print(f"wrote {PAGE}")
