"""Jail worker: bwrap + pyseccomp around the command."""
