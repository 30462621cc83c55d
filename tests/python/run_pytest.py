#!/usr/bin/env python3
"""Runs the Python package's pytest suite for meson (python/meson.build registers it).

Meson runs this test with protocol 'gtest' and appends --gtest_output=xml:FILE: pytest writes its
JUnit report there, so tools/test-summary.py counts every pytest case. $SIDECAR_PYTHONPATH is the
build folder holding the assembled package (build/python); $SIDECARD the daemon under test.
Exits 77 (skipped) when this interpreter has no pytest or numpy.
"""

import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
junit = None
rest = []
for arg in sys.argv[1:]:
    if arg.startswith("--gtest_output=xml:"):
        junit = arg.split(":", 1)[1]
    else:
        rest.append(arg)

for module in ("pytest", "numpy"):
    try:
        __import__(module)
    except ImportError:
        print(f"run_pytest: {sys.executable} has no {module}; skipping the Python suite")
        sys.exit(77)

env = dict(os.environ)
paths = [p for p in (env.get("SIDECAR_PYTHONPATH"), here, env.get("PYTHONPATH")) if p]
env["PYTHONPATH"] = os.pathsep.join(paths)
argv = [sys.executable, "-m", "pytest", here, "-q", "-rs", "-p", "no:cacheprovider"]
if junit:
    argv.append(f"--junitxml={junit}")
sys.exit(subprocess.call(argv + rest, env=env))
