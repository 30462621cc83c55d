#!/usr/bin/env python3
"""Totals of the meson test runs of tools/test, as one line: "N passed, N failed, N skipped".

Arguments: the results folders that tools/test saved (each has meson's testlog.json and
testlog.junit.xml), and --failed-step=NAME for each step that failed before testing (a build).

Every googletest case counts once (tests declared with protocol 'gtest' report their cases in
the JUnit log); other tests count once each. A test program that failed although none of its
cases did (a crash at exit, a sanitizer report after the last case) counts as one more failure.
Exits 1 when anything failed.
"""
import json
import os
import sys
import xml.etree.ElementTree as ET

passed = failed = skipped = 0
failures = []

for arg in sys.argv[1:]:
    if arg.startswith("--failed-step="):
        step = arg.split("=", 1)[1]
        if step.startswith("build"):
            failed += 1
            failures.append(f"step {step}")
        continue
    label = os.path.basename(arg.rstrip("/"))
    programs = {}
    with open(os.path.join(arg, "testlog.json")) as f:
        for line in f:
            if line.strip():
                t = json.loads(line)
                programs[t["name"]] = t["result"]
    cases = {}  # program name -> list of (case name, result)
    junit = os.path.join(arg, "testlog.junit.xml")
    if os.path.exists(junit):
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            name = suite.get("name", "")
            parts = name.split(".", 1)
            if len(parts) < 2:
                continue  # the suite of single-result tests
            owner = max((p for p in programs if parts[1].startswith(p + ".")), key=len, default=None)
            if owner is None:
                continue
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    result = "FAIL"
                elif case.find("skipped") is not None:
                    result = "SKIP"
                else:
                    result = "OK"
                cases.setdefault(owner, []).append((f"{parts[1]}.{case.get('name')}", result))
    for program, result in programs.items():
        program_cases = cases.get(program, [])
        any_case_failed = False
        for case_name, case_result in program_cases:
            if case_result == "OK":
                passed += 1
            elif case_result == "SKIP":
                skipped += 1
            else:
                failed += 1
                any_case_failed = True
                failures.append(f"{label}: {case_name}")
        ok = result in ("OK", "EXPECTEDFAIL", "SKIP")
        if program_cases:
            if not ok and not any_case_failed:
                failed += 1
                failures.append(f"{label}: {program} ({result} after its cases passed)")
        elif result in ("OK", "EXPECTEDFAIL"):
            passed += 1
        elif result == "SKIP":
            skipped += 1
        else:
            failed += 1
            failures.append(f"{label}: {program} ({result})")

for name in failures:
    print(f"FAILED: {name}")
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
