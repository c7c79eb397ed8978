"""How much Light-PEFT pruning removes: `PruneRatios` and the CLI's `--prune` spec that makes one."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.errors import ConfigError, close_matches

RATIO_KEYS = ("heads", "neurons", "ranks", "modules")


@dataclass(frozen=True)
class PruneRatios:
    """Fractions to prune: attention heads (per layer), FFN neurons (global), LoRA rank units
    (global) and whole LoRA modules (global). Each in [0, 1); the defaults are the paper's
    (specs/seed-methods.md §5: heads and neurons 1/3, ranks 0.5, modules 0.75): pruned LoRA keeps
    the most important 25 % of its modules and, among them, half the rank units."""

    heads: float = 1 / 3
    neurons: float = 1 / 3
    ranks: float = 0.5
    modules: float = 0.75

    def __post_init__(self) -> None:
        for key in RATIO_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"pruning ratio {key}={value!r} must be a number in [0, 1) "
                                  "(the fraction to remove, e.g. 0.33)")


def parse_prune_spec(spec: str) -> PruneRatios:
    """'heads=0.33,neurons=0.33,ranks=0.5,modules=0' -> PruneRatios. A key left out prunes
    nothing of that kind; values are decimals or fractions ('1/3'); '' or 'none' prunes nothing."""
    if not isinstance(spec, str):
        raise ConfigError(f"a prune spec is a string like 'heads=0.33,neurons=0.33,ranks=0.5', got {spec!r}")
    values: dict[str, float] = dict.fromkeys(RATIO_KEYS, 0.0)
    seen: set[str] = set()
    text = spec.strip()
    if text.lower() in ("", "none"):
        return PruneRatios(**values)
    for item in text.split(","):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key or not raw:
            raise ConfigError(f"prune spec item {item.strip()!r} is not 'key=ratio'; write e.g. "
                              "'heads=0.33,neurons=0.33,ranks=0.5,modules=0'")
        if key not in RATIO_KEYS:
            hint = close_matches(key, RATIO_KEYS)
            raise ConfigError(f"unknown prune spec key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + f" Keys: {', '.join(RATIO_KEYS)}")
        if key in seen:
            raise ConfigError(f"prune spec names {key!r} twice: {spec!r}")
        seen.add(key)
        values[key] = _parse_ratio(key, raw)
    return PruneRatios(**values)


def _parse_ratio(key: str, raw: str) -> float:
    try:
        if "/" in raw:
            num, den = raw.split("/", 1)
            return float(num) / float(den)
        return float(raw)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"prune spec {key}={raw!r}: the ratio must be a number in [0, 1) such as "
                          "0.33 or 1/3") from None
