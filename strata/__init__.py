"""The `strata` command line: a thin layer that turns flags into config dataclasses and calls one function per verb."""
