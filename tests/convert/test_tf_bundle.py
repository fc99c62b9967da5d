"""TensorBundle reader: bit-identical to TensorFlow (the oracle) and clear refusals of what it cannot read."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import crc32c
import numpy as np
import pytest
from conftest import FIXTURES, OFFICIAL, TINY_CKPT, save_v2

from effnet_convert.errors import CheckpointError
from effnet_convert.tf_bundle import TensorBundle, _read_table, _varint

B0 = OFFICIAL / 'efficientnet-b0'
DATA_SHARD = 'model.ckpt.data-00000-of-00001'


def assert_matches_tf(tf, prefix: Path) -> None:
    reader = tf.train.load_checkpoint(str(prefix))
    with TensorBundle(prefix) as bundle:
        assert sorted(bundle.keys()) == sorted(reader.get_variable_to_shape_map())
        for name in bundle:
            expected = np.asarray(reader.get_tensor(name))
            actual = bundle.get(name)
            assert actual.dtype == expected.dtype, name
            assert actual.shape == expected.shape == bundle.shape(name), name
            assert actual.tobytes() == expected.tobytes(), name  # bit-identical, NaN and -0.0 included


# ---------------------------------------------------------------------------------------------------------
# Oracle: every tensor of the official-format fixtures and of TF-written bundles


@pytest.mark.oracle
@pytest.mark.parametrize(
    'prefix',
    [TINY_CKPT, FIXTURES / 'efficientnet-tiny-rmsprop' / 'model.ckpt', B0 / 'model.ckpt'],
    ids=['tiny', 'tiny-rmsprop', 'b0'],
)
def test_fixture_identical_to_tf(tf, prefix: Path) -> None:
    if not Path(f'{prefix}.index').exists():
        pytest.skip(f'{prefix.parent} absent: shared/ is not beside the repo checkout')
    assert_matches_tf(tf, prefix)


def zoo_tensors(tf) -> dict:
    rng = np.random.default_rng(0)
    normal = rng.standard_normal
    return {
        'float32': tf.constant(normal((3, 2, 4)).astype(np.float32)),
        'float16': tf.constant(normal((2, 3)).astype(np.float16)),
        'bfloat16': tf.cast(tf.constant(normal(7).astype(np.float32)), tf.bfloat16),
        'float64': tf.constant(np.array([np.pi, -0.0, np.inf, np.nan])),
        'int8': tf.constant(np.array([-128, 0, 127], np.int8)),
        'uint8': tf.constant(np.array([0, 255], np.uint8)),
        'int16': tf.constant(np.array([-(2**15)], np.int16)),
        'uint16': tf.constant(np.array([2**16 - 1], np.uint16)),
        'int32': tf.constant(np.array([[-(2**31), 1], [2, 2**31 - 1]], np.int32)),
        'uint32': tf.constant(np.array([2**32 - 1], np.uint32)),
        'uint64': tf.constant(np.array([2**64 - 1], np.uint64)),
        'complex64': tf.constant(np.array([1 + 2j], np.complex64)),
        'complex128': tf.constant(np.array([3 - 4j])),
        'bool': tf.constant([True, False, True]),
        'global_step': tf.constant(123456789012, tf.int64),
        'scalar/float32': tf.constant(2.5),
        'empty/float32': tf.zeros([0, 3]),
        'empty/int64': tf.zeros([0], tf.int64),
    }


@pytest.fixture(scope='session')
def zoo(tf, tmp_path_factory) -> Path:
    return save_v2(tf, tmp_path_factory.mktemp('zoo') / 'model.ckpt', zoo_tensors(tf))


@pytest.fixture(scope='session')
def sharded(tf, tmp_path_factory) -> Path:
    """Two shards, made as a sharded Saver does: one SaveV2 per device, then MergeV2Checkpoints."""
    prefix = tmp_path_factory.mktemp('sharded') / 'model.ckpt'
    parts = [prefix.parent / 'model.ckpt_temp' / f'part-{i:05d}-of-00002' for i in range(2)]
    save_v2(
        tf,
        parts[0],
        {
            'a/kernel': tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4)),
            'c': tf.constant(7, tf.int64),
        },
    )
    save_v2(tf, parts[1], {'b/bias': tf.constant([1.5, -2.5]), 'd': tf.zeros([0], tf.int32)})
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[str(p) for p in parts], destination_prefix=str(prefix))
    return prefix


@pytest.fixture(scope='session')
def refusals(tf, tmp_path_factory) -> Path:
    """What tf.compat.v1.train.Saver writes for a partitioned variable (its slices), plus a string tensor."""
    prefix = tmp_path_factory.mktemp('refusals') / 'model.ckpt'
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        v1.get_variable('partitioned', shape=[4, 2], partitioner=v1.fixed_size_partitioner(2))
        v1.get_variable('plain', initializer=tf.constant(1.0))
        v1.get_variable('text', initializer=tf.constant([b'abc', b'']), trainable=False)
        with v1.Session() as session:
            session.run(v1.global_variables_initializer())
            v1.train.Saver().save(session, str(prefix))
    return prefix


@pytest.mark.oracle
def test_dtypes_and_shapes_identical_to_tf(tf, zoo: Path) -> None:
    assert_matches_tf(tf, zoo)
    with TensorBundle(zoo) as bundle:
        assert bundle.shape('scalar/float32') == ()
        assert bundle.shape('empty/float32') == (0, 3)
        assert bundle.global_step == 123456789012


@pytest.mark.oracle
def test_several_shards_identical_to_tf(tf, sharded: Path) -> None:
    assert_matches_tf(tf, sharded)
    with TensorBundle(sharded) as bundle:
        assert [p.name for p in bundle.files] == [
            'model.ckpt.index',
            'model.ckpt.data-00000-of-00002',
            'model.ckpt.data-00001-of-00002',
        ]


@pytest.mark.oracle
def test_partitioned_tensor_refused_others_readable(tf, refusals: Path) -> None:
    with TensorBundle(refusals) as bundle:
        # The slices' own binary keys stay hidden, as in TF's variable map.
        assert sorted(bundle.keys()) == sorted(tf.train.load_checkpoint(str(refusals)).get_variable_to_shape_map())
        assert bundle.shape('partitioned') == (4, 2)
        with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: tensor 'partitioned' is partitioned"):
            bundle.get('partitioned')
        assert bundle.get('plain') == 1.0


@pytest.mark.oracle
def test_string_tensor_refused(refusals: Path) -> None:
    with (
        TensorBundle(refusals) as bundle,
        pytest.raises(CheckpointError, match=r"'text': unsupported dtype 7 \(string\)"),
    ):
        bundle.get('text')


@pytest.mark.oracle
def test_bfloat16_without_ml_dtypes(zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, 'ml_dtypes', None)  # makes `import ml_dtypes` fail
    with (
        TensorBundle(zoo) as bundle,
        pytest.raises(CheckpointError, match=r"'bfloat16' is bfloat16, which needs the 'ml_dtypes' package"),
    ):
        bundle.get('bfloat16')


# ---------------------------------------------------------------------------------------------------------
# API behaviour (no TensorFlow needed)


def test_api_on_tiny_fixture() -> None:
    with TensorBundle(TINY_CKPT) as bundle:
        name = 'efficientnet-tiny/stem/conv2d/kernel'
        assert name in bundle and 'nope' not in bundle
        assert len(bundle) == len(bundle.keys()) == len(list(bundle))
        assert bundle.keys() == sorted(bundle.keys(), key=str.encode)
        assert bundle.dtype(name) == np.float32
        assert isinstance(bundle.global_step, int)
        items = bundle.items()
        assert isinstance(items, Iterator)
        first_name, first_value = next(items)
        assert first_name == bundle.keys()[0] and np.array_equal(first_value, bundle.get(first_name))
        kernel = bundle.get(name)
        assert kernel.shape == bundle.shape(name) and kernel.flags.writeable
        with pytest.raises(CheckpointError, match=r"model\.ckpt\.index: no tensor named 'nope'"):
            bundle.get('nope')
    # Arrays own their memory: closing the mmaps neither fails (no export held) nor invalidates them.
    assert kernel.sum() == np.frombuffer(kernel.tobytes(), np.float32).sum()
    with pytest.raises(ValueError, match='closed'):
        bundle.get(name)


def test_missing_index() -> None:
    with pytest.raises(CheckpointError, match=r'nowhere\.ckpt\.index: no such file'):
        TensorBundle(TINY_CKPT.parent / 'nowhere.ckpt')


# ---------------------------------------------------------------------------------------------------------
# Corrupt, truncated or unsupported files: each error names the file and the block or tensor


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    shutil.copytree(TINY_CKPT.parent, tmp_path / 'tiny')
    return tmp_path / 'tiny' / 'model.ckpt'


def _first_block_size(index: bytes) -> int:
    """Size of the first data block (at offset 0), from the first handle of the index block."""
    footer = index[-48:]
    _, pos = _varint(footer, 0)  # metaindex offset
    _, pos = _varint(footer, pos)  # metaindex size
    pos, _ = _varint(footer, pos)  # index block offset: read its first entry from there
    _, pos = _varint(index, pos)  # shared key bytes
    key_len, pos = _varint(index, pos)
    _, pos = _varint(index, pos)  # value length
    offset, pos = _varint(index, pos + key_len)
    size, _ = _varint(index, pos)
    assert offset == 0
    return size


def _patch_first_block(index_path: Path, at: int, new: bytes) -> None:
    """Overwrite bytes of the first block (or its compression byte) and re-seal its CRC, so the result is a
    *valid* table that says something else."""
    index = bytearray(index_path.read_bytes())
    size = _first_block_size(bytes(index))
    index[at : at + len(new)] = new
    crc = crc32c.crc32c(bytes(index[: size + 1]))
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    index[size + 1 : size + 5] = masked.to_bytes(4, 'little')
    index_path.write_bytes(bytes(index))


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('where', ['first block', 'middle', 'index block'])
def test_corrupt_index_byte(tiny: Path, where: str) -> None:
    index = Path(f'{tiny}.index')
    size = index.stat().st_size
    _flip_byte(index, {'first block': 1, 'middle': size // 2, 'index block': size - 48 - 20}[where])
    with pytest.raises(CheckpointError, match=r'model\.ckpt\.index: block at offset \d+: CRC32C mismatch \(stored 0x'):
        TensorBundle(tiny)


def test_corrupt_tensor_byte(tiny: Path) -> None:
    name = 'efficientnet-tiny/head/conv2d/kernel'
    with TensorBundle(tiny) as bundle:
        value = bundle.get(name)
    data = tiny.parent / DATA_SHARD
    start = data.read_bytes().find(value.tobytes())  # located independently of the reader's own offsets
    assert start >= 0
    _flip_byte(data, start + value.nbytes // 2)
    with TensorBundle(tiny) as bundle:
        with pytest.raises(CheckpointError, match=rf"{DATA_SHARD}: tensor '{name}': CRC32C mismatch"):
            bundle.get(name)
        bundle.get('efficientnet-tiny/stem/conv2d/kernel')  # other tensors are unaffected


@pytest.mark.parametrize(('keep', 'message'), [(-10, 'bad table magic'), (20, 'too short for a table footer')])
def test_truncated_index(tiny: Path, keep: int, message: str) -> None:
    index = Path(f'{tiny}.index')
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=rf'model\.ckpt\.index: {message}'):
        TensorBundle(tiny)


def test_truncated_data(tiny: Path) -> None:
    data = tiny.parent / DATA_SHARD
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{DATA_SHARD}: tensor '.+' extends past end of file"):
        TensorBundle(tiny)


@pytest.mark.oracle
def test_missing_shard(sharded: Path, tmp_path: Path) -> None:
    for path in sharded.parent.iterdir():
        shutil.copy(path, tmp_path)
    (tmp_path / 'model.ckpt.data-00001-of-00002').unlink()
    with pytest.raises(CheckpointError, match=r'model\.ckpt\.data-00001-of-00002: data shard missing'):
        TensorBundle(tmp_path / 'model.ckpt')


def test_big_endian_refused(tiny: Path) -> None:
    index = Path(f'{tiny}.index')
    # First entry: shared=0, key length 0, value length 6,
    # BundleHeaderProto{num_shards: 1, version {producer: 1}}.
    assert index.read_bytes()[:9] == b'\x00\x00\x06\x08\x01\x1a\x02\x08\x01'
    # Same length, still valid: {num_shards: 1, endianness: BIG, version {}}.
    _patch_first_block(index, 3, b'\x08\x01\x10\x01\x1a\x00')
    with pytest.raises(CheckpointError, match=r'model\.ckpt\.index: big-endian bundles are not supported'):
        TensorBundle(tiny)


def test_compressed_block_refused(tiny: Path) -> None:
    index = Path(f'{tiny}.index')
    size = _first_block_size(index.read_bytes())
    _patch_first_block(index, size, b'\x01')  # compression type byte: snappy
    with pytest.raises(CheckpointError, match=r'block at offset 0: compressed table blocks are not supported'):
        TensorBundle(tiny)


# ---------------------------------------------------------------------------------------------------------
# Indexes that say something else: written by a minimal table writer (checked against TF first)


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _sealed(block: bytes) -> bytes:
    crc = crc32c.crc32c(block + b'\x00')
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    return block + b'\x00' + masked.to_bytes(4, 'little')


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b''.join(_encode_varint(0) + _encode_varint(len(k)) + _encode_varint(len(v)) + k + v for k, v in entries)
    return body + (0).to_bytes(4, 'little') + (1).to_bytes(4, 'little')  # one restart point, at 0


def write_index(path: Path, pairs: list[tuple[bytes, bytes]]) -> None:
    """A LevelDB table as TensorBundle writes it (uncompressed), holding ``pairs`` in the order given."""
    data, meta = _block(pairs), _block([])
    table = _sealed(data)
    meta_offset = len(table)
    table += _sealed(meta)
    index = _block([(pairs[-1][0], _encode_varint(0) + _encode_varint(len(data)))])
    index_offset = len(table)
    table += _sealed(index)
    handles = _encode_varint(meta_offset) + _encode_varint(len(meta))
    handles += _encode_varint(index_offset) + _encode_varint(len(index))
    table += handles.ljust(40, b'\x00') + (0xDB4775248B80FB57).to_bytes(8, 'little')
    path.write_bytes(table)


def _header(num_shards: int) -> bytes:
    """BundleHeaderProto{num_shards, version {producer: 1}}."""
    return b'\x08' + _encode_varint(num_shards) + b'\x1a\x02\x08\x01'


@pytest.mark.oracle
def test_index_writer_is_read_by_tf(tf, tiny: Path) -> None:
    index = Path(f'{tiny}.index')
    write_index(index, _read_table(index))
    assert_matches_tf(tf, tiny)


@pytest.mark.oracle
def test_duplicate_tensor_key_refused(tf, tiny: Path) -> None:
    index = Path(f'{tiny}.index')
    pairs = _read_table(index)
    name = b'efficientnet-tiny/head/conv2d/kernel'
    at = next(i for i, (k, _) in enumerate(pairs) if k == name)
    # The second copy points at another tensor's bytes of the same size: TF reads the first copy, a dict the last.
    twin = next(v for k, v in pairs[1:] if k != name and _entry_size(v) == _entry_size(pairs[at][1]))
    write_index(index, [*pairs[: at + 1], (name, twin), *pairs[at + 1 :]])
    with pytest.raises(
        CheckpointError, match=r"model\.ckpt\.index: tensor 'efficientnet-tiny/head/conv2d/kernel' is listed twice"
    ):
        TensorBundle(tiny)


def _entry_size(value: bytes) -> int:
    from effnet_convert.tf_bundle import _parse_entry

    entry = _parse_entry(value)
    return entry.size if entry.dtype == 1 else -1


def test_shard_count_claim_bounded_by_shards_used(tiny: Path) -> None:
    """An index claiming millions of shards costs what the shards its tensors use cost (TF opens those only)."""
    index = Path(f'{tiny}.index')
    pairs = _read_table(index)
    write_index(index, [(b'', _header(3_000_000)), *pairs[1:]])
    (tiny.parent / DATA_SHARD).rename(tiny.parent / 'model.ckpt.data-00000-of-3000000')
    with TensorBundle(tiny) as bundle:
        assert [p.name for p in bundle.files] == ['model.ckpt.index', 'model.ckpt.data-00000-of-3000000']
        name = 'efficientnet-tiny/head/conv2d/kernel'
        with TensorBundle(TINY_CKPT) as original:
            assert bundle.get(name).tobytes() == original.get(name).tobytes()


def test_shard_id_beyond_header_refused(tiny: Path) -> None:
    index = Path(f'{tiny}.index')
    pairs = _read_table(index)
    with TensorBundle(tiny) as bundle:
        assert len(bundle.data_paths) == 1
    # Field 3 (shard_id) = 7 appended: protobuf takes the last value of a repeated scalar field.
    name = b'efficientnet-tiny/head/conv2d/kernel'
    pairs = [(k, v + b'\x18\x07' if k == name else v) for k, v in pairs]
    write_index(index, pairs)
    with pytest.raises(
        CheckpointError,
        match=r"model\.ckpt\.index: tensor 'efficientnet-tiny/head/conv2d/kernel': shard 7 out of "
        r'range \(0\.\.0\)',
    ):
        TensorBundle(tiny)


@pytest.mark.oracle
@pytest.mark.parametrize('value', ['vector', 'int32'])
def test_global_step_must_be_an_int64_scalar(tf, tmp_path: Path, value: str) -> None:
    step = tf.constant([1, 2], tf.int64) if value == 'vector' else tf.constant(5, tf.int32)
    prefix = save_v2(tf, tmp_path / 'model.ckpt', {'global_step': step, 'w': tf.zeros([2])})
    with TensorBundle(prefix) as bundle:
        with pytest.raises(
            CheckpointError, match=r"model\.ckpt\.index: tensor 'global_step': .* expected an int64 scalar"
        ):
            bundle.global_step
