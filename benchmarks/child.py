"""Run one benchmark function in a fresh process and print its result with the peak memory.

    python -m benchmarks.child benchmarks.bench_data_prep:project '{"n": 300}'

The last stdout line is a JSON object: the function's result plus ``peak_rss_mib`` (this
process's peak resident set size, imports included) and ``rss_after_import_mib``.
"""

from __future__ import annotations

import importlib
import json
import sys

from benchmarks.common import current_rss_mib, peak_rss_mib


def main(argv: list[str]) -> int:
    target, arguments = argv
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    kwargs = json.loads(arguments)
    before = current_rss_mib()
    result = dict(function(**kwargs))
    result |= {"peak_rss_mib": peak_rss_mib(), "rss_after_import_mib": before}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
