"""PEFT-Ref typology records and the cards and tables generated from them.

Every method declares one `Typology`; cards (`peftlab.card`) and capability tables are rendered
from these records so they cannot drift from the code. Whether a method is mergeable is not
declared here: its `Method` record derives it from the MERGE capability (`with_merge`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

FORMS = ("lowrank", "bottleneck", "vector", "bias", "prompt", "singular", "sparse", "selection")
INTEGRATIONS = ("weight-delta", "parallel", "serial", "scale", "input", "prefix", "prompt")
INTER_CONNECTIVITY = ("fixed", "dynamic")


@dataclass(frozen=True)
class Typology:
    """The PEFT-Ref description of a method (shared/specs/seed-methods.md §1.3)."""

    site_roles: tuple[str, ...]     # roles it attaches to by default
    form: str                       # what is trained: one of FORMS
    integration: str                # how it feeds back: one of INTEGRATIONS
    intra_connectivity: str         # none | dense | dynamic
    # How the module's output meets the model (specs/seed-methods.md §1.3): "fixed" when it is
    # combined by a fixed rule (added, scaled) whatever the input, "dynamic" when the input decides
    # (the model's attention weighs prompt/prefix positions; a token's group picks its module)
    inter_connectivity: str         # fixed | dynamic, with the reason
    adaptation: str                 # addition | reparameterisation | rescaling | selection
    parameter_sharing: str          # none, or what is shared
    input_type: str                 # what the module reads
    insertion: str                  # parallel | sequential | in-sequence | in-place
    insertions_per_layer: str       # e.g. "1 per targeted projection"
    workspace: str                  # PLM sub-space read from and written to
    # Derived, never declared (not constructor arguments): the method's `Method` record fills
    # them from its MERGE capability and merge condition (`with_merge`).
    mergeable: bool = field(default=False, init=False)        # can be folded into the base weights
    merge_condition: str | None = field(default=None, init=False)   # only when ... (None: always)
    param_formula: str              # trainable parameters per site
    # Derived too: the capabilities its `Method` record declares (core/method.py, `Capability`).
    capabilities: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form {self.form!r} is not one of {FORMS}")
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"integration {self.integration!r} is not one of {INTEGRATIONS}")
        if not re.match(r"(fixed|dynamic)\b", self.inter_connectivity):
            raise ValueError(f"inter_connectivity {self.inter_connectivity!r} must start with one of "
                             f"{INTER_CONNECTIVITY} (then the reason)")

    def with_merge(self, mergeable: bool, condition: str | None,
                   capabilities: Iterable[str] = ()) -> Typology:
        """A copy with the derived merge fields and capabilities set (called by the `Method` record)."""
        copy = dataclasses.replace(self)
        object.__setattr__(copy, "mergeable", mergeable)                  # frozen: set once here
        object.__setattr__(copy, "merge_condition", condition if mergeable else None)
        object.__setattr__(copy, "capabilities", tuple(capabilities))
        return copy

    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs in declaration order, values as text; fields that are None
        (no merge condition) are left out."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ", ".join(value) or "none"
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            out.append((f.name.replace("_", " "), str(value)))
        return out


def summarise_sites(sites: Iterable[tuple[str | None, int | None]]) -> str:
    """'attn.q ×2 (layers 0-1), head ×1' from (role, layer) pairs."""
    groups: dict[str, list[int | None]] = {}
    for role, layer in sites:
        groups.setdefault(role or "other", []).append(layer)
    parts = []
    for role, layers in groups.items():
        idx = sorted(i for i in layers if i is not None)
        where = ""
        if idx:
            where = f" (layer {idx[0]})" if idx[0] == idx[-1] else f" (layers {idx[0]}-{idx[-1]})"
        parts.append(f"{role} ×{len(layers)}{where}")
    return ", ".join(parts)


def render_card(title: str, typology: Typology, facts: list[tuple[str, str]]) -> str:
    """A plain-text card: the title, the adapter's own facts, then the method's typology."""
    rows = facts + typology.rows()
    width = max(len(k) for k, _ in rows)
    lines = [title, "=" * len(title)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def describe_provenance(p: Mapping[str, Any]) -> str:
    """A composed adapter's recipe in one line, e.g. "add of pos (×0.5) + neg (×0.5); delta
    space, concatenated (exact)"."""
    inputs = " + ".join(f"{i['name']} (×{i['weight']:g})" for i in p.get("inputs", []))
    text = f"{p.get('op', '?')} of {inputs}; {p.get('mode', '?')} space"
    extras = [f"{k} {p[k]:g}" for k in ("density",) if p.get(k) is not None]
    extras += [f"seed {p['seed']}"] if p.get("seed") is not None else []
    form = p.get("form")
    if form == "svd":
        err = p.get("svd_relative_error", {})
        extras.append(f"SVD to rank {p.get('rank')} (relative error max {err.get('max', 0):.2e})")
    elif form:
        extras.append(form)
    return text + (", " + ", ".join(extras) if extras else "")


# Columns of `peftlab methods`: (heading, Typology field).
TABLE_COLUMNS = (
    ("site roles", "site_roles"), ("form", "form"), ("integration", "integration"),
    ("intra-connectivity", "intra_connectivity"), ("inter-connectivity", "inter_connectivity"),
    ("adaptation", "adaptation"),
    ("sharing", "parameter_sharing"), ("insertion", "insertion"),
    ("insertions per layer", "insertions_per_layer"), ("workspace", "workspace"),
    ("mergeable", "mergeable"), ("merge condition", "merge_condition"),
    ("trainable parameters", "param_formula"), ("capabilities", "capabilities"),
)


def typology_rows(records: Iterable[tuple[str, Typology]]
                  ) -> list[dict[str, str | bool | list[str] | None]]:
    """One dict per method: {"method": name, <heading>: value, ...} in TABLE_COLUMNS order."""
    rows = []
    for name, t in records:
        row: dict[str, str | bool | list[str] | None] = {"method": name}
        for heading, attr in TABLE_COLUMNS:
            value = getattr(t, attr)
            row[heading] = list(value) if isinstance(value, tuple) else value
        rows.append(row)
    return rows


def render_table(records: Iterable[tuple[str, Typology]], fmt: str = "text") -> str:
    """The PEFT-Ref typology table of (method name, record) pairs as "text", "markdown" or "json"."""
    rows = typology_rows(records)
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False)

    def cell(v: str | bool | list[str] | None) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return (", ".join(v) or "none") if isinstance(v, list) else str(v)

    head = ["method", *(h for h, _ in TABLE_COLUMNS)]
    body = [[cell(r[h]) for h in head] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    if fmt != "text":
        raise ValueError(f"format {fmt!r} is not one of text, markdown, json")
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body]
    return "\n".join(lines)
