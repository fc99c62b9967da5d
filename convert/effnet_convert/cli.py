"""`effnet-convert`: official TF checkpoint → a folder timm loads.

Arguments are parsed before anything heavy is imported (torch, timm, effnet_timm, the converter), so
`--help` and argument errors are instant; each runner imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .converter import ConversionResult
    from .hub import FamilyRow

DEMO_CHECKPOINT = Path(__file__).resolve().parent / 'demo' / 'efficientnet-tiny'
DEMO_IMAGE_SIZE = 96
MAX_IMAGE_SIZE = 4096  # effnet_convert.converter.MAX_IMAGE_SIZE (a copy: checked before torch loads)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='effnet-convert',
        description='Convert an official tensorflow/tpu EfficientNet checkpoint into safetensors + timm config.',
        epilog='Publishing on the Hugging Face Hub: effnet-convert push FOLDER --help, '
        'effnet-convert publish-family TARBALL_DIR --help',
    )
    parser.add_argument(
        'source',
        nargs='?',
        help='checkpoint directory, prefix, .tar.gz or URL '
        '(default: the embedded scaled-down official checkpoint, a demo)',
    )
    parser.add_argument('--out', required=True, type=Path, help='output folder (created atomically)')
    parser.add_argument('--variant', help='expected architecture, e.g. effnet_v1_b0 (checked against the tensors)')
    parser.add_argument(
        '--tag',
        help='checkpoint family: in1k, aa_in1k, ra_in1k, ap_in1k, ns_jft_in1k, ns_jft_in1k_475; when omitted, taken '
        'from an official location (.../<family folder>/<official file name>) or a pinned sha256, never guessed: a '
        "checkpoint whose families differ in mean/std is refused. 'none': no family (ImageNet mean/std written, "
        'choose the preprocessing when loading)',
    )
    parser.add_argument(
        '--no-ema',
        dest='ema',
        action='store_false',
        help='use the raw variables instead of their ExponentialMovingAverage shadows',
    )
    parser.add_argument(
        '--allow-partial-ema', action='store_true', help='use raw values where a variable has no EMA shadow'
    )
    parser.add_argument('--image-size', type=int, help="input size for the config, 1 to 4096 (default: the variant's)")
    parser.add_argument('--sha256', help='expected sha256 of a tarball SOURCE')
    parser.add_argument(
        '--verify', action='store_true', help='compare logits with TensorFlow on sample photos (needs tensorflow)'
    )
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _SUBCOMMANDS:
        return _SUBCOMMANDS[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
    source, image_size = args.source, args.image_size
    if source is None:
        source = str(DEMO_CHECKPOINT)
        image_size = DEMO_IMAGE_SIZE if image_size is None else image_size
    error = _early_error(source, args.variant, args.tag, image_size)
    if error is not None:
        print(f'effnet-convert: error: {error}', file=sys.stderr)
        return 2
    from effnet_timm.errors import InputError

    try:
        from effnet_timm.commands.outputs import check_output_folder

        check_output_folder(args.out, '--out', made_beside=True)  # before any download or read
        from .converter import convert

        result = convert(
            source,
            args.out,
            variant=args.variant,
            tag=args.tag,
            ema=args.ema,
            allow_partial_ema=args.allow_partial_ema,
            image_size=image_size,
            sha256=args.sha256,
            verify=args.verify,
            overwrite=args.overwrite,
            progress=not args.quiet and sys.stderr.isatty(),  # a bar in a pipe or a log is noise
        )
    except InputError as err:
        print(f'effnet-convert: error: {err}', file=sys.stderr)
        return 2
    print(summary(result))
    if result.verification is not None and not result.verification['passed']:
        print(
            'effnet-convert: error: verification failed (see above); the folder was written for inspection',
            file=sys.stderr,
        )
        return 1
    return 0


def _early_error(source: str, variant: str | None, tag: str | None, image_size: int | None) -> str | None:
    """A mistake in the arguments seen without torch (the converter checks again, with the same words)."""
    from effnet_timm_cli import MODEL_TAGS, TAG_NAMES  # the light copy of the registry's names

    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
        return f'image size {image_size}: expected a whole number of pixels, 1 to {MAX_IMAGE_SIZE}'
    if tag is not None and tag not in TAG_NAMES:
        return f"unknown tag '{tag}' (known: {', '.join(TAG_NAMES)})"
    official = [name for name, tags in MODEL_TAGS.items() if tags]
    if variant is not None and variant not in MODEL_TAGS:
        return f"unknown variant '{variant}' (known: {', '.join(official)})"
    path = Path(source).expanduser()
    if not source.startswith(('http://', 'https://')) and not path.exists() and not Path(f'{path}.index').exists():
        return f'{path}: not a checkpoint directory, prefix, .index file, .tar.gz/.tgz/.tar or URL (no {path}.index)'
    return None


def summary(result: ConversionResult) -> str:
    arch = result.architecture
    rows = [
        (
            'architecture',
            f'{arch.variant} (width {arch.width}, depth {arch.depth}), {arch.num_classes} classes, '
            f'TF scope {arch.scope}',
        ),
        (
            'tensors',
            f'{result.num_tensors} ({result.num_parameters:,} parameters), '
            f'{"EMA shadows" if result.ema_used else "raw variables"}',
        ),
        ('tag', result.tag or 'none'),
        ('seconds', f'{result.seconds:.1f}'),
    ]
    if result.verification is not None:
        v = result.verification
        rows.append(
            (
                'verification',
                f'{"PASSED" if v["passed"] else "FAILED"}: max |dlogit| '
                f'{v["max_abs_diff"]:.3g} ({v["max_rel_diff"]:.3g} of max |logit|), top-5 identical on '
                f'{v["top5_identical"]}/{v["images"]} photos vs {v["reference"]}',
            )
        )
    else:
        rows.append(('verification', 'not run (add --verify; needs tensorflow)'))
    rows += [(('note', n)) for n in result.notes]
    # local-dir: reads config.json, so the folder's architecture, mean/std, crop and tag all come along;
    # a bare architecture name with only a file overlay would get the default tag's preprocessing.
    rows.append(
        ('load with', f"import effnet_timm, timm; timm.create_model('local-dir:{result.out_dir}', pretrained=True)")
    )
    if result.tag:
        rows.append(
            (
                'or',
                f"timm.create_model('{arch.variant}.{result.tag}', pretrained=True, "
                f"pretrained_cfg_overlay=dict(file='{result.out_dir / 'model.safetensors'}'))",
            )
        )
    width = max(len(k) for k, _ in rows)
    return '\n'.join([f'converted -> {result.out_dir}'] + [f'  {k:<{width}}  {v}' for k, v in rows])


def _push_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='effnet-convert push',
        description='Publish a converted folder (model.safetensors, config.json, README.md) on the Hugging Face Hub '
        'in one commit. The token comes from HF_TOKEN or `hf auth login`.',
    )
    parser.add_argument('folder', type=Path, help='a folder written by effnet-convert')
    parser.add_argument(
        '--repo-id', help="ORG/NAME (default: the official effnet_timm.HUB_ORG/<variant>.<tag> of the folder's tag)"
    )
    parser.add_argument('--private', action='store_true', help='create the repo private (if it does not exist)')
    parser.add_argument('--revision', help='branch to commit to, created if missing (default: main)')
    return parser


def _push(argv: list[str]) -> int:
    args = _push_parser().parse_args(argv)
    from effnet_timm.errors import InputError

    from .hub import HubError, push_folder

    try:
        result = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision)
    except (InputError, HubError) as err:
        print(f'effnet-convert push: error: {err}', file=sys.stderr)
        return 2 if isinstance(err, InputError) else 1
    where = f'{result.repo_id}@{result.revision}'
    print(
        f'pushed {args.folder} -> {where}, commit {result.commit}'
        if result.changed
        else f'up to date: {where} already holds these files (commit {result.commit}); nothing committed'
    )
    rev = '' if result.revision == 'main' else f'@{result.revision}'
    print(f"load with: import effnet_timm, timm; timm.create_model('hf-hub:{result.repo_id}{rev}', pretrained=True)")
    pin = _pin_line(args.folder, result.repo_id, result.commit)
    if pin:
        print(pin)
    return 0


def _pin_line(folder: Path, repo_id: str, commit: str) -> str | None:
    """The TAGS pin that makes a publish to the registered repo the default source of its tag (none is taken
    from the Hub unpinned), or None for another repo."""
    from effnet_timm.weights.tags import hub_repo_id

    try:
        config = json.loads((Path(folder) / 'config.json').read_text(encoding='utf-8'))
        variant, tag = config['architecture'], config['pretrained_cfg'].get('tag')
        sha256 = config['effnet_timm']['files']['model.safetensors']['sha256']
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not tag or repo_id != hub_repo_id(variant, tag):
        return None
    return (
        f"pin: to load {variant}.{tag} from this commit by default, add to TAGS['{tag}'].hub_pins in "
        f"effnet_timm/weights/tags.py: '{variant}': HubPin('{commit}', '{sha256}')"
    )


def _family_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='effnet-convert publish-family',
        description='Convert and publish every official checkpoint tarball of one family (e.g. efficientnet-b0.tar.gz '
        '... for aa_in1k) to ORG/<variant>.<tag>. Running it again resumes: kept conversions are '
        'reused and repos that already hold the same files are left alone.',
    )
    parser.add_argument('tarball_dir', type=Path, help='folder holding the official .tar.gz files')
    parser.add_argument(
        '--tag', required=True, help='the family: in1k, aa_in1k, ra_in1k, ap_in1k, ns_jft_in1k, ns_jft_in1k_475'
    )
    parser.add_argument(
        '--org', help='Hub organization (default: effnet_timm.HUB_ORG, the one registered tags load from)'
    )
    parser.add_argument('--out', type=Path, help='where conversions are kept (default: TARBALL_DIR/converted)')
    parser.add_argument('--private', action='store_true', help='create missing repos private')
    parser.add_argument('--verify', action='store_true', help='verify each conversion against TensorFlow')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    return parser


def _publish_family(argv: list[str]) -> int:
    args = _family_parser().parse_args(argv)
    from effnet_timm.errors import InputError
    from effnet_timm.weights.tags import HUB_ORG

    from .hub import publish_family

    try:
        if args.out is not None and not args.out.is_dir():  # an existing one may hold every conversion already
            from effnet_timm.commands.outputs import check_output_folder

            check_output_folder(args.out, '--out')
        rows = publish_family(
            args.tarball_dir,
            args.tag,
            org=args.org or HUB_ORG,
            out_dir=args.out,
            private=args.private,
            verify=args.verify,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except InputError as err:
        print(f'effnet-convert publish-family: error: {err}', file=sys.stderr)
        return 2
    print(_table(rows))
    return 0 if all(r.status in ('pushed', 'up to date', 'ignored') for r in rows) else 1


def _table(rows: list[FamilyRow]) -> str:
    cells = [('tarball', 'repo', 'status', 'detail')] + [(r.tarball, r.repo_id, r.status, r.detail) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]  # the last column runs on unpadded
    return '\n'.join('  '.join([*(c.ljust(w) for c, w in zip(row, widths)), row[3]]) for row in cells)


_SUBCOMMANDS = {'push': _push, 'publish-family': _publish_family}


if __name__ == '__main__':
    sys.exit(main())
