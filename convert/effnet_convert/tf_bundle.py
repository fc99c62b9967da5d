"""Read TensorFlow V2 checkpoints (TensorBundle: ``<prefix>.index`` + ``<prefix>.data-*``) without TensorFlow.

Format: tensorflow/core/util/tensor_bundle/tensor_bundle.{proto,cc} for the entries and the LevelDB-derived
table of tensorflow/core/lib/io/{format,block,table}.cc for the index file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from .errors import CheckpointError

_FOOTER_SIZE = 48  # two BlockHandles padded to 20 bytes each, then the 8-byte magic
_TABLE_MAGIC = 0xDB4775248B80FB57
_BLOCK_TRAILER_SIZE = 5  # compression type byte + masked CRC32C
_CRC_MASK_DELTA = 0xA282EAD8
_HEADER_KEY = b''
_BIG_ENDIAN = 1

# tensorflow/core/framework/types.proto enum -> little-endian numpy type (bundles store host order, and
# we refuse big-endian bundles).
_NUMPY_DTYPES = {
    1: '<f4',  # float32
    2: '<f8',  # float64
    3: '<i4',  # int32
    4: 'u1',  # uint8
    5: '<i2',  # int16
    6: 'i1',  # int8
    8: '<c8',  # complex64
    9: '<i8',  # int64
    10: '?',  # bool, one byte like numpy's
    17: '<u2',  # uint16
    18: '<c16',  # complex128
    19: '<f2',  # float16
    22: '<u4',  # uint32
    23: '<u8',  # uint64
}
_DT_BFLOAT16 = 14
# Named only to make the refusal readable; they have no fixed-size element layout.
_UNSUPPORTED_NAMES = {7: 'string', 20: 'resource', 21: 'variant'}


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    masked_crc: int
    sliced: bool


def _unmask(masked: int) -> int:
    rot = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError('truncated varint')
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError('varint longer than 10 bytes')


def _int64(value: int) -> int:
    """Protobuf int64 fields carry negative numbers as 10-byte two's complement varints."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _as_int(value: int | bytes) -> int:
    if isinstance(value, bytes):
        raise ValueError('expected a number field, found a length-delimited one')
    return value


def _as_bytes(value: int | bytes) -> bytes:
    if isinstance(value, int):
        raise ValueError('expected a length-delimited field, found a number')
    return value


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message; unknown fields are for the caller to ignore."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire_type = tag & 7
        value: int | bytes
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value = int.from_bytes(buf[pos : pos + width], 'little')
            pos += width
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            value = buf[pos : pos + length]
            pos += length
        else:
            raise ValueError(f'unsupported protobuf wire type {wire_type}')
        if pos > len(buf):
            raise ValueError('truncated protobuf field')
        yield tag >> 3, value


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for field, value in _proto_fields(buf):
        if field == 2:
            size = 0
            for dim_field, dim_value in _proto_fields(_as_bytes(value)):
                if dim_field == 1:
                    size = _int64(_as_int(dim_value))
            if size < 0:
                raise ValueError(f'unknown dimension ({size})')
            dims.append(size)
        elif field == 3 and value:
            raise ValueError('unknown rank')
    return tuple(dims)


def _parse_entry(buf: bytes) -> _Entry:
    fields: dict[int, int | bytes] = {}
    sliced = False
    for field, value in _proto_fields(buf):
        if field == 7:
            sliced = True
        else:
            fields[field] = value
    return _Entry(
        dtype=_as_int(fields.get(1, 0)),
        shape=_parse_shape(_as_bytes(fields.get(2, b''))),
        shard_id=_as_int(fields.get(3, 0)),
        offset=_as_int(fields.get(4, 0)),
        size=_as_int(fields.get(5, 0)),
        masked_crc=_as_int(fields.get(6, 0)),
        sliced=sliced,
    )


