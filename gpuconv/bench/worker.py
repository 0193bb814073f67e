"""``python -m gpuconv.bench.worker JOB EVENTS``: run the rows of one job file and append what
happens to EVENTS, one JSON object a line (the protocol is in :mod:`gpuconv.bench.runner`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli import parse_args, select_cases
from .contenders import contenders_for
from .runner import execute


def main(argv=None) -> int:
    job_path, events_path = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(job_path).read_text())
    args = parse_args(job["argv"])
    cases = {c.name: c for c in select_cases(args)}
    entrants = {c.name: c for c in contenders_for(args.device)}
    pairs = [(cases[case], entrants[contender]) for case, contender in job["pairs"]]
    with open(events_path, "a", encoding="utf-8") as events:
        def emit(event: dict) -> None:
            events.write(json.dumps(event) + "\n")
            events.flush()

        return execute(pairs, args, job["info"], job["deadline"], job["peaks"], emit)


if __name__ == "__main__":
    sys.exit(main())
