"""`effnet-timm predict` and `effnet-timm info` end to end, on converted official checkpoints; output is parsed."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import FIXTURES, REPO, SAMPLES, load_manifest, shared_path
from timm.data import ImageNetInfo
from torch.utils.flop_counter import FlopCounterMode

import effnet_timm  # noqa: F401  (registers the models)
from effnet_convert.converter import convert
from effnet_timm.models.complexity import count_params_and_macs
from effnet_timm_cli import main

TINY = FIXTURES / 'efficientnet-tiny'
PHOTOS = sorted(SAMPLES.glob('*.jpg'))  # not the fixtures' order: results must be matched by name
ROW = re.compile(r'^  (\d+)\s+([0-9.]+)\s+(\d+)\s+(.*)$')
TIMM_LINE = re.compile(r'^  timm eval transform .*\|dx\| mean ([0-9.]+) max ([0-9.]+); (.*)$')


@pytest.fixture(scope='module')
def tiny_dir(converted_tiny) -> Path:
    return converted_tiny


@pytest.fixture(scope='module')
def b0_dir(converted_b0) -> Path:
    return converted_b0


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _parse_table(text: str) -> dict[str, list[tuple[int, float, str]]]:
    """image stem -> [(class index, probability, name)] in rank order, from the text output."""
    results: dict[str, list[tuple[int, float, str]]] = {}
    current = None
    for line in text.splitlines():
        if line.endswith('.jpg') and not line.startswith(' '):
            current = results.setdefault(Path(line).stem, [])
        elif current is not None and (match := ROW.match(line)):
            rank, prob, index, name = match.groups()
            assert int(rank) == len(current) + 1
            current.append((int(index), float(prob), name))
    return results


def _official(fixture: Path) -> dict[str, np.ndarray]:
    """image name -> official EMA logits, in the fixture's photo order."""
    logits = np.load(fixture / 'logits_ema.npy')
    return {image['name']: row for image, row in zip(load_manifest(fixture / 'manifest.json')['images'], logits)}


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()


def _top5(logits: np.ndarray) -> list[int]:
    return np.argsort(-logits, kind='stable')[:5].tolist()


def test_predict_on_converted_demo_gives_the_official_top5_and_probabilities(capsys, tiny_dir):
    # The fixture was made by the current official code: crop fraction 0.875 at 96 px.
    code, out, err = _cli(capsys, 'predict', *PHOTOS, '--weights', tiny_dir, '--crop', 'fraction')
    assert code == 0, err
    assert 'effnet_v1 ' in out and '14 px padding (fraction' in out
    predictions = _parse_table(out)
    official = _official(TINY)
    assert sorted(predictions) == sorted(official)
    names = ImageNetInfo()
    for image, logits in official.items():
        rows = predictions[image]
        assert [index for index, _, _ in rows] == _top5(logits), image
        assert [name for _, _, name in rows] == [names.index_to_description(i) for i in _top5(logits)]
        np.testing.assert_allclose([p for _, p, _ in rows], _softmax(logits)[_top5(logits)], atol=1e-3)
    # The label map is the standard ImageNet-1k order (no off-by-one background class).
    assert predictions['chelsea'][0][0] == 401 and predictions['chelsea'][0][2].startswith('accordion')


@pytest.mark.oracle
def test_predict_b0_weights_file_at_224_gives_the_official_top5(capsys, b0_dir):
    code, out, err = _cli(
        capsys, 'predict', *PHOTOS, '--weights', b0_dir / 'model.safetensors', '--model', 'effnet_v1_b0', '--json'
    )
    assert code == 0, err
    result = json.loads(out)
    assert result['preprocessing']['input_size'] == 224 and result['preprocessing']['crop_padding'] == 32
    official = _official(shared_path('efficientnet-b0'))
    by_image = {Path(entry['image']).stem: entry['top'] for entry in result['images']}
    assert sorted(by_image) == sorted(official)
    for image, logits in official.items():
        assert [row['index'] for row in by_image[image]] == _top5(logits), image
        np.testing.assert_allclose(
            [row['probability'] for row in by_image[image]], _softmax(logits)[_top5(logits)], atol=1e-3
        )


