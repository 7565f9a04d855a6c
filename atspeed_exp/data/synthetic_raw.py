"""Small synthetic raw Amazon review files (2014 or 2018 schema, JSON lines, gzip or plain) and item metadata, for
tests and for trying ``python -m atspeed_exp.prepare`` without downloading anything. The same arguments always
give the same bytes.

``python -m atspeed_exp.data.synthetic_raw FOLDER`` writes ``FOLDER/reviews.json`` and ``FOLDER/meta.json``, the
default inputs of ``conf/data/synthetic_raw.yaml`` (with FOLDER ``data/raw/synthetic_raw``).

Reviews: each user reviews 4..14 distinct items drawn by a Zipf-like popularity, on days (``unixReviewTime`` is a
multiple of 86400 as in the real files, so same-day ties occur) spread over a few years; ratings are mostly 4-5.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from atspeed_exp.artifacts import atomic_write

DAY = 86400
START = 1_300_000_000 // DAY * DAY  # a day in 2011


def synthetic_asin(item: int) -> str:
    return f"B{item:09d}"


def synthetic_reviewer(user: int) -> str:
    return f"A{user:07d}SYN"


def write_synthetic_reviews(
    path: str | Path, num_users: int = 300, num_items: int = 120, schema: str = "2014", compress: bool = False,
    seed: int = 0,
) -> Path:
    """Write the review file ``path`` (atomically); ``schema`` ``2014`` or ``2018`` (adds ``vote``, ``verified``,
    ``style``), ``compress``: gzip."""
    if schema not in ("2014", "2018"):
        raise ValueError(f"schema must be '2014' or '2018', got {schema!r}")
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng(seed + 1)  # 2018-only fields: both schemas get the same interactions
    popularity = 1.0 / (rng.permutation(num_items) + 1.0) ** 0.8
    popularity /= popularity.sum()
    rows = []
    for user in range(num_users):
        length = int(rng.integers(4, 15))
        items = rng.choice(num_items, size=min(length, num_items), replace=False, p=popularity)
        start = START + int(rng.integers(0, 900)) * DAY
        days = np.sort(rng.integers(0, 700, size=len(items)))
        for item, day in zip(items.tolist(), days.tolist()):
            row = {"reviewerID": synthetic_reviewer(user), "asin": synthetic_asin(item),
                   "overall": float(rng.choice([1, 2, 3, 4, 5], p=[0.05, 0.05, 0.1, 0.3, 0.5])),
                   "unixReviewTime": start + day * DAY, "summary": "ok", "reviewText": "fine"}
            if schema == "2018":
                row.update(vote=str(int(extra.integers(1, 30))), verified=bool(extra.random() < 0.8),
                           style={"Size:": "one"})
            rows.append(row)
    order = rng.permutation(len(rows))  # files are not sorted by user or time
    text = "".join(json.dumps(rows[i]) + "\n" for i in order.tolist())
    data = gzip.compress(text.encode(), mtime=0) if compress else text.encode()
    return atomic_write(path, lambda f: f.write(data), "wb")


def write_synthetic_metadata(path: str | Path, num_items: int = 120, schema: str = "2014") -> Path:
    """Item metadata for the items of ``write_synthetic_reviews`` (every third item has no row): 2014 as Python
    literal lines with ``categories`` (a list of paths), 2018 as JSON with ``category`` and a ``description`` list."""
    lines = []
    for item in range(num_items):
        if item % 3 == 2:
            continue
        if schema == "2014":
            lines.append(repr({"asin": synthetic_asin(item), "title": f"Item {item}", "description": f"About {item}",
                               "categories": [["Beauty", f"Group {item % 5}"]]}))
        else:
            lines.append(json.dumps({"asin": synthetic_asin(item), "title": f"Item {item}",
                                     "description": [f"About {item}", "more"],
                                     "category": ["Beauty", f"Group {item % 5}"]}))
    return atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="writes reviews.json and meta.json (2014 schema) here")
    parser.add_argument("--num-users", type=int, default=300)
    parser.add_argument("--num-items", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_synthetic_reviews(args.folder / "reviews.json", args.num_users, args.num_items, seed=args.seed)
    write_synthetic_metadata(args.folder / "meta.json", args.num_items)


if __name__ == "__main__":
    main()
