"""One module per `skillpack` sub-command (see skillpacks/cli.py)."""
