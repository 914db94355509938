"""The `workbench` command line: the top of the house, the only layer that may import every other.

`workbench_cli.main:main` is the console entry point; each module adds the subcommands of one
capability (`add_parsers(sub, common, emit)`).
"""
