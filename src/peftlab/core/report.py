"""What an AdaptedModel holds, for people: one status row per wrapped layer, the status table, and
each adapter's PEFT-Ref typology card (`peftlab compose` prints the new adapter's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .layer import AdaptedLayer, ModuleCopies
from .quantised import RequantError
from .sites import iter_modules, parameter_roles, site_roles
from .typology import describe_provenance, render_card, summarise_sites

if TYPE_CHECKING:
    from .attach import Adapter
    from .model import AdaptedModel


@dataclass(frozen=True)
class LayerStatus:
    """One wrapped module: its path and role, its kind ("copy" for modules_to_save), the adapters
    it holds and those of them merged into its weight; for a bitsandbytes-quantised base its
    quantisation ("nf4", "fp4", "int8") and, while adapters are merged into it, the error of
    requantising W + ΔW (core/quantised.py, `RequantError`)."""

    path: str
    role: str | None
    kind: str
    adapters: tuple[str, ...]
    merged: tuple[str, ...]
    quantised: str | None = None
    requantised: RequantError | None = None


def status_rows(model: nn.Module) -> list[LayerStatus]:
    """One row per peftlab wrapper in `model`, in module order."""
    roles = site_roles(model)
    for ppath, role in parameter_roles(model).items():    # a module wrapped for its parameters
        roles.setdefault(ppath.rpartition(".")[0], role)
    rows = []
    for path, module in iter_modules(model):
        if isinstance(module, AdaptedLayer):
            rows.append(LayerStatus(path, roles.get(path), module.kind, tuple(module.deltas),
                                    tuple(module.merged), module.quantised, module.requantised))
        elif isinstance(module, ModuleCopies):
            rows.append(LayerStatus(path, roles.get(path), "copy", tuple(module.copies), ()))
    return rows


def status_table(am: AdaptedModel) -> str:
    """The status rows as an aligned text table, headed by the adapters' summary."""
    lines = [f"adapters enabled: {am.state.enabled}; active: {list(am.state.active) or 'none'}"]
    for a in am.adapters.values():
        lines.append(f"  {a.name}: {a.method.name} ({a.method.describe(a.config)}), "
                     f"{len(a.sites)} sites, {am.count_parameters(a.name):,} params, "
                     f"{'trainable' if a.trainable else 'frozen'}")
    status = am.status()
    rows = [("path", "role", "kind", "adapters", "merged")]
    rows += [(r.path, r.role or "-", r.kind, ",".join(r.adapters), ",".join(r.merged) or "-")
             for r in status]
    if any(r.quantised for r in status):      # the columns of quantised bases, only with one
        rows[0] += ("quantised", "requantisation error (max abs, relative)")
        rows[1:] = [row + (r.quantised or "-", "-" if r.requantised is None else
                           f"{r.requantised.max_abs:.2e}, {r.requantised.relative:.2e}")
                    for row, r in zip(rows[1:], status, strict=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def card(am: AdaptedModel, name: str) -> str:
    """The PEFT-Ref typology card of adapter `name`, with its actual sites and parameter count."""
    a = am.adapter(name)
    facts = [
        ("adapter", name),
        ("method", f"{a.method.name} ({a.method.describe(a.config)})"),
        ("sites", summarise_sites((s.label, s.layer) for s in a.sites)),   # slices: "attn.q+attn.v"
        ("modules to save", ", ".join(a.copies) or "none"),
        ("parameters", (f"{am.count_parameters(name):,} "
                        f"({100 * am.count_parameters(name) / max(am.base_parameters(), 1):.3f}% of base)")),
        *([("provenance", describe_provenance(a.provenance))] if a.provenance else []),
        *_quantised_facts(a),
        ("state", (f"{'active' if name in am.state.active else 'inactive'}, "
                   f"{'trainable' if a.trainable else 'frozen'}, "
                   f"{'merged' if a.merged else 'unmerged'}")),
    ]
    return render_card(f"{a.method.title} adapter {name!r}", a.method.typology, facts)


def _quantised_facts(a: Adapter) -> list[tuple[str, str]]:
    """The card's lines for sites on bitsandbytes-quantised layers: how many, in which
    quantisation, and while merged the largest requantisation error over them."""
    quantised = [layer for layer in a.layers.values() if layer.quantised]
    if not quantised:
        return []
    kinds = ", ".join(sorted({layer.quantised for layer in quantised}))
    facts = [("quantised base", f"{kinds} at {len(quantised)} of {len(a.layers)} sites")]
    errors = [layer.requantised for layer in quantised if a.name in layer.merged and layer.requantised]
    if errors:
        worst = (f"max abs {max(e.max_abs for e in errors):.2e}, relative (Frobenius) up to "
                 f"{max(e.relative for e in errors):.2e} over {len(errors)} layers")
        facts.append(("requantisation error", worst))
    return facts
