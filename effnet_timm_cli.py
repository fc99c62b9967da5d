"""`effnet-timm`: the command line over effnet_timm's library functions.

This module imports nothing heavy at the top (no torch, timm or effnet_timm): `--help` and argument errors must be
instant. Each command is an arguments function (what argparse needs) and a runner that imports its library module
when the command actually runs. Add a command by writing both and listing it in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

PROG = 'effnet-timm'
CROPS = ('padding32', 'fraction')  # effnet_timm.data.preprocessing's crop modes (kept here so --help needs no import)


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


# ----------------------------------------------------------------------------- checks before the heavy imports

# effnet_timm's registered models and their pretrained tags (default first), copied here so that a mistyped name
# is answered before torch loads; tests/commands/test_cli_predict_info.py checks the copy against the registry.
MODEL_TAGS: dict[str, tuple[str, ...]] = {
    'effnet_v1': (),
    **{f'effnet_v1_b{i}': ('ns_jft_in1k', 'ap_in1k', 'aa_in1k', 'in1k') for i in range(5)},
    'effnet_v1_b5': ('ns_jft_in1k', 'ap_in1k', 'ra_in1k', 'aa_in1k', 'in1k'),
    'effnet_v1_b6': ('ns_jft_in1k', 'ap_in1k', 'aa_in1k'),
    'effnet_v1_b7': ('ns_jft_in1k', 'ap_in1k', 'ra_in1k', 'aa_in1k'),
    'effnet_v1_b8': ('ap_in1k', 'ra_in1k'),
    **{f'effnet_v1_condconv_b0_{e}': ('in1k',) for e in ('4e', '8e', '8e_depth')},
    **{f'effnet_v1_edgetpu_{s}': ('in1k',) for s in 'lms'},
    'effnet_v1_l2': ('ns_jft_in1k_475', 'ns_jft_in1k'),
    **{f'effnet_v1_lite{i}': ('in1k',) for i in range(5)},
}
TAG_NAMES = ('ns_jft_in1k_475', 'ns_jft_in1k', 'ap_in1k', 'ra_in1k', 'aa_in1k', 'in1k')  # effnet_timm.TAGS' order


def model_name_error(name: str) -> str | None:
    """Why ``name`` (MODEL or MODEL.TAG) is no registered model or pretrained tag; None when it is one."""
    arch, _, tag = name.partition('.')
    if arch not in MODEL_TAGS:
        return f"unknown model '{name}' (known: {', '.join(MODEL_TAGS)})"
    if tag and tag not in MODEL_TAGS[arch]:
        return f"{arch} has no pretrained tag '{tag}' (tags: {', '.join(MODEL_TAGS[arch]) or 'none'})"
    return None


def _model_and_weights_error(args: argparse.Namespace) -> str | None:
    if args.model is None and args.weights is None and args.command == 'predict':  # validate checks outputs first
        return 'give --model, --weights, or both'
    if args.weights is not None and not args.weights.exists():
        return f'{args.weights}: no such file or folder'
    return model_name_error(args.model) if args.model is not None else None


def _download_names_error(args: argparse.Namespace) -> str | None:
    if args.tag is not None and args.tag not in TAG_NAMES:
        return f"unknown tag '{args.tag}' (known: {', '.join(TAG_NAMES)})"
    everything = args.all or (args.list and not args.models and args.tag is None)  # as _run_download
    if not (args.models or args.tag or everything):
        return 'name the models (MODEL.TAG ...), a --tag, or --all'
    official = [arch for arch, tags in MODEL_TAGS.items() if tags]
    for name in [] if everything else args.models:
        arch, _, tag = name.partition('.')
        if arch not in official:
            return f"'{name}': not a model with official weights (known: {', '.join(sorted(official))})"
        tag = tag or args.tag or MODEL_TAGS[arch][0]
        if tag not in MODEL_TAGS[arch]:
            return f"'{arch}.{tag}': no such official checkpoint ({arch} has: {', '.join(MODEL_TAGS[arch])})"
    return None


def early_error(args: argparse.Namespace) -> str | None:
    """The first mistake in the arguments that needs no library to see: an unknown model or tag, a missing
    file. Checked before the command's imports (torch, timm: seconds), so that a typo is answered at once; the
    library checks the same things again, with the same words."""
    if args.command == 'predict':
        missing = next((path for path in args.images if not path.exists()), None)
        if missing is not None:
            return f'{missing}: cannot read image: no such file or folder'
        return _model_and_weights_error(args)
    if args.command == 'validate':
        data = args.data if args.data is not None else args.data_dir  # neither, both: the command says so
        if data is not None and not args.dataset and not data.exists():
            return f'{data}: no such folder'
        return _model_and_weights_error(args)
    if args.command == 'info':
        return model_name_error(args.model) if args.model else None
    if args.command == 'download':
        return _download_names_error(args)
    return None


# ----------------------------------------------------------------------------- predict


IMAGE_EXTENSIONS = (
    '.jpg .jpeg .png .bmp .gif .webp .tif .tiff'  # effnet_timm.commands.predict.IMAGE_EXTENSIONS, for --help
)
PREDICT_EPILOG = (
    'Exit status: 0 when every image was classified; 1 when some image could not be read or decoded (it is '
    'reported in the output with its error, and the others are still classified); 2 for bad arguments or weights.'
)


def _resize_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        '--resize',
        choices=('bicubic', 'bilinear'),
        help="TF1 resize (default: the model's official one: bilinear for Lite/EdgeTPU as their main.py, else "
        'bicubic; eval_ckpt_main.py resizes all bicubically)',
    )


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = PREDICT_EPILOG
    p.add_argument(
        'images',
        nargs='+',
        type=Path,
        metavar='IMAGE',
        help=f'JPEG, PNG, ... files, or folders (their {IMAGE_EXTENSIONS} files, sorted by name)',
    )
    p.add_argument('--model', help='effnet_v1_bN[.tag] (optional with weights made by effnet-convert: they record it)')
    p.add_argument(
        '--weights',
        type=Path,
        metavar='FILE|DIR',
        help='a folder written by effnet-convert, or a model.safetensors file; its recorded '
        'architecture, tag and preprocessing are used. Default: the pretrained weights of --model',
    )
    p.add_argument('--topk', type=positive_int, default=5, metavar='K', help='classes shown per image (default 5)')
    p.add_argument(
        '--crop',
        choices=CROPS,
        default='padding32',
        help='centre crop: 32 px padding as behind the published accuracies (default), or the '
        "current official code's 0.875 fraction",
    )
    _resize_argument(p)
    p.add_argument(
        '--compare-timm-preprocessing',
        action='store_true',
        help="also run timm's own eval transform (PIL) and report how inputs and top-k differ",
    )
    p.add_argument('--json', action='store_true', help='machine-readable output')


def _run_predict(args: argparse.Namespace) -> int:
    from effnet_timm.commands.predict import format_predictions, image_files, load_model, predict

    images = image_files(args.images)  # before the model is built: a mistyped path fails at once
    model = load_model(args.model, args.weights)
    result = predict(model, images, args.topk, args.crop, args.compare_timm_preprocessing, args.resize)
    print(json.dumps(result, indent=2) if args.json else format_predictions(result))
    if result['failed']:
        print(
            f'{PROG}: {result["failed"]} of {len(result["images"])} images could not be classified '
            f'(their errors are in the output)',
            file=sys.stderr,
        )
        return 1
    return 0


# ----------------------------------------------------------------------------- info


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('model', nargs='?', metavar='MODEL', help='one variant, effnet_v1_bN[.tag] (default: all)')
    p.add_argument('--json', action='store_true', help='machine-readable output')


def _run_info(args: argparse.Namespace) -> int:
    import timm

    from effnet_timm.commands.info import format_info, variant_info

    names = [args.model] if args.model else timm.list_models('effnet_v1*')
    rows = [variant_info(name) for name in names]
    print(json.dumps(rows, indent=2) if args.json else format_info(rows))
    return 0


# ----------------------------------------------------------------------------- run


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = timm_scripts_hint() + '.'
    # One REMAINDER positional for SCRIPT and its arguments: with SCRIPT a positional of its own, argparse
    # would eat a `--` right after it, which `python SCRIPT -- ...` passes on.
    p.add_argument(
        'argv',
        nargs=argparse.REMAINDER,
        metavar='SCRIPT [ARGS ...]',
        help="a Python script (e.g. timm's train.py or validate.py) and its own arguments, "
        'passed as sys.argv[1:] (options included)',
    )


TIMM_SCRIPTS = ('train.py', 'validate.py', 'inference.py', 'benchmark.py', 'avg_checkpoints.py')
TIMM_REPO_RAW = 'https://raw.githubusercontent.com/huggingface/pytorch-image-models'


def timm_scripts_hint() -> str:
    """Where timm's scripts of the installed timm version are (they are in its repository, not its wheel)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tag = f'v{version("timm")}'
    except PackageNotFoundError:
        tag = 'main'
    return (
        f"timm's {', '.join(TIMM_SCRIPTS[:2])} are not in its wheel; for the installed timm: "
        f'curl -LO {TIMM_REPO_RAW}/{tag}/train.py (or validate.py)'
    )


