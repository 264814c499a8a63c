"""``diffin validate SHARDS...`` / ``python -m jobs.validate``: check shards before a run.

Prints one line per shard and a total; exits 0 when every shard is clean, 1 when any
problem was found, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import SimpleJob, int_at_least  # first: applies environment defaults

from pipeline.data.shards import expand_shards, load_sizes
from pipeline.data.uids import DEFAULT_UID_FROM, LEGACY_REQUIRE_UID, UID_SOURCES, check_uid_from
from pipeline.data.validate import ShardCheck, find_sizes, validate_shards
from pipeline.io.atomic import write_json_atomic

DESCRIPTION = ("Check WebDataset shards: member contiguity, keys, required fields (image, txt, a uid by --uid-from), "
               "image decodability and counts against sizes.json. Exit 1 when problems exist.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", metavar="SHARDS",
                        help="shard URLs, brace patterns or globs (e.g. 'data/{00000..00099}.tar')")
    parser.add_argument("--sizes", metavar="FILE", default=None,
                        help="sizes.json with per-shard counts (default: the one beside the shards, if any)")
    parser.add_argument("--no-decode", dest="decode", action="store_false",
                        help="skip decoding images (structure, fields and counts only)")
    parser.add_argument("--uid-from", type=uid_sources, default=DEFAULT_UID_FROM, metavar="SOURCES",
                        help="where a pair's uid comes from, as data.uid_from: comma-separated, first that "
                             f"applies, of {', '.join(UID_SOURCES)} (default {','.join(DEFAULT_UID_FROM)})")
    parser.add_argument("--allow-missing-uid", dest="uid_from", action="store_const",
                        const=LEGACY_REQUIRE_UID[False], help="as --uid-from json,url,image")
    parser.add_argument("--threads", type=int_at_least(1), default=2, help="shards checked at a time (default 2)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the full report as JSON")


def uid_sources(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated uid sources (argparse turns the error into exit 2)."""
    try:
        return check_uid_from([part.strip() for part in text.split(",") if part.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _line(check: ShardCheck) -> str:
    counted = f"{check.read}/{check.expected}" if check.expected is not None else f"{check.read}"
    verdict = "ok  " if check.clean else "FAIL"
    text = f"{verdict} {check.url}  samples {counted}  ok {check.ok}"
    if check.status != "ok":
        text += f"  shard {check.status}: {check.error}"
    if check.problems:
        text += "  " + ", ".join(f"{k} {v}" for k, v in check.problems.items())
        first = check.examples[0]
        text += f"  (e.g. {first['key']}: {first['error']})"
    return text


def run(args: argparse.Namespace) -> int:
    urls = expand_shards(args.shards)
    if args.sizes:
        sizes, source = load_sizes(args.sizes), args.sizes
    else:
        sizes, source = find_sizes(urls)
    print(f"validating {len(urls)} shard(s); counts from {source or 'nowhere (no sizes.json: counts not checked)'}")
    checks = validate_shards(urls, sizes, decode=args.decode, uid_from=args.uid_from,
                             threads=args.threads)
    for check in checks:
        print(_line(check))
    bad = [c for c in checks if not c.clean]
    problems: dict[str, int] = {}
    for check in checks:
        for reason, n in check.problems.items():
            problems[reason] = problems.get(reason, 0) + n
    print(f"total: {len(checks)} shards, {len(bad)} with problems; {sum(c.read for c in checks)} samples read, "
          f"{sum(c.ok for c in checks)} ok" + (f"; {problems}" if problems else ""))
    if args.json:
        write_json_atomic(args.json, {"sizes": source, "shards": [c.as_dict() for c in checks],
                                      "problems": problems, "clean": not bad})
    return 1 if bad else 0


JOB = SimpleJob('validate', 'check shards (structure, fields, decoding, counts)', DESCRIPTION, add_arguments, run)
register = JOB.register
main = JOB.main


if __name__ == "__main__":
    sys.exit(main())
