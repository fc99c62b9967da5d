"""`effnet-timm`: the command line over effnet_timm's library functions.

This module imports nothing heavy at the top (no torch, timm or effnet_timm): `--help` and argument errors must be
instant. Each command is an arguments function (what argparse needs) and a runner that imports its library module
when the command actually runs. Add a command by writing both and listing it in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence

PROG = 'effnet-timm'
CROPS = ('padding32', 'fraction')  # effnet_timm.preprocessing's crop modes (kept here so --help needs no import)


class Command(NamedTuple):
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


# ----------------------------------------------------------------------------- predict


IMAGE_EXTENSIONS = '.jpg .jpeg .png .bmp .gif .webp .tif .tiff'  # effnet_timm.predict.IMAGE_EXTENSIONS, for --help
PREDICT_EPILOG = (
    'Exit status: 0 when every image was classified; 1 when some image could not be read or decoded (it is '
    'reported in the output with its error, and the others are still classified); 2 for bad arguments or weights.')


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = PREDICT_EPILOG
    p.add_argument('images', nargs='+', type=Path, metavar='IMAGE',
                   help=f'JPEG, PNG, ... files, or folders (their {IMAGE_EXTENSIONS} files, sorted by name)')
    p.add_argument('--model', help='effnet_v1_bN[.tag] (optional with weights made by effnet-convert: they record it)')
    p.add_argument('--weights', type=Path, metavar='FILE|DIR',
                   help='a folder written by effnet-convert, or a model.safetensors file; its recorded '
                        'architecture, tag and preprocessing are used. Default: the pretrained weights of --model')
    p.add_argument('--topk', type=positive_int, default=5, metavar='K', help='classes shown per image (default 5)')
    p.add_argument('--crop', choices=CROPS, default='padding32',
                   help='centre crop: 32 px padding as behind the published accuracies (default), or the '
                        'current official code\'s 0.875 fraction')
    p.add_argument('--compare-timm-preprocessing', action='store_true',
                   help="also run timm's own eval transform (PIL) and report how inputs and top-k differ")
    p.add_argument('--json', action='store_true', help='machine-readable output')


def _run_predict(args: argparse.Namespace) -> int:
    from effnet_timm.predict import format_predictions, image_files, load_model, predict

    images = image_files(args.images)  # before the model is built: a mistyped path fails at once
    model = load_model(args.model, args.weights)
    result = predict(model, images, args.topk, args.crop, args.compare_timm_preprocessing)
    print(json.dumps(result, indent=2) if args.json else format_predictions(result))
    if result['failed']:
        print(f"{PROG}: {result['failed']} of {len(result['images'])} images could not be classified "
              f"(their errors are in the output)", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- info


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('model', nargs='?', metavar='MODEL', help='one variant, effnet_v1_bN[.tag] (default: all)')
    p.add_argument('--json', action='store_true', help='machine-readable output')


def _run_info(args: argparse.Namespace) -> int:
    import timm

    from effnet_timm.info import format_info, variant_info

    names = [args.model] if args.model else timm.list_models('effnet_v1*')
    rows = [variant_info(name) for name in names]
    print(json.dumps(rows, indent=2) if args.json else format_info(rows))
    return 0


# ----------------------------------------------------------------------------- run


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('script', metavar='SCRIPT', help="a Python script, e.g. timm's train.py or validate.py")
    p.add_argument('script_args', nargs=argparse.REMAINDER, metavar='ARGS',
                   help="the script's own arguments, passed as sys.argv[1:] (options included)")


def _run_run(args: argparse.Namespace) -> int:
    from effnet_timm.scripts import run_script

    return run_script(args.script, args.script_args)


# ----------------------------------------------------------------------------- the command table


COMMANDS: Dict[str, Command] = {
    'predict': Command('top-k ImageNet classes of photos, with the official eval preprocessing',
                       _predict_arguments, _run_predict),
    'info': Command('parameters, GMACs, preprocessing and pretrained tags of the variants',
                    _info_arguments, _run_info),
    'run': Command("run a Python script (timm's train.py, validate.py, ...) with the effnet_v1_* models registered",
                   _run_arguments, _run_run),
}


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command (builds without importing torch)."""
    root = argparse.ArgumentParser(
        prog=PROG, description='Official TensorFlow EfficientNet V1 in timm: ' + ', '.join(COMMANDS) + '.')
    commands = root.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help[0].upper() + command.help[1:])
        command.arguments(sub)
        sub.set_defaults(run=command.run)
    return root


def _user_error(err: BaseException) -> bool:
    """Errors that are the user's to fix, reported in one line (importing their types only once one happened)."""
    if 'effnet_timm.errors' not in sys.modules and 'effnet_convert.errors' not in sys.modules:
        return False
    from effnet_convert.errors import CheckpointError
    from effnet_timm.errors import InputError, PretrainedWeightsError
    return isinstance(err, (InputError, PretrainedWeightsError, CheckpointError))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f'{PROG}: interrupted', file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - anything that is not a user error is re-raised with its traceback
        if not _user_error(err):
            raise
        from effnet_timm.errors import first_line
        print(f'{PROG}: error: {first_line(err)}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