def _run_run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ['--'] else args.argv
    if not argv:
        print(f'{PROG} run: error: the following arguments are required: SCRIPT', file=sys.stderr)
        return 2
    script = Path(argv[0])
    if not script.exists():  # before torch loads
        hint = f'; {timm_scripts_hint()}' if script.name in TIMM_SCRIPTS else ''
        print(f'{PROG}: error: {script}: no such script{hint}', file=sys.stderr)
        return 2
    from effnet_timm.commands.scripts import run_script

    return run_script(argv[0], argv[1:])


# ----------------------------------------------------------------------------- validate


def _validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        'data',
        type=Path,
        nargs='?',
        metavar='DATA',
        help='ImageNet-val: a folder of synset folders (n01440764/...), a flat folder of '
        'ILSVRC2012_val_*.JPEG with its ground-truth file, or what --dataset names',
    )
    # timm validate.py's spellings, which a timm user types by habit.
    p.add_argument('--data-dir', type=Path, metavar='DATA', help='DATA, as timm validate.py spells it')
    p.add_argument('--model', help='effnet_v1_bN[.tag] (optional with weights made by effnet-convert: they record it)')
    p.add_argument(
        '--weights',
        type=Path,
        metavar='FILE|DIR',
        help='a folder written by effnet-convert, or a model.safetensors file (another safetensors file needs '
        '--model); default: the pretrained weights of the --model tag',
    )
    p.add_argument(
        '--dataset',
        default='',
        metavar='NAME',
        help="read DATA with timm's create_dataset (map-style: a folder or .tar, hfds/NAME)",
    )
    p.add_argument(
        '--ground-truth',
        type=Path,
        metavar='FILE',
        help="labels of a flat folder: LOC_val_solution.csv, the devkit's "
        'ILSVRC2012_validation_ground_truth.txt (with meta.mat beside it) or one synset per line '
        '(default: looked for in DATA and beside it)',
    )
    p.add_argument('-b', '--batch-size', type=positive_int, default=64, metavar='N', help='per process (default 64)')
    p.add_argument(
        '-j',
        '--workers',
        type=int,
        default=4,
        metavar='N',
        help='DataLoader worker processes decoding and preprocessing (default 4; 0: in the main process)',
    )
    p.add_argument(
        '--crop',
        choices=CROPS,
        default='padding32',
        help='centre crop: 32 px padding as behind the published accuracies (default), or the '
        "current official code's 0.875 fraction",
    )
    p.add_argument(
        '--crop-pct',
        type=float,
        metavar='F',
        help="crop fraction as timm's: resize to floor(size / F), centre crop (instead of --crop)",
    )
    p.add_argument(
        '--img-size',
        type=positive_int,
        metavar='N',
        help="input size (default: the model's; published: its table size)",
    )
    p.add_argument(
        '--pretrained',
        action='store_true',
        help="the --model tag's published weights (the default without --weights; accepted as timm's flag)",
    )
    p.add_argument(
        '--preprocessing',
        choices=('tf', 'timm'),
        default='tf',
        help="the official TF pipeline (default) or timm's own eval transform, for comparison",
    )
    _resize_argument(p)
    p.add_argument('--amp', choices=('bf16', 'fp16'), help='autocast the forward to this dtype')
    p.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    p.add_argument('--fuse', action='store_true', help='fold BatchNorm into the convs (effnet_timm.fuse)')
    p.add_argument('--limit', type=positive_int, metavar='N', help='only the first N images')
    p.add_argument('--device', help="torch device (default: 'cuda' if available, one GPU per torchrun rank; else cpu)")
    p.add_argument(
        '--skip-bad', action='store_true', help='count and list undecodable images instead of stopping at the first'
    )
    p.add_argument(
        '--results-file',
        type=Path,
        metavar='PATH.json|.csv',
        help="timm's result keys (model, top1, top1_err, top5, top5_err, param_count, img_size, "
        'crop_pct, interpolation) and num_images',
    )
    p.add_argument('--per-image', type=Path, metavar='PATH.csv', help='path, label and top-5 classes of every image')
    p.add_argument(
        '--no-progress',
        action='store_true',
        help='no progress bar (there is none either when stderr is not a terminal)',
    )
    p.add_argument('--json', action='store_true', help='print the whole result as JSON')


