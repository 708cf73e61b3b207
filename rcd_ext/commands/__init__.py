"""Subcommands of the `rcd` console script (see rcd_ext.cli)."""