@pytest.mark.oracle
def test_tag_overrides_the_preprocessing_of_a_folder(capsys, b0_dir):
    code, out, err = _cli(
        capsys, 'predict', PHOTOS[0], '--weights', b0_dir, '--model', 'effnet_v1_b0.ap_in1k', '--json'
    )
    assert code == 0, err
    result = json.loads(out)
    assert result['model']['name'] == 'effnet_v1_b0.ap_in1k'
    assert result['preprocessing']['mean'] == result['preprocessing']['std'] == [0.5, 0.5, 0.5]


def test_compare_timm_preprocessing_reports_the_input_difference(capsys, tiny_dir):
    code, out, err = _cli(capsys, 'predict', PHOTOS[0], '--weights', tiny_dir, '--compare-timm-preprocessing')
    assert code == 0, err
    lines = [m for line in out.splitlines() if (m := TIMM_LINE.match(line))]
    assert len(lines) == 1
    mean_diff, max_diff, verdict = float(lines[0].group(1)), float(lines[0].group(2)), lines[0].group(3)
    # PIL's antialiased resize then crop is not TF1 bicubic of a crop: the inputs must differ.
    assert 0 < mean_diff < max_diff
    top1, top5 = r'top-1 (same|changed to \d+ \(.*\))', r'top-5 (same|reordered|changed \([0-4]/5 shared\))'
    assert re.fullmatch(f'{top1}; {top5}', verdict), verdict


