"""The `peftlab` command. Each subcommand is a function `cmd_<name>(args)` registered in `main`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PeftlabError


def load_model_skeleton(path: str):
    """The model class a local transformers directory declares, built on the meta device: the
    module tree without reading or allocating any weights."""
    import torch
    import transformers

    if not Path(path).is_dir():
        raise PeftlabError(f"--model {path!r} is not a directory; give a local transformers model "
                           "directory (with config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PeftlabError(f"cannot read a transformers config in {path}: {e}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def _compress(paths: list[str]) -> list[str]:
    """'model.layers.{0-29}.self_attn.q_proj' for a run of paths that differ in the layer index."""
    from .sites import layer_index
    groups: dict[str, list[int]] = {}
    singles = []
    for p in paths:
        idx = layer_index(p)
        if idx is None:
            singles.append(p)
            continue
        parts = p.split(".")
        at = next(i for i, part in enumerate(parts) if part.isdigit())
        groups.setdefault(".".join(parts[:at] + ["{}"] + parts[at + 1:]), []).append(idx)
    out = []
    for template, idx in groups.items():
        idx = sorted(idx)
        span = str(idx[0]) if len(idx) == 1 else (
            f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx)))
        out.append(template.replace("{}", "{" + span + "}"))
    return out + singles


def cmd_inspect(args: argparse.Namespace) -> int:
    from .sites import describe_sites, model_family
    model = load_model_skeleton(args.model)
    print(f"{type(model).__name__}  (architecture map: {model_family(model)})")
    for role, paths in describe_sites(model).items():
        shown = paths if args.full else _compress(paths)
        print(f"  {role:<9} {len(paths):>4}  {shown[0]}")
        for p in shown[1:]:
            print(f"  {'':<9} {'':>4}  {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab", description="Parameter-efficient fine-tuning on one reference architecture.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="list a model's PEFT-Ref sites: role -> module paths")
    p.add_argument("--model", required=True, help="local transformers model directory")
    p.add_argument("--full", action="store_true", help="one line per module instead of per layer range")
    p.set_defaults(run=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except PeftlabError as e:
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
