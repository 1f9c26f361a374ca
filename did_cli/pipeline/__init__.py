"""Orchestration and what a person reads: the quickstart's end-to-end run, its report, plots
and the HTML view of `did show`."""
