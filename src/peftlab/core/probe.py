"""Which layers a model's forward really calls, so that no adapter sits where it can do nothing.

An adapter on a layer acts through that layer's forward. Some models read a layer's weight
directly instead (transformers' Mamba multiplies by `dt_proj.weight` and hands `conv1d.weight`
to its scan; fused kernels take `x_proj` / `out_proj` weights in training), and some layers
are never called: an adapter there gets no input, no gradient, and a merge that changes the
output. Which layers run is found by running the model, not by a list of names:

* **The probe forward**: once per AdaptedModel, at the first adapter that wraps layers, the
  model runs one example of one token (inputs from its config, `hf.probe_inputs`) in eval
  mode under no_grad, with a forward pre-hook on every module recording its path (it draws
  no random numbers; every module's mode is restored). A site whose forward did not run is
  refused when a target named it, and left out with a warning when a role or `all-linear`
  found it.
* **The first forward of each mode**: a model the probe cannot build inputs for is checked at
  its first real forward, and every model at its first training-mode forward (a fused kernel
  path may run only while training): the same recording runs during that forward, and a site
  of an installed adapter that did not run raises there, naming it (in training, a layer counts
  as run when its kind ran in some transformer layer: LayerDrop skips layers at random). The
  paths that ran are kept, so later adapters are checked when they are added. The forward is
  hooked only while its current mode is unchecked: at an install, and when `am.train()` /
  `am.eval()` switch modes (switching the wrapped model's own mode goes unseen until then).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CapabilityError, PeftlabWarning
from .hf import probe_inputs
from .role_maps import ROLE_GROUPS, ROLES
from .sites import Site, compress_paths, iter_modules, match_targets

if TYPE_CHECKING:
    from .model import AdaptedModel

_WHY = ("its forward never ran during a probe forward of this {model}: the model reads its weight "
        "directly (or never calls the layer), so an adapter there would get no input and no gradient")


class DeadSiteWarning(PeftlabWarning):
    """A role or `all-linear` target found layers whose forward never runs; they were left out."""


def record_forwards(model: nn.Module, run: Any) -> frozenset[str]:
    """The module paths of `model` whose forward was called while `run()` ran."""
    ran: set[str] = set()
    handles = [module.register_forward_pre_hook(_recorder(ran, path))
               for path, module in iter_modules(model)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return frozenset(ran)


def _recorder(ran: set[str], path: str):
    def record(module: nn.Module, args: tuple) -> None:
        ran.add(path)
    return record


def probe_forward(model: nn.Module) -> frozenset[str] | None:
    """The paths whose forward runs in one tiny eval-mode forward of `model` (no gradients; every
    module's training flag restored after), or None when no inputs can be built for it or the
    forward fails on them."""
    inputs = probe_inputs(model)
    if inputs is None:
        return None
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return record_forwards(model, lambda: model(**inputs))
    except Exception:      # inputs it did not expect: checked at the first real forward instead
        return None
    finally:
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode


def exclude_hint(paths: Sequence[str]) -> list[str]:
    """Targets naming `paths` for an `exclude=`: each path's part after its layer index (a dotted
    suffix, so 'mixer.dt_proj' names it in every layer), or the whole path without one."""
    hints: list[str] = []
    for path in paths:
        parts = path.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        hint = ".".join(parts[at + 1:]) if at is not None and at + 1 < len(parts) else path
        if hint not in hints:
            hints.append(hint)
    return hints


def explicit_paths(model: nn.Module, targets: str | Sequence[str], roles: dict[str, str]) -> set[str]:
    """The paths that targets other than roles, role groups and `all-linear` name (exact names,
    suffixes, globs, regexes): a dead one among them is refused rather than left out."""
    named = [t for t in ([targets] if isinstance(targets, str) else targets)
             if t != "all-linear" and t not in ROLES and t not in ROLE_GROUPS]
    if not named:
        return set()
    return set().union(*match_targets(model, named, roles=roles).values())


class ForwardCheck:
    """Per AdaptedModel: the module paths its base model's forward calls, in eval mode (False)
    and in training mode (True), each None until known (see the module docstring)."""

    def __init__(self) -> None:
        self.ran: dict[bool, frozenset[str] | None] = {False: None, True: None}
        self.probed = False
        self._hooks: list[Any] = []            # on the AdaptedModel while a mode is unknown
        self._recording: tuple[set[str], list[Any]] | None = None

    def live(self, model: nn.Module) -> frozenset[str] | None:
        """Paths known to run in every mode seen so far (probing once first); None: not known."""
        if not self.probed:
            self.probed = True
            self.ran[False] = probe_forward(model)
        known = [paths for paths in self.ran.values() if paths is not None]
        return frozenset.intersection(*known) if known else None

    def keep_live(self, am: AdaptedModel, sites: list[Site], targets: str | Sequence[str] | None,
                  roles: dict[str, str], title: str) -> list[Site]:
        """`sites` without the ones whose forward does not run. A site a target names explicitly
        (or a checkpoint records: `targets` None) raises CapabilityError; ones found by a role
        or `all-linear` are left out with a DeadSiteWarning listing them; none left raises.
        Nothing changes on the model. Arms the first-forward check for modes not yet seen."""
        live = self.live(am.model)
        self.sync(am)
        if live is None:
            return sites
        dead = [s for s in sites if s.path not in live]
        if not dead:
            return sites
        model = type(am.model).__name__
        named = [s.path for s in dead] if targets is None else sorted(
            explicit_paths(am.model, targets, roles) & {s.path for s in dead})
        if named:
            fix = ("this adapter cannot be loaded on it" if targets is None else
                   f"Exclude it (exclude={exclude_hint(named)!r}) or target layers that run")
            raise CapabilityError(
                f"{title} cannot attach to {named[0]!r}: {_WHY.format(model=model)}. {fix}"
                + (f" ({len(named)} such named sites)" if len(named) > 1 else ""))
        left = [s for s in sites if s.path in live]
        dead_paths = compress_paths([s.path for s in dead])
        if not left:
            raise CapabilityError(
                f"targets {targets!r} find only layers {title} cannot use on this {model}: "
                f"{', '.join(dead_paths)}; {_WHY.format(model=model)}. Target other roles or layers")
        warnings.warn(f"{title}: left out {len(dead)} of the {len(sites)} sites the targets found, "
                      f"{', '.join(dead_paths)}: {_WHY.format(model=model)}. To silence this, "
                      f"exclude={exclude_hint([s.path for s in dead])!r}", DeadSiteWarning, stacklevel=5)
        return left

    # ---- the first forward of each mode -----------------------------------------------------------
    def sync(self, am: AdaptedModel) -> None:
        """Hook `am`'s forward while its current mode (eval / training) is unchecked, once an
        adapter wrapping layers was added; unhook it otherwise (`AdaptedModel.train` calls this,
        so a model only used for inference carries no hook once probed)."""
        wanted = self.probed and self.ran[am.model.training] is None
        if wanted and not self._hooks:
            self._hooks = [am.register_forward_pre_hook(self._before, with_kwargs=True),
                           am.register_forward_hook(self._after, with_kwargs=True)]
        elif not wanted and self._hooks:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []

    def _before(self, am: AdaptedModel, args: tuple, kwargs: dict) -> None:
        self._stop()                 # a forward that raised left its recording behind
        # a decoder step given the encoder's outputs runs part of the model only (generate)
        if self.ran[am.model.training] is not None or kwargs.get("encoder_outputs") is not None:
            return
        ran: set[str] = set()
        self._recording = (ran, [module.register_forward_pre_hook(_recorder(ran, path))
                                 for path, module in iter_modules(am.model)])

    def _after(self, am: AdaptedModel, args: tuple, kwargs: dict, output: Any) -> None:
        if self._recording is None:
            return
        ran = frozenset(self._recording[0])
        self._stop()
        mode = am.model.training
        if mode:   # LayerDrop skips whole layers at random while training: a layer counts as run
            ran = _in_any_layer(am.model, ran)   # where its kind ran in some layer
        dead = _dead_sites(am.adapters.values(), ran)
        if dead:      # stays armed: every forward of this mode raises until the sites are gone
            raise CapabilityError(
                f"adapters {sorted(dead)} sit on layers whose forward did not run in this "
                f"{'training' if mode else 'eval'}-mode forward of {type(am.model).__name__}: "
                f"{', '.join(compress_paths(sorted(set().union(*dead.values()))))}. The model reads "
                "their weights directly (e.g. a fused kernel path) or does not call them, so those "
                "adapters would get no gradient. Delete the adapters and add them again excluding "
                "these layers")
        self.ran[mode] = ran
        self.sync(am)

    def _stop(self) -> None:
        if self._recording is not None:
            for handle in self._recording[1]:
                handle.remove()
            self._recording = None


def _in_any_layer(model: nn.Module, ran: frozenset[str]) -> frozenset[str]:
    """The paths of `model` whose form with the layer index left out ('encoder.layers.{}.fc1')
    is the form of a path that ran."""
    forms = {_layer_free(p) for p in ran}
    return frozenset(p for p, _ in iter_modules(model) if _layer_free(p) in forms)


def _layer_free(path: str) -> tuple[str, ...]:
    """`path`'s components with its first all-digit one (the layer index) blanked."""
    parts = path.split(".")
    at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return tuple(parts) if at is None else (*parts[:at], "", *parts[at + 1:])


def _dead_sites(adapters: Iterable[Any], ran: frozenset[str]) -> dict[str, set[str]]:
    """Adapter name -> its layer sites that are not among the paths that ran."""
    dead = {a.name: {p for p in a.layers if p not in ran} for a in adapters}
    return {name: paths for name, paths in dead.items() if paths}
