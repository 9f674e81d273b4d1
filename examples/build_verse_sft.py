#!/usr/bin/env python
"""A small instruction set from the bundled corpus: "complete the verse" pairs.

    python examples/build_verse_sft.py --output-dir runs/post_training/sft [--train 3000 --held-out 40]

Each verse of at least 8 words becomes a prompt/response pair (the prompt names the chapter and
gives the first half of the verse; the response is the second half). The held-out pairs come from
the last chapters, which no training pair uses. Writes train.jsonl (prompt/response lines, with
every fourth one in the {"messages": [...]} form) and held_out.jsonl.
"""
import argparse
import io
import json
import os
import random

import zstandard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chapters(path: str):
    with open(path, "rb") as f:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"):
            title, _, body = json.loads(line)["text"].partition("\n\n")
            yield title.strip(), [v.strip() for v in body.split("\n") if v.strip()]


def pairs(title: str, verses: list[str]):
    for verse in verses:
        words = verse.split()
        if len(words) >= 8:
            half = len(words) // 2
            yield {"prompt": f"Complete the verse from {title}: {' '.join(words[:half])}",
                   "response": " ".join(words[half:])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--corpus", default=os.path.join(ROOT, "data", "corpus", "kjv.jsonl.zst"))
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--held-out", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    all_chapters = list(chapters(args.corpus))
    held = [x for title, verses in all_chapters[-20:] for x in pairs(title, verses)]
    train = [x for title, verses in all_chapters[:-20] for x in pairs(title, verses)]
    rng = random.Random(args.seed)
    rng.shuffle(train)
    rng.shuffle(held)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "train.jsonl"), "w") as f:
        for i, x in enumerate(train[:args.train]):
            if i % 4 == 3:
                x = {"messages": [{"role": "user", "content": x["prompt"]},
                                  {"role": "assistant", "content": x["response"]}]}
            f.write(json.dumps(x) + "\n")
    with open(os.path.join(args.output_dir, "held_out.jsonl"), "w") as f:
        for x in held[:args.held_out]:
            f.write(json.dumps(x) + "\n")
    print(f"wrote {min(args.train, len(train))} training and {min(args.held_out, len(held))} "
          f"held-out pairs to {args.output_dir}")


if __name__ == "__main__":
    main()
