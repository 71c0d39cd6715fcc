#!/usr/bin/env python3
"""Per-test results of a conformance run, from the test binary's -test.v output:
    summary.py LOG
One line per test that ran (and per skipped mesh test): name, PASS/FAIL/SKIP, and its time from its first to its
last log line (go test's own durations are misleading for the suite's parallel subtests). Last line:
'N passed, N failed, N skipped' (skipped: mesh tests only)."""
import datetime
import re
import sys

RESULT = re.compile(r"^ {4}--- (PASS|FAIL|SKIP): TestConformance/([A-Za-z0-9]+) \(")
HEADER = re.compile(r"^=== (?:RUN|CONT|PAUSE|NAME)\s+TestConformance/([A-Za-z0-9]+)")
STAMP = re.compile(r"^\s+\S+\.go:\d+: (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)\d*Z: ")

results, first, last, order = {}, {}, {}, []
current = None
with open(sys.argv[1], errors="replace") as f:
    for line in f:
        m = HEADER.match(line)
        if m:
            current = m.group(1)
            continue
        m = RESULT.match(line)
        if m:
            results[m.group(2)] = m.group(1)
            order.append(m.group(2))
            continue
        m = STAMP.match(line)
        if m and current:
            t = datetime.datetime.fromisoformat(m.group(1)[:26])
            first.setdefault(current, t)
            last[current] = t

counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
print(f"{'TEST':<45} {'RESULT':<6} TIME")
for name in order:
    res = results[name]
    if res == "SKIP" and not name.startswith("Mesh"):
        continue
    counts[res] += 1
    secs = (last[name] - first[name]).total_seconds() if name in first else 0.0
    print(f"{name:<45} {res:<6} {secs:.0f}s")
print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