def _run_validate(args: argparse.Namespace) -> int:
    from effnet_timm.commands.validate import check_output_path, format_result, validate, write_per_image, write_results

    check_output_path(args.results_file, ('.json', '.csv'), '--results-file')
    check_output_path(args.per_image, ('.csv',), '--per-image')
    from effnet_timm.commands.outputs import check_distinct
    from effnet_timm.errors import InputError

    check_distinct({'--results-file': args.results_file, '--per-image': args.per_image})

    if args.workers < 0:
        raise InputError(f'--workers must be >= 0, got {args.workers}')
    if (args.data is None) == (args.data_dir is None):
        raise InputError(
            'give DATA or --data-dir (one of them)' if args.data is None else 'give DATA or --data-dir, not both'
        )
    if args.pretrained and args.weights is not None:
        raise InputError("--pretrained means the --model tag's published weights; --weights gives others: not both")
    if args.crop_pct is not None and args.crop != 'padding32':
        raise InputError('--crop and --crop-pct both choose the crop: give one')
    result = validate(
        args.data if args.data is not None else args.data_dir,
        args.model,
        args.weights,
        dataset=args.dataset,
        ground_truth=args.ground_truth,
        batch_size=args.batch_size,
        workers=args.workers,
        crop=args.crop,
        img_size=args.img_size,
        crop_pct=args.crop_pct,
        preprocessing=args.preprocessing,
        amp=args.amp,
        channels_last=args.channels_last,
        fuse=args.fuse,
        limit=args.limit,
        device=args.device,
        skip_bad=args.skip_bad,
        progress=not args.no_progress and sys.stderr.isatty(),  # a bar in a pipe or a log is noise
        interpolation=args.resize,
    )
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.results_file:
        write_results(result, args.results_file)
    if args.per_image:
        write_per_image(result, args.per_image)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


