"""The `ban` command. Thin: parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import sys


def _add_info(commands) -> None:
    p = commands.add_parser("info", help="parameter count and FLOPs of a model configuration")
    p.add_argument("--preset", default="ban-8-vqa", help="a named preset (see `ban info --list`)")
    p.add_argument("--checkpoint", help="describe the model in this checkpoint instead")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--boxes", type=int, default=36, help="boxes per image for the FLOP count")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from ban import model as model_lib

    if args.list:
        for name, config in model_lib.PRESETS.items():
            print(f"{name}: {config}")
        return 0
    if args.checkpoint:
        from ban.checkpoint import load_any

        model = load_any(args.checkpoint)
        config = model.config
    else:
        config = model_lib.preset(args.preset)
        model = model_lib.build(config)
    print(model_lib.describe(model, boxes=args.boxes))
    return 0


def _add_convert_official(commands) -> None:
    p = commands.add_parser(
        "convert-official", help="convert an original-release checkpoint to this project's format"
    )
    p.add_argument("input", help="a .pth file of the original release")
    p.add_argument("output", help="directory to write (config.json, vocab, model.safetensors)")
    p.add_argument("--dictionary", help="the release's dictionary.pkl (word list)")
    p.add_argument("--label2ans", help="the release's trainval_label2ans.pkl (answer list)")
    p.set_defaults(func=_run_convert_official)


def _run_convert_official(args) -> int:
    from ban.official import convert_official

    path = convert_official(
        args.input, args.output, dictionary=args.dictionary, label2ans=args.label2ans
    )
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ban", description="Bilinear Attention Networks for VQA and phrase grounding"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_info(commands)
    _add_convert_official(commands)
    data = commands.add_parser("data", help="prepare datasets").add_subparsers(
        dest="data_command", required=True
    )
    _add_data_commands(data)
    return parser


def _add_data_commands(data) -> None:
    """`ban data ...`: registered by ban/data modules' parser functions below."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"ban: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
