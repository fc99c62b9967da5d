"""`effnet-convert`: official TF checkpoint → a folder timm loads."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .converter import ConversionResult, convert
from .errors import CheckpointError

DEMO_CHECKPOINT = Path(__file__).resolve().parent / 'demo' / 'efficientnet-tiny'
DEMO_IMAGE_SIZE = 96


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='effnet-convert',
        description='Convert an official tensorflow/tpu EfficientNet checkpoint into safetensors + timm config.')
    parser.add_argument('source', nargs='?', help='checkpoint directory, prefix, .tar.gz or URL '
                        '(default: the embedded scaled-down official checkpoint, a demo)')
    parser.add_argument('--out', required=True, type=Path, help='output folder (created atomically)')
    parser.add_argument('--variant', help='expected architecture, e.g. effnet_v1_b0 (checked against the tensors)')
    parser.add_argument('--tag', help='checkpoint family: in1k, aa_in1k, ra_in1k, ap_in1k, ns_jft_in1k, '
                        'ns_jft_in1k_475 (guessed from an official file name when omitted)')
    parser.add_argument('--no-ema', dest='ema', action='store_false',
                        help='use the raw variables instead of their ExponentialMovingAverage shadows')
    parser.add_argument('--allow-partial-ema', action='store_true',
                        help='use raw values where a variable has no EMA shadow')
    parser.add_argument('--image-size', type=int, help='input size for the config (default: the variant\'s)')
    parser.add_argument('--sha256', help='expected sha256 of a tarball SOURCE')
    parser.add_argument('--verify', action='store_true',
                        help='compare logits with TensorFlow on sample photos (needs tensorflow)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    source, image_size = args.source, args.image_size
    if source is None:
        source, image_size = str(DEMO_CHECKPOINT), image_size or DEMO_IMAGE_SIZE
    try:
        result = convert(
            source, args.out, variant=args.variant, tag=args.tag, ema=args.ema,
            allow_partial_ema=args.allow_partial_ema, image_size=image_size, sha256=args.sha256,
            verify=args.verify, overwrite=args.overwrite, progress=not args.quiet)
    except CheckpointError as err:
        print(f'effnet-convert: error: {err}', file=sys.stderr)
        return 2
    print(summary(result))
    if result.verification is not None and not result.verification['passed']:
        print('effnet-convert: error: verification failed (see above); the folder was written for inspection',
              file=sys.stderr)
        return 1
    return 0


def summary(result: ConversionResult) -> str:
    arch = result.architecture
    extra = '' if arch.variant != 'effnet_v1' else f', width_coefficient={arch.width}, depth_coefficient={arch.depth}'
    rows = [
        ('architecture', f'{arch.variant} (width {arch.width}, depth {arch.depth}), {arch.num_classes} classes, '
                         f'TF scope {arch.scope}'),
        ('tensors', f'{result.num_tensors} ({result.num_parameters:,} parameters), '
                    f'{"EMA shadows" if result.ema_used else "raw variables"}'),
        ('tag', result.tag or 'none'),
        ('seconds', f'{result.seconds:.1f}'),
    ]
    if result.verification is not None:
        v = result.verification
        rows.append(('verification', f'{"PASSED" if v["passed"] else "FAILED"}: max |dlogit| '
                     f'{v["max_abs_diff"]:.3g} ({v["max_rel_diff"]:.3g} of max |logit|), top-5 identical on '
                     f'{v["top5_identical"]}/{v["images"]} photos vs {v["reference"]}'))
    else:
        rows.append(('verification', 'not run (add --verify; needs tensorflow)'))
    rows += [(('note', n)) for n in result.notes]
    rows.append(('load with', f"timm.create_model('{arch.variant}', pretrained=True{extra}, "
                              f"pretrained_cfg_overlay=dict(file='{result.out_dir / 'model.safetensors'}'))"))
    width = max(len(k) for k, _ in rows)
    return '\n'.join([f'converted -> {result.out_dir}'] + [f'  {k:<{width}}  {v}' for k, v in rows])


if __name__ == '__main__':
    sys.exit(main())
