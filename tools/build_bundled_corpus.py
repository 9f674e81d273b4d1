#!/usr/bin/env python3
"""Build the bundled corpus data/corpus/kjv.jsonl.zst from Debian's King James Bible.

Reads the compressed text of Debian's ``bible-kjv-text`` package through the ``bible`` program of
the ``bible-kjv`` package (``apt-get install bible-kjv``), which is the only reader of its format.
One document per chapter: ``{"text": "<Book> <n>\\n\\n<verse>\\n<verse>...", "meta":
{"redpajama_set_name": <book group>, "book": ..., "chapter": n}}``, so that the SlimPajama-style
split by ``meta.redpajama_set_name`` has a handful of sets of different sizes. The output is
committed; runs of slimtron never need the Debian packages.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "data" / "corpus" / "kjv.jsonl.zst"
WHOLE_BIBLE = "Gen1:1-Rev22:21"

# The 66 books in canonical order (the order the ``bible`` program prints them) with the set each
# one is filed under.
BOOK_GROUPS = [
    ("law", ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"]),
    ("history", ["Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
                 "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther"]),
    ("wisdom", ["Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"]),
    ("prophets", ["Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel",
                  "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
                  "Zechariah", "Malachi"]),
    ("gospels", ["Matthew", "Mark", "Luke", "John", "Acts"]),
    ("letters", ["Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
                 "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy",
                 "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
                 "1 John", "2 John", "3 John", "Jude", "Revelation"]),
]
BOOKS = [(book, group) for group, books in BOOK_GROUPS for book in books]

# "1Sm12:3 text": abbreviation (may start with a digit), chapter, verse, text.
VERSE_LINE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def dump_verses(data_dir: str | None) -> list[str]:
    """All verses, one per line, as printed by ``bible -f`` (formatting off)."""
    exe = shutil.which("bible")
    if exe is None:
        sys.exit("error: the 'bible' program is missing; install Debian's bible-kjv package")
    cmd = [exe, "-f"] + (["-p", data_dir] if data_dir else []) + [WHOLE_BIBLE]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return out.stdout.splitlines()


def group_chapters(lines: list[str]) -> list[dict]:
    """Verse lines -> one record per chapter, with full book names and set names."""
    abbrev_to_book: dict[str, tuple[str, str]] = {}
    chapters: list[dict] = []
    for lineno, line in enumerate(lines, 1):
        match = VERSE_LINE.match(line)
        if match is None:
            raise ValueError(f"bible output line {lineno}: unexpected format: {line[:60]!r}")
        abbrev, chapter, text = match.group(1), int(match.group(2)), match.group(4).strip()
        if abbrev not in abbrev_to_book:
            if len(abbrev_to_book) == len(BOOKS):
                raise ValueError(f"bible output line {lineno}: more than {len(BOOKS)} books")
            abbrev_to_book[abbrev] = BOOKS[len(abbrev_to_book)]
        book, group = abbrev_to_book[abbrev]
        if not chapters or chapters[-1]["book"] != book or chapters[-1]["chapter"] != chapter:
            chapters.append({"book": book, "chapter": chapter, "group": group, "verses": []})
        chapters[-1]["verses"].append(text)
    if len(abbrev_to_book) != len(BOOKS):
        raise ValueError(f"bible output has {len(abbrev_to_book)} books, expected {len(BOOKS)}")
    return chapters


def chapter_record(ch: dict) -> dict:
    text = f"{ch['book']} {ch['chapter']}\n\n" + "\n".join(ch["verses"])
    meta = {"redpajama_set_name": ch["group"], "book": ch["book"], "chapter": ch["chapter"]}
    return {"text": text, "meta": meta}


def write_jsonl_zst(records: list[dict], path: Path, level: int = 19) -> int:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    compressed = zstandard.ZstdCompressor(level=level).compress(payload)
    path.write_bytes(compressed)
    return len(payload)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--data-dir", default=None,
                        help="directory holding bible.data (default: the program's search path)")
    args = parser.parse_args(argv)
    records = [chapter_record(ch) for ch in group_chapters(dump_verses(args.data_dir))]
    raw_bytes = write_jsonl_zst(records, args.output)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["meta"]["redpajama_set_name"]] = counts.get(r["meta"]["redpajama_set_name"], 0) + 1
    print(f"wrote {args.output}: {len(records)} documents, {raw_bytes / 1e6:.2f} MB of jsonl, "
          f"{args.output.stat().st_size / 1e6:.2f} MB compressed; per set: {counts}")


if __name__ == "__main__":
    main()