def test_compare_timm_json_matches_timm_run_directly(capsys, tiny_dir):
    code, out, err = _cli(capsys, 'predict', PHOTOS[0], '--weights', tiny_dir, '--compare-timm-preprocessing', '--json')
    assert code == 0, err
    reported = json.loads(out)['images'][0]['timm_preprocessing']
    model = timm.create_model(f'local-dir:{tiny_dir}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    from PIL import Image

    with Image.open(PHOTOS[0]) as img, torch.inference_mode():
        probs = model(transform(img.convert('RGB'))[None]).softmax(-1)[0]
    assert [row['index'] for row in reported['top']] == probs.topk(5).indices.tolist()
    assert reported['max_abs_diff'] > reported['mean_abs_diff'] > 0


def test_compare_timm_uses_the_official_crop(capsys, tiny_dir):
    # --crop fraction pads 14 px at 96 where the model's crop_pct (0.75) means 32: timm must crop like TF.
    code, out, err = _cli(
        capsys,
        'predict',
        PHOTOS[0],
        '--weights',
        tiny_dir,
        '--compare-timm-preprocessing',
        '--crop',
        'fraction',
        '--json',
    )
    assert code == 0, err
    result = json.loads(out)
    pre, reported = result['preprocessing'], result['images'][0]['timm_preprocessing']
    assert pre['crop_padding'] == 14 and math.floor(96 / pre['timm_crop_pct']) == 96 + 14
    model = timm.create_model(f'local-dir:{tiny_dir}', pretrained=True).eval()
    transform = timm.data.create_transform(
        **timm.data.resolve_data_config({'crop_pct': 0.87}, model=model)
    )  # 96 / 0.87: 110
    from PIL import Image

    with Image.open(PHOTOS[0]) as img, torch.inference_mode():
        probs = model(transform(img.convert('RGB'))[None]).softmax(-1)[0]
    assert [row['index'] for row in reported['top']] == probs.topk(5).indices.tolist()


@pytest.mark.parametrize('size', [96, 224, 240, 260, 300, 380, 456, 528, 600, 800])
@pytest.mark.parametrize('crop', ['padding32', 'fraction'])
def test_timm_aligned_crop_pct_resizes_to_the_official_size(size, crop):
    from effnet_timm.commands.predict import timm_aligned_config
    from effnet_timm.data.preprocessing import TfEvalTransform, tf_crop_padding

    padding = tf_crop_padding(size, crop)
    crop_pct = timm_aligned_config({}, TfEvalTransform(size, padding, None, None))['crop_pct']
    assert crop_pct == round(crop_pct, 4) and math.floor(size / crop_pct) == size + padding  # timm's scale_size


@pytest.mark.parametrize('case', ['missing image', 'empty folder', 'unknown model', 'folder of another model'])
def test_bad_input_is_one_line_and_exit_2(capsys, tiny_dir, tmp_path, case):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('not a photo')
    args = {
        'missing image': ('predict', tmp_path / 'absent.jpg', '--weights', tiny_dir),
        'empty folder': ('predict', tmp_path / 'empty', '--weights', tiny_dir),
        'unknown model': ('predict', PHOTOS[0], '--model', 'effnet_v1_b9'),
        'folder of another model': ('predict', PHOTOS[0], '--weights', tiny_dir, '--model', 'effnet_v1_b0'),
    }[case]
    code, out, err = _cli(capsys, *args)
    assert code == 2 and out == ''
    assert len(err.splitlines()) == 1 and err.startswith('effnet-timm: error: ')
    expected = {
        'missing image': 'absent.jpg: cannot read image',
        'empty folder': 'empty: a folder with no image files',
        'unknown model': "unknown model 'effnet_v1_b9'",
        'folder of another model': 'holds effnet_v1, not effnet_v1_b0',
    }[case]
    assert expected in err


def _not_safetensors(kind: str, path: Path) -> Path:
    if kind == 'text':
        path.write_text('these are not weights\n')
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'torch pickle':
        torch.save(timm.create_model('effnet_v1_b0').state_dict(), path)
    elif kind == 'numpy':
        with open(path, 'wb') as f:
            np.save(f, np.zeros(3, np.float32))
    return path


@pytest.mark.parametrize('kind', ['text', 'empty', 'torch pickle', 'numpy'])
def test_weights_file_that_is_not_safetensors_is_one_line_and_exit_2(capsys, tmp_path, kind):
    # Before: IndexError (pop from empty list), EOFError, KeyError tracebacks, or pickle advice.
    weights = _not_safetensors(kind, tmp_path / 'weights.bin')
    code, out, err = _cli(capsys, 'predict', PHOTOS[0], '--weights', weights, '--model', 'effnet_v1_b0')
    assert code == 2 and out == ''
    [line] = err.splitlines()
    assert line.startswith(f'effnet-timm: error: {weights}: not a safetensors file (')


def test_an_undecodable_image_is_reported_and_the_others_still_classified(capsys, tiny_dir, tmp_path):
    broken = tmp_path / 'broken.jpg'
    broken.write_text('not a photo')
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    images = [PHOTOS[0], broken, PHOTOS[1], empty]
    code, out, err = _cli(capsys, 'predict', *images, '--weights', tiny_dir, '--crop', 'fraction', '--json')
    assert code == 1
    assert err.splitlines() == ['effnet-timm: 2 of 4 images could not be classified (their errors are in the output)']
    result = json.loads(out)
    assert [entry['image'] for entry in result['images']] == [str(p) for p in images] and result['failed'] == 2
    official = _official(TINY)
    for entry, path in zip(result['images'], images):
        if path in PHOTOS:
            assert 'error' not in entry and [r['index'] for r in entry['top']] == _top5(official[path.stem])
        else:
            assert 'top' not in entry and entry['error'].startswith('cannot decode image')
    code, out, err = _cli(capsys, 'predict', *images, '--weights', tiny_dir, '--crop', 'fraction')
    assert code == 1
    assert out.count('  error: cannot decode image') == 2
    table = _parse_table(out)
    assert [index for index, _, _ in table[PHOTOS[1].stem]] == _top5(official[PHOTOS[1].stem])


def test_a_folder_as_image_means_its_image_files_sorted(capsys, tiny_dir, tmp_path):
    folder = tmp_path / 'photos'
    folder.mkdir()
    names = ['b.JPG', 'a.jpeg', 'c.jpg', 'd.png']
    for name, photo in zip(names, PHOTOS):
        (folder / name).write_bytes(photo.read_bytes())
    (folder / 'notes.txt').write_text('not an image')
    (folder / '.thumb.jpg').write_text('a hidden file')
    (folder / 'sub.jpg').mkdir()
    code, out, err = _cli(capsys, 'predict', folder, PHOTOS[0], '--weights', tiny_dir, '--crop', 'fraction', '--json')
    assert code == 0, err
    result = json.loads(out)
    assert [Path(e['image']).name for e in result['images']] == sorted(names) + [PHOTOS[0].name]
    official = _official(TINY)
    for entry in result['images']:
        photo = PHOTOS[names.index(Path(entry['image']).name)] if Path(entry['image']).parent == folder else PHOTOS[0]
        assert [r['index'] for r in entry['top']] == _top5(official[photo.stem])


def test_generic_model_name_keeps_the_folders_input_size(capsys, tiny_dir):
    # Before: --model effnet_v1 took the registry's 224 px instead of the folder's 96.
    code, out, err = _cli(
        capsys, 'predict', *PHOTOS, '--weights', tiny_dir, '--model', 'effnet_v1', '--crop', 'fraction', '--json'
    )
    assert code == 0, err
    result = json.loads(out)
    assert result['preprocessing']['input_size'] == 96 and result['preprocessing']['crop_padding'] == 14
    official = _official(TINY)
    for entry in result['images']:
        assert [r['index'] for r in entry['top']] == _top5(official[Path(entry['image']).stem])


def _folder_with_records(source: Path, dest: Path) -> Path:
    """A copy of a converted folder whose config.json records its file digests (as effnet-convert writes)."""
    from effnet_timm.weights.integrity import file_digests

    shutil.copytree(source, dest)
    config = json.loads((dest / 'config.json').read_text())
    if not config['effnet_timm'].get('files'):
        config['effnet_timm']['files'] = file_digests(dest)
        (dest / 'config.json').write_text(json.dumps(config, indent=2))
    return dest


def test_a_flipped_byte_in_converted_weights_is_refused(capsys, tiny_dir, tmp_path):
    intact = _folder_with_records(tiny_dir, tmp_path / 'intact')
    damaged = _folder_with_records(tiny_dir, tmp_path / 'damaged')
    data = bytearray((damaged / 'model.safetensors').read_bytes())
    data[-7] ^= 0x10  # inside the last tensor: the file still parses, one weight is different
    (damaged / 'model.safetensors').write_bytes(bytes(data))
    for weights in (intact, intact / 'model.safetensors'):
        code, out, err = _cli(capsys, 'predict', PHOTOS[0], '--weights', weights)
        assert code == 0, err
    for weights in (damaged, damaged / 'model.safetensors'):
        code, out, err = _cli(capsys, 'predict', PHOTOS[0], '--weights', weights)
        assert code == 2 and out == ''
        [line] = err.splitlines()
        assert line.startswith(f'effnet-timm: error: {damaged / "model.safetensors"}: sha256 '), line


@pytest.fixture(scope='module')
def b0_ap_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('cli') / 'b0_ap'
    convert(str(shared_path('efficientnet-b0')), out, tag='ap_in1k')
    return out


@pytest.mark.oracle
def test_weights_converted_with_a_tag_use_that_tags_preprocessing_and_name(capsys, b0_ap_dir, tmp_path):
    # Before: --model effnet_v1_b0 named the default tag (ns_jft_in1k) and used ImageNet mean/std.
    bare = tmp_path / 'weights.safetensors'  # away from its folder: only the file's metadata says what it is
    shutil.copyfile(b0_ap_dir / 'model.safetensors', bare)
    for weights, model in (
        (b0_ap_dir / 'model.safetensors', 'effnet_v1_b0'),
        (bare, 'effnet_v1_b0'),
        (bare, None),
        (b0_ap_dir, 'effnet_v1_b0.ap_in1k'),
    ):
        args = ('--model', model) if model else ()
        code, out, err = _cli(capsys, 'predict', PHOTOS[0], '--weights', weights, *args, '--json')
        assert code == 0, err
        result = json.loads(out)
        assert result['model']['name'] == 'effnet_v1_b0.ap_in1k', (weights, model)
        # AdvProp's inputs are in [-1, 1]: mean = std = 0.5 (the official advprop preprocessing).
        assert result['preprocessing']['mean'] == result['preprocessing']['std'] == [0.5, 0.5, 0.5]
        assert result['preprocessing']['input_size'] == 224


@pytest.mark.oracle
@pytest.mark.parametrize('where', ['folder', 'file'])
def test_a_model_tag_contradicting_the_recorded_tag_is_an_error(capsys, b0_ap_dir, where):
    weights = b0_ap_dir if where == 'folder' else b0_ap_dir / 'model.safetensors'
    code, out, err = _cli(capsys, 'predict', PHOTOS[0], '--weights', weights, '--model', 'effnet_v1_b0.aa_in1k')
    assert code == 2 and out == ''
    [line] = err.splitlines()
    assert 'converted with --tag ap_in1k' in line and 'asks for tag aa_in1k' in line


def test_help_and_argument_errors_import_no_torch():
    script = """
import json, sys
import effnet_timm_cli
for argv in (['--help'], ['predict', '--help'], ['info', '--help']):
    try:
        effnet_timm_cli.parser().parse_args(argv)
    except SystemExit as err:
        assert err.code == 0, argv
try:
    effnet_timm_cli.main(['predict', '--topk', '0', 'x.jpg'])
except SystemExit as err:
    code = err.code
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'effnet_timm', 'numpy', 'PIL'))
print(json.dumps(dict(code=code, heavy=heavy)))
"""
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == dict(code=2, heavy=[])
    assert 'argument --topk: must be >= 1, got 0' in proc.stderr


def test_predict_without_available_weights_prints_the_pretrained_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'effnet_timm_cli', 'predict', str(PHOTOS[0]), '--model', 'effnet_v1_b0.aa_in1k'],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path / 'empty')},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ''
    [line] = proc.stderr.splitlines()
    assert line.startswith('effnet-timm: error: effnet_v1_b0.aa_in1k: could not load pretrained weights')
    assert 'HF_HUB_OFFLINE=1' in line and 'effnet-convert' in line  # no unpinned Hub repo is asked


