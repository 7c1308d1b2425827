"""String fields of the config dataclasses that have a syntax of their own: layer specs, hook-site lists and
lists of sizes. Each is declared `Annotated[str, SPEC]`; pydantic (strata/config.py) applies SPEC to every value
from a flag, a YAML/JSON file or a sweep: an int or a list is first joined into the comma string the stages
parse (`10` -> "10", `[0, 3]` -> "0,3", `[resid, mlp_out]` -> "resid,mlp_out"), then the syntax is checked, so a
typo is refused before any work. The dataclass itself stays plain: the stored value is always that str.
Numeric constraints are written inline with annotated_types (`Annotated[int, Ge(0)]`).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pydantic_core import core_schema

_LAYER_PART = re.compile(r"\s*\d+\s*(?:-\s*\d+\s*(?::\s*\d+\s*)?)?")


@dataclass(frozen=True)
class TextSpec:
    """pydantic metadata for a str field with a syntax: `description` says what it takes, `check(text)` raises
    ValueError with the fix for text that does not parse."""
    description: str
    check: Callable[[str], None]

    def parse(self, value):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            if not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
                raise ValueError(f"a list here must hold only ints or strings; write it as {self.description}")
            value = ",".join(str(v) for v in value)
        if isinstance(value, str):
            self.check(value)
        return value  # anything else is refused by the str check that follows

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_before_validator_function(self.parse, handler(source))


def _check_layers(spec: str) -> None:
    """'all', '3', '0-29:3', '1,4,7-9': the grammar only (which layers exist is checked against the model)."""
    if spec.strip() in ("", "all"):
        return
    bad = [p for p in spec.split(",") if not _LAYER_PART.fullmatch(p)]
    if bad:
        raise ValueError(f"bad layer spec {bad[0]!r}; use all, ints and ranges like 0-29:3 or 1,4,7-9")


def _check_sites(spec: str) -> None:
    from activations.hooks import SITES

    sites = [s.strip() for s in spec.split(",") if s.strip()]
    if not sites:
        raise ValueError(f"no hook site given; use one or more of {', '.join(SITES)}")
    for site in sites:
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; use one or more of {', '.join(SITES)}")


def _check_sizes(spec: str) -> None:
    bad = [p for p in (p.strip() for p in spec.split(",")) if p and (not p.isdigit() or int(p) < 1)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a positive integer; give a comma list like 256,1024,4096")


LAYER_SPEC = TextSpec("layer spec (all, 3, 0-29:3, 1,4,7-9 or a list [0, 3])", _check_layers)
SITE_LIST = TextSpec("site list (resid, mlp_in, mlp_out, attn_out: comma-separated or a list)", _check_sites)
SIZE_LIST = TextSpec("list of positive ints (256,1024 or [256, 1024])", _check_sizes)
