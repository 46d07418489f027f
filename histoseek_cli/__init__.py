"""The `histoseek` command line: the top of the house.

One module per command group, each registering its own subparser (`register`) and running
itself; `main` only builds the top parser and dispatches. Stages are imported lazily, so
`histoseek serve` never loads torch and `--help` is instant. Nothing imports this package
except its entry point (tests/test_imports.py checks it).
"""
