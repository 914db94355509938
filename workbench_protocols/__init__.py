"""Protocols: procedures that combine methods from `editors` and `adversaries` with the core.

- `editing`: trace -> edit site -> editor -> fit / apply / score / revert (the CLI, the studies
  and the tuner all edit through it);
- `rediscovery`: trojan rediscovery as 8-way multiple choice (Casper et al. 2023);
- `tuning`: optuna search toward a stated objective; `tunables`: what can be tuned.

Protocols import the core and the methods, never `case_studies` or the command line.
"""