@pytest.fixture(scope='module')
def info_rows(info_output) -> dict[str, dict[str, str]]:
    header, *lines = info_output.splitlines()
    assert header.split()[:6] == ['model', 'params', 'GMACs', 'input', 'crop_pct', 'mean/std']
    rows = {}
    for line in lines:
        if match := re.match(r'^(effnet_v1\S*)\s+([\d,]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+(\S+)\s+(.*)$', line):
            rows[match.group(1)] = dict(
                zip(('params', 'gmacs', 'input', 'crop_pct', 'mean_std', 'tags'), match.groups()[1:])
            )
    return rows


def test_info_lists_every_registered_variant(info_rows):
    assert sorted(info_rows) == sorted(timm.list_models('effnet_v1*'))
    assert info_rows['effnet_v1_b0']['tags'] == 'ns_jft_in1k, ap_in1k*, aa_in1k, in1k'
    assert info_rows['effnet_v1_b3']['input'] == '300' and info_rows['effnet_v1_b3']['crop_pct'] == '0.903'
    assert info_rows['effnet_v1']['tags'] == 'none'


def test_info_b0_params_and_gmacs_match_published_numbers(info_rows):
    b0 = info_rows['effnet_v1_b0']
    params = int(b0['params'].replace(',', ''))
    assert params == 5_288_548 == sum(p.numel() for p in timm.create_model('effnet_v1_b0').parameters())
    # timm's table: 0.39 GMACs for tf_efficientnet_b0; torchvision: 0.39 GFLOPS (MACs) for efficientnet_b0.
    assert 0.38 <= float(b0['gmacs']) <= 0.40 and round(float(b0['gmacs']), 2) == 0.39
    assert b0['input'] == '224' and b0['mean_std'] == 'imagenet'


