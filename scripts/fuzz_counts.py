"""Requests per API operation in a gunicorn access log (from a byte offset on): how many examples
each operation really received during a fuzz run, counted by the server, not the fuzzer.

    python scripts/fuzz_counts.py .run/fuzz/logs/api.log [OFFSET]
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from urllib.parse import urlsplit

from werkzeug.exceptions import HTTPException

from api import create_app
from shared.settings import Settings

PARAM = re.compile(r"<(?:\w+:)?(\w+)>")  # /v1/jobs/<job_id> -> /v1/jobs/{job_id}
LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


def main() -> int:
    path, offset = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    adapter = create_app(Settings()).url_map.bind("localhost")
    counts: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    with open(path, "rb") as log:
        log.seek(offset)
        for raw in log:
            match = LINE.search(raw.decode("utf-8", "replace"))
            if not match:
                continue
            method, target = match["method"], urlsplit(match["target"]).path
            try:
                rule, _ = adapter.match(target, method=method, return_rule=True)
                name = method + " " + PARAM.sub(r"{\1}", rule.rule)
            except HTTPException:
                name = f"{method} (no such route)"
            counts[name] += 1
            statuses[match["status"][0] + "xx"] += 1
    for name, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{count:8d}  {name}")
    print(f"{sum(counts.values()):8d}  requests in all; by status class: {dict(sorted(statuses.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