def _parse_header(buf: bytes) -> tuple[int, int]:
    """(num_shards, endianness) of a BundleHeaderProto."""
    num_shards = endianness = 0
    for field, value in _proto_fields(buf):
        if field == 1:
            num_shards = _as_int(value)
        elif field == 2:
            endianness = _as_int(value)
    return num_shards, endianness


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of one table block, undoing the keys' prefix compression."""
    if len(block) < 4:
        raise ValueError('block shorter than its restart count')
    (num_restarts,) = struct.unpack_from('<I', block, len(block) - 4)
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise ValueError(f'restart array of {num_restarts} entries does not fit the block')
    entries = []
    key = b''
    pos = 0
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise ValueError('entry overruns the block')
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def _read_block(table: bytes, name: str, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """Entries of the block at ``offset`` after checking its trailer (CRC32C, no compression)."""
    where = f'{name}: block at offset {offset}'
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(table) - _FOOTER_SIZE:
        raise CheckpointError(f'{where}: extends past the end of the table ({len(table)} bytes)')
    stored = _unmask(int.from_bytes(table[end + 1 : end + _BLOCK_TRAILER_SIZE], 'little'))
    computed = crc32c.crc32c(table[offset : end + 1])
    if stored != computed:
        raise CheckpointError(f'{where}: CRC32C mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})')
    if table[end] != 0:
        raise CheckpointError(
            f'{where}: compressed table blocks are not supported (compression type {table[end]}, expected 0)'
        )
    try:
        return _block_entries(table[offset:end])
    except ValueError as exc:
        raise CheckpointError(f'{where}: malformed block ({exc})') from None


def _read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """All key/value pairs of an index table, every block CRC-checked."""
    name = str(path)
    try:
        table = path.read_bytes()  # the index is small (tens of KB); the data shards are mapped instead
    except FileNotFoundError:
        raise CheckpointError(f'{name}: no such file') from None
    except OSError as exc:
        raise CheckpointError(f'{name}: cannot read ({exc.strerror})') from None
    return _parse_table(table, name)


def _parse_table(table: bytes, name: str) -> list[tuple[bytes, bytes]]:
    """All key/value pairs of the index table ``table`` (the bytes of file ``name``), every block CRC-checked."""
    if len(table) < _FOOTER_SIZE:
        raise CheckpointError(f'{name}: too short for a table footer ({len(table)} < {_FOOTER_SIZE} bytes); truncated?')
    footer = table[-_FOOTER_SIZE:]
    magic = int.from_bytes(footer[-8:], 'little')
    if magic != _TABLE_MAGIC:
        raise CheckpointError(
            f'{name}: bad table magic (expected 0x{_TABLE_MAGIC:016x}, found 0x{magic:016x}); truncated or not an index'
        )
    try:
        meta_offset, pos = _varint(footer, 0)
        meta_size, pos = _varint(footer, pos)
        index_offset, pos = _varint(footer, pos)
        index_size, _ = _varint(footer, pos)
    except ValueError as exc:
        raise CheckpointError(f'{name}: malformed table footer ({exc})') from None
    # TensorBundle writes the metaindex block empty: read it only to verify its CRC.
    _read_block(table, name, meta_offset, meta_size)
    entries = []
    for _, handle in _read_block(table, name, index_offset, index_size):
        try:
            offset, pos = _varint(handle, 0)
            size, _ = _varint(handle, pos)
        except ValueError as exc:
            raise CheckpointError(f'{name}: malformed block handle in the index block ({exc})') from None
        entries.extend(_read_block(table, name, offset, size))
    return entries


def _parse_index(pairs: list[tuple[bytes, bytes]], name: str) -> tuple[int, dict[str, _Entry]]:
    """(num_shards, {tensor name: entry}) of a bundle index's key/value pairs."""
    if not pairs or pairs[0][0] != _HEADER_KEY:
        raise CheckpointError(f'{name}: no bundle header entry; not a TensorBundle index')
    entries: dict[str, _Entry] = {}
    key = _HEADER_KEY
    try:
        num_shards, endianness = _parse_header(pairs[0][1])
        for key, value in pairs[1:]:
            # Slices of partitioned tensors are stored under binary keys starting with a 0 byte
            # (checkpoint::EncodeTensorNameSlice); the full tensor's own entry lists them.
            if key.startswith(b'\x00'):
                continue
            tensor = key.decode('utf-8')
            if tensor in entries:
                # TF's reader stops at the first match, a dict keeps the last: refuse rather than pick.
                raise CheckpointError(f"{name}: tensor '{tensor}' is listed twice in the index")
            entries[tensor] = _parse_entry(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f'{name}: entry {key!r}: malformed ({exc})') from None
    if endianness == _BIG_ENDIAN:
        raise CheckpointError(f'{name}: big-endian bundles are not supported')
    if endianness != 0:
        raise CheckpointError(f'{name}: unknown endianness {endianness} in the bundle header')
    if num_shards < 1:
        raise CheckpointError(f'{name}: bundle header claims {num_shards} data shards')
    for tensor, entry in entries.items():
        if not entry.sliced and not 0 <= entry.shard_id < num_shards:
            raise CheckpointError(
                f"{name}: tensor '{tensor}': shard {entry.shard_id} out of range (0..{num_shards - 1})"
            )
    return num_shards, entries


def declared_data_size(index: bytes, name: str) -> int:
    """Bytes of tensor data an index's entries claim (what its data shards must hold), index CRC-checked.

    Lets an archive be judged before it is unpacked: what it may expand to is bounded by this."""
    _, entries = _parse_index(_parse_table(index, name), name)
    return sum(entry.size for entry in entries.values() if not entry.sliced)


def _map_file(path: Path) -> mmap.mmap | bytes:
    try:
        with open(path, 'rb') as f:
            # mmap refuses empty files; an empty shard can only hold empty tensors.
            if os.fstat(f.fileno()).st_size == 0:
                return b''
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: data shard missing') from None
    except OSError as exc:
        raise CheckpointError(f'{path}: cannot read ({exc.strerror})') from None


class TensorBundle:
    """A TF V2 checkpoint opened read-only: index parsed and CRC-checked now, tensors read on demand.

    Data shards are memory-mapped, never read whole. Use it as a context manager (or call ``close``) to
    unmap them.
    """

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = Path(prefix)
        self.index_path = Path(f'{self.prefix}.index')
        self._maps: list[mmap.mmap | bytes] | None = None
        num_shards, self._entries = _parse_index(_read_table(self.index_path), str(self.index_path))
        # Only the shards some tensor lives in: the header's count is a claim (an 80-byte index can say
        # millions), and TF's reader too opens a shard only when a tensor in it is read.
        used = sorted({e.shard_id for e in self._entries.values() if not e.sliced} or {0})
        self._shard_slot = {shard: slot for slot, shard in enumerate(used)}
        self.data_paths = [Path(f'{self.prefix}.data-{i:05d}-of-{num_shards:05d}') for i in used]
        self._maps = []
        try:
            for path in self.data_paths:
                self._maps.append(_map_file(path))
            self._check_extents()
        except BaseException:
            self.close()
            raise

    def _check_extents(self) -> None:
        """Catch truncated shards at open time, before any tensor is requested."""
        assert self._maps is not None
        for name, entry in self._entries.items():
            if entry.sliced:
                continue
            slot = self._shard_slot[entry.shard_id]
            end = entry.offset + entry.size
            available = len(self._maps[slot])
            if end > available:
                raise CheckpointError(
                    f"{self.data_paths[slot]}: tensor '{name}' extends past end of file "
                    f'(needs bytes [{entry.offset}, {end}), file has {available}); truncated?'
                )

    @property
    def files(self) -> list[Path]:
        """The index file and every data shard that holds a tensor."""
        return [self.index_path, *self.data_paths]

    def keys(self) -> list[str]:
        """Tensor names in index (byte-sorted) order; slices of partitioned tensors are not listed."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.index_path}: no tensor named '{name}'") from None

    def data_path(self, name: str) -> Path:
        """The data shard holding the tensor (its index entry when the tensor is partitioned)."""
        entry = self._entry(name)
        return self.index_path if entry.sliced else self.data_paths[self._shard_slot[entry.shard_id]]

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's full shape (``()`` for a scalar)."""
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        """The numpy dtype ``get`` returns; bfloat16 needs the optional ``ml_dtypes`` package."""
        code = self._entry(name).dtype
        if code == _DT_BFLOAT16:
            try:
                import ml_dtypes
            except ImportError:
                raise CheckpointError(
                    f"{self.index_path}: tensor '{name}' is bfloat16, which needs the 'ml_dtypes' package"
                ) from None
            return np.dtype(ml_dtypes.bfloat16)
        if code not in _NUMPY_DTYPES:
            label = _UNSUPPORTED_NAMES.get(code, 'unknown')
            raise CheckpointError(f"{self.index_path}: tensor '{name}': unsupported dtype {code} ({label})")
        return np.dtype(_NUMPY_DTYPES[code])

    def get(self, name: str) -> np.ndarray:
        """The tensor, CRC32C-checked, in a new array over its own copy of the bytes (valid after close)."""
        if self._maps is None:
            raise ValueError(f'{self.prefix}: bundle is closed')
        entry = self._entry(name)
        if entry.sliced:
            raise CheckpointError(f"{self.index_path}: tensor '{name}' is partitioned into slices; not supported")
        dtype = self.dtype(name)
        expected_size = math.prod(entry.shape) * dtype.itemsize
        if entry.size != expected_size:
            raise CheckpointError(
                f"{self.index_path}: tensor '{name}': size {entry.size} bytes does not match "
                f'shape {entry.shape} of {dtype} ({expected_size} bytes)'
            )
        # Copy, then checksum the copy: one pass over the mapping, and no buffer export pins the mmap open.
        slot = self._shard_slot[entry.shard_id]
        raw = np.frombuffer(self._maps[slot], np.uint8, entry.size, entry.offset).copy()
        stored, computed = _unmask(entry.masked_crc), crc32c.crc32c(raw)
        if stored != computed:
            raise CheckpointError(
                f"{self.data_paths[slot]}: tensor '{name}': CRC32C mismatch "
                f'(stored 0x{stored:08x}, computed 0x{computed:08x})'
            )
        return raw.view(dtype).reshape(entry.shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) pairs, each tensor read only when the iterator reaches it."""
        for name in self._entries:
            yield name, self.get(name)

    @property
    def global_step(self) -> int | None:
        """The ``global_step`` scalar, which TF1 training checkpoints carry; ``None`` if absent.

        Anything but an integer scalar is an error: TF1's global step is an int64 scalar variable."""
        if 'global_step' not in self:
            return None
        shape, dtype = self.shape('global_step'), self.dtype('global_step')
        if shape != () or dtype != np.int64:
            raise CheckpointError(
                f"{self.index_path}: tensor 'global_step': {dtype} of shape {shape}, expected an int64 scalar"
            )
        return int(self.get('global_step'))

    def close(self) -> None:
        """Unmap the data shards; arrays already returned by ``get`` stay valid."""
        for mapping in self._maps or []:
            if isinstance(mapping, mmap.mmap):
                mapping.close()
        self._maps = None

    def __enter__(self) -> TensorBundle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
