"""``hf-tokenprune`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-tokenprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prune tiny offline VLMs end to end and check them against the masked "
                                       "reference (no download)")
    demo.add_argument("--ratio", type=float, default=0.25, help="fraction of visual tokens kept")
    demo.add_argument("--scorer", default="attention", choices=["attention", "random", "uniform"])
    demo.add_argument("--max-new-tokens", type=int, default=16)
    demo.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run

        rows = run(ratio=args.ratio, scorer=args.scorer, max_new_tokens=args.max_new_tokens)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0 if all(r["same_tokens_as_masked_reference"] for r in rows) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
