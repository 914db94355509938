"""`python -m workbench_cli ...` runs the `workbench` command line."""

from workbench_cli.main import main

raise SystemExit(main())