# ----------------------------------------------------------------------------- download


def _download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        'models',
        nargs='*',
        metavar='MODEL[.TAG]',
        help='e.g. effnet_v1_b0.aa_in1k; a bare effnet_v1_bN takes --tag, else its default tag',
    )
    p.add_argument(
        '--tag',
        metavar='TAG',
        help='the family of the bare names (in1k, aa_in1k, ra_in1k, ap_in1k, '
        'ns_jft_in1k, ns_jft_in1k_475); alone: every model of that family',
    )
    p.add_argument('--all', action='store_true', help='every official checkpoint (with --tag: of that family)')
    p.add_argument(
        '--no-progress',
        action='store_true',
        help='no progress bar (there is none either when stderr is not a terminal)',
    )
    p.add_argument('--json', action='store_true', help='machine-readable output')
    p.add_argument(
        '--list',
        action='store_true',
        help='print MODEL.TAG and its official URL (every one when none is named): what a mirror must hold',
    )
    p.add_argument('--verify', action='store_true', help='hash the cached entries again instead of downloading')
    p.add_argument(
        '--record-pins',
        nargs='?',
        const='',
        metavar='FILE',
        help='maintainers: fetch the official tarballs and record their sha256 and size in FILE '
        '(default: effnet_timm/weights/pins.json)',
    )


