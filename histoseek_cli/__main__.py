"""`python -m histoseek_cli …` is the `histoseek` command (how stages start each other)."""
from histoseek_cli.main import main

main()
