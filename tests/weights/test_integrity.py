"""effnet_timm.weights.integrity: records of converted files and their check, against hashlib and hand-made folders."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from effnet_timm.errors import InputError
from effnet_timm.weights.integrity import file_digests, verify_folder


def _folder(tmp_path: Path, data: bytes = b'weights' * 1000, record=None) -> Path:
    folder = tmp_path / 'f'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes(data)
    config = {'architecture': 'effnet_v1_b0'}
    if record is not None:
        config['effnet_timm'] = {'files': record}
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


def test_file_digests_match_hashlib(tmp_path):
    data = bytes(range(256)) * 10_000 + b'tail'  # several read chunks, and a short last one
    folder = _folder(tmp_path, data)
    (folder / 'README.md').write_text('card')
    assert file_digests(folder) == {
        'model.safetensors': {'sha256': hashlib.sha256(data).hexdigest(), 'size': len(data)}
    }
    both = file_digests(folder, ('model.safetensors', 'README.md'))
    assert both['README.md'] == {'sha256': hashlib.sha256(b'card').hexdigest(), 'size': 4}


def test_matching_folder_passes_and_a_changed_byte_fails(tmp_path):
    data = b'x' * 5000
    folder = _folder(
        tmp_path, data, {'model.safetensors': {'sha256': hashlib.sha256(data).hexdigest(), 'size': len(data)}}
    )
    verify_folder(folder)
    (folder / 'model.safetensors').write_bytes(b'y' + data[1:])
    with pytest.raises(
        InputError,
        match=rf'model\.safetensors: sha256 {hashlib.sha256(b"y" + data[1:]).hexdigest()[:12]}…, '
        rf'expected {hashlib.sha256(data).hexdigest()[:12]}…',
    ):
        verify_folder(folder)


def test_size_is_compared_first(tmp_path, monkeypatch):
    folder = _folder(tmp_path, b'abc', {'model.safetensors': {'sha256': '0' * 64, 'size': 4}})
    import effnet_timm.weights.integrity as integrity

    monkeypatch.setattr(integrity, 'sha256_file', lambda path: pytest.fail('hashed a file of the wrong size'))
    with pytest.raises(InputError, match=r'model\.safetensors: 3 bytes, expected 4'):
        verify_folder(folder)


@pytest.mark.parametrize('config', [None, {}, {'effnet_timm': {'source': 'x'}}])
def test_folders_without_records_are_not_checked(tmp_path, config):
    folder = tmp_path / 'f'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes(b'anything')
    if config is not None:
        (folder / 'config.json').write_text(json.dumps(config))
    verify_folder(folder)  # older conversions and other tools' folders load as before


def test_recorded_file_missing(tmp_path):
    folder = _folder(tmp_path, record={'model.safetensors': {'sha256': '0' * 64, 'size': 1}})
    (folder / 'model.safetensors').unlink()
    with pytest.raises(InputError, match=r'model\.safetensors: missing \(recorded in .*config\.json\)'):
        verify_folder(folder)


@pytest.mark.parametrize(
    'record,message',
    [
        ({'../model.safetensors': {'sha256': '0' * 64, 'size': 1}}, 'not a plain file name'),
        ({'/etc/passwd': {'sha256': '0' * 64, 'size': 1}}, 'not a plain file name'),
        ({'model.safetensors': {'sha256': 'abc', 'size': 1}}, 'expected'),
        ({'model.safetensors': {'sha256': '0' * 64, 'size': -1}}, 'expected'),
        ({'model.safetensors': {'sha256': '0' * 64, 'size': True}}, 'expected'),
        ({'model.safetensors': 'deadbeef'}, 'expected'),
        (['model.safetensors'], "'effnet_timm.files' is list"),
    ],
)
def test_malformed_records_are_errors(tmp_path, record, message):
    folder = _folder(tmp_path, record=record)
    with pytest.raises(InputError, match=message) as info:
        verify_folder(folder)
    assert 'config.json' in str(info.value) and '\n' not in str(info.value)


def test_unparsable_config(tmp_path):
    folder = _folder(tmp_path)
    (folder / 'config.json').write_text('{"effnet_timm": ')
    with pytest.raises(InputError, match=r'config\.json: not valid JSON'):
        verify_folder(folder)


def test_module_imports_neither_tensorflow_nor_the_converter():
    code = (
        'import sys; import effnet_timm.weights.integrity\n'
        'bad = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "effnet_convert")]\n'
        'assert not bad, bad'
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_digest_file_matches_independent_implementations(tmp_path):
    """One pass, several digests: each against its reference (hashlib, the crc32c package, `git hash-object`)."""
    import base64
    import hashlib
    import shutil
    import subprocess

    import crc32c

    from effnet_timm.weights.integrity import digest_file

    data = bytes(range(256)) * 9000  # several read chunks
    path = tmp_path / 'f.bin'
    path.write_bytes(data)
    found = digest_file(path, ('sha256', 'md5', 'md5_b64', 'crc32c', 'git_blob'))
    assert found['sha256'] == hashlib.sha256(data).hexdigest() and found['md5'] == hashlib.md5(data).hexdigest()
    assert found['md5_b64'] == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert found['crc32c'] == base64.b64encode(crc32c.crc32c(data).to_bytes(4, 'big')).decode()
    if shutil.which('git'):
        assert (
            found['git_blob']
            == subprocess.run(['git', 'hash-object', str(path)], capture_output=True, text=True).stdout.strip()
        )