def _run_download(args: argparse.Namespace) -> int:
    from effnet_timm.commands.outputs import check_weights_cache
    from effnet_timm.weights import prefetch as weights_prefetch
    from effnet_timm.weights.prefetch import format_rows, prefetch, rows_as_json, select_names

    everything = args.all or (args.list and not args.models and args.tag is None)
    pairs = select_names(args.models, args.tag, everything)
    progress = False if args.no_progress else None
    if args.list:
        print(weights_prefetch.list_official(pairs))
        return 0
    if args.verify:
        rows = weights_prefetch.verify_cached(pairs)
    elif args.record_pins is not None:
        rows = weights_prefetch.record_pins(pairs, args.record_pins or None, progress)
    else:
        check_weights_cache(pairs)  # one line before any download, not one failed row per model
        rows = prefetch(pairs, progress=progress)
    print(json.dumps(rows_as_json(rows), indent=2) if args.json else format_rows(rows))
    for row in rows:
        if row.error:
            print(f'{PROG}: error: {row.error}', file=sys.stderr)
    return 2 if any(row.error for row in rows) else 0


# ----------------------------------------------------------------------------- the command table


COMMANDS: dict[str, Command] = {
    'predict': Command(
        'top-k ImageNet classes of photos, with the official eval preprocessing', _predict_arguments, _run_predict
    ),
    'info': Command('parameters, GMACs, preprocessing and pretrained tags of the variants', _info_arguments, _run_info),
    'validate': Command(
        'ImageNet-val accuracy with the official preprocessing, in one process or under torchrun',
        _validate_arguments,
        _run_validate,
    ),
    'run': Command(
        "run a Python script (timm's train.py, validate.py, ...) with the effnet_v1_* models registered",
        _run_arguments,
        _run_run,
    ),
    'download': Command(
        'fetch official checkpoints, convert them and fill the weights cache (for offline use later)',
        _download_arguments,
        _run_download,
    ),
}


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command (builds without importing torch)."""
    root = argparse.ArgumentParser(
        prog=PROG, description='Official TensorFlow EfficientNet V1 in timm: ' + ', '.join(COMMANDS) + '.'
    )
    commands = root.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help[0].upper() + command.help[1:])
        command.arguments(sub)
        sub.set_defaults(run=command.run)
    return root


def _user_error(err: BaseException) -> bool:
    """Errors that are the user's to fix, reported in one line (importing their types only once one happened)."""
    if 'effnet_timm.errors' not in sys.modules:
        return False
    from effnet_timm.errors import InputError, PretrainedWeightsError  # CheckpointError is an InputError

    return isinstance(err, (InputError, PretrainedWeightsError))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    error = early_error(args)
    if error is not None:
        print(f'{PROG}: error: {error}', file=sys.stderr)
        return 2
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
