"""Subcommands of the `openlora` command line, grouped by what they serve."""
