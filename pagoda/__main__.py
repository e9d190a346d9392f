"""`python -m pagoda ...`: the same as the `pagoda` command."""

from pagoda.services.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