def test_info_l2_is_counted_on_the_meta_device(info_rows):
    l2 = info_rows['effnet_v1_l2']
    assert f'{int(l2["params"].replace(",", "")) / 1e6:.2f}M' == '480.31M'
    assert l2['input'] == '800' and l2['tags'] == 'ns_jft_in1k_475@475, ns_jft_in1k'
    assert float(l2['gmacs']) > 400


def test_meta_device_count_equals_a_real_forward():
    params, macs = count_params_and_macs('effnet_v1_b0', 64)
    model = timm.create_model('effnet_v1_b0').eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert macs * 2 == counter.get_total_flops() and params == sum(p.numel() for p in model.parameters())


def test_info_one_tag_json(capsys):
    code, out, err = _cli(capsys, 'info', 'effnet_v1_b0.ap_in1k', '--json')
    assert code == 0, err
    [row] = json.loads(out)
    assert row['model'] == 'effnet_v1_b0.ap_in1k' and row['params'] == 5_288_548
    assert row['mean'] == row['std'] == [0.5, 0.5, 0.5]
    assert [t['tag'] for t in row['tags']] == ['ap_in1k']


def test_the_fronts_copies_of_library_constants_agree():
    # The front keeps copies so that --help imports nothing heavy; they must not drift.
    import effnet_timm_cli
    from effnet_timm.commands.predict import CROPS, IMAGE_EXTENSIONS

    assert effnet_timm_cli.IMAGE_EXTENSIONS.split() == list(IMAGE_EXTENSIONS)
    assert effnet_timm_cli.CROPS == CROPS
