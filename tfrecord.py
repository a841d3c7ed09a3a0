"""TFRecord files without TensorFlow: the record framing, its CRC-32C checks and the
`tf.train.Example` protobuf, read once here for the `tfrecord` training format (shards as
img2dataset's `--output_format tfrecord` writes them, streaming.py) and the `tfds` zero-shot
catalog type (TensorFlow Datasets' on-disk layout, evalsets.py).

A record is: uint64 length, uint32 masked CRC-32C of those 8 bytes, `length` bytes of data,
uint32 masked CRC-32C of the data (little-endian). A bad length CRC means the framing is lost
(the rest of the file cannot be read: `ShardError`, as is a file cut short); a bad data CRC
spoils that record only, which is reported and skipped. Shards may be gzip-compressed
(TFRecordWriter's GZIP option, or `gzip x.tfrecord`): recognised from their first bytes.

    >>> for data, intact in records(open_shard('00000.tfrecord'), '00000.tfrecord'):
    ...     features = parse_example(data)       # {'jpg': [b'...'], 'txt': [b'...'], 'width': [640], ...}
"""
import gzip
import os
import struct

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

try:                       # C implementation (requirements.txt); the pure one below is its stand-in
    import google_crc32c
except ImportError:        # pragma: no cover -- exercised by the tests through crc32c_pure
    google_crc32c = None

GZIP_MAGIC = b'\x1f\x8b\x08'
_MASK_DELTA = 0xA282EAD8


# ----------------------------------------------------------------------------- CRC-32C

def _crc_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)       # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc_table()


def crc32c_pure(data):
    """CRC-32C in Python (a few MB/s: the stand-in when google-crc32c is not installed)."""
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data):
    return google_crc32c.value(bytes(data)) if google_crc32c is not None else crc32c_pure(data)


def masked_crc(data):
    """TFRecord's masked CRC-32C: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- framing

class ShardError(RuntimeError):
    """The rest of a shard cannot be read (cut short, or its framing is corrupt)."""


def open_shard(path):
    """A binary file object over the records: gzip-compressed shards decompressed. Gzip is
    told from its magic bytes unless those same bytes also frame a valid first record."""
    f = open(path, 'rb')
    head = f.peek(12)[:12]
    if head.startswith(GZIP_MAGIC) and not _framed(head):
        f.close()
        return gzip.open(path, 'rb')
    return f


def _framed(head):
    return len(head) == 12 and masked_crc(head[:8]) == struct.unpack('<I', head[8:])[0]


def _length(head, n, where):
    """The data length in a record header; ShardError when it is cut short or fails its CRC."""
    if len(head) < 12:
        raise ShardError(f"{where}: record #{n}: file cut short")
    if not _framed(head):
        raise ShardError(f"{where}: record #{n}: length CRC mismatch (not a TFRecord file, or corrupt)")
    return struct.unpack('<Q', head[:8])[0]


def records(f, where):
    """Yield (data, intact) per record of an open shard; `intact` is False when the data
    CRC does not match. Raises ShardError once the rest of the file cannot be read."""
    n = 0
    while True:
        head = f.read(12)
        if not head:
            return
        length = _length(head, n, where)
        data = f.read(length)
        tail = f.read(4)
        if len(data) < length or len(tail) < 4:
            raise ShardError(f"{where}: record #{n}: file cut short")
        yield data, masked_crc(data) == struct.unpack('<I', tail)[0]
        n += 1


def record_offsets(f, where):
    """The offset of every record of an open shard, from the record headers alone (the data
    is skipped over, not read; for random access). Raises ShardError like records()."""
    size = os.fstat(f.fileno()).st_size if not isinstance(f, gzip.GzipFile) else None
    offsets = []
    while True:
        offset, head = f.tell(), f.read(12)
        if not head:
            return offsets
        end = offset + 16 + _length(head, len(offsets), where)
        if size is not None and end > size:
            raise ShardError(f"{where}: record #{len(offsets)}: file cut short")
        try:
            f.seek(end)
        except EOFError:                                  # a gzip stream cut short
            raise ShardError(f"{where}: record #{len(offsets)}: file cut short") from None
        offsets.append(offset)


# ----------------------------------------------------------------------------- tf.train.Example

def _example_class():
    """tensorflow/core/example/{feature,example}.proto, built in a private descriptor pool
    (so it never clashes with TensorFlow's own if that is imported too)."""
    proto = descriptor_pb2.FileDescriptorProto(name='vlp_tf_example.proto', package='tensorflow',
                                               syntax='proto3')
    F = descriptor_pb2.FieldDescriptorProto
    for name, kind in (('BytesList', F.TYPE_BYTES), ('FloatList', F.TYPE_FLOAT), ('Int64List', F.TYPE_INT64)):
        proto.message_type.add(name=name).field.add(name='value', number=1, type=kind, label=F.LABEL_REPEATED)
    feature = proto.message_type.add(name='Feature')
    feature.oneof_decl.add(name='kind')
    for number, (name, kind) in enumerate((('bytes_list', 'BytesList'), ('float_list', 'FloatList'),
                                           ('int64_list', 'Int64List')), 1):
        feature.field.add(name=name, number=number, type=F.TYPE_MESSAGE, type_name=f'.tensorflow.{kind}',
                          label=F.LABEL_OPTIONAL, oneof_index=0)
    features = proto.message_type.add(name='Features')
    entry = features.nested_type.add(name='FeatureEntry')
    entry.options.map_entry = True
    entry.field.add(name='key', number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name='value', number=2, type=F.TYPE_MESSAGE, type_name='.tensorflow.Feature',
                    label=F.LABEL_OPTIONAL)
    features.field.add(name='feature', number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                       type_name='.tensorflow.Features.FeatureEntry')
    proto.message_type.add(name='Example').field.add(
        name='features', number=1, type=F.TYPE_MESSAGE, type_name='.tensorflow.Features', label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName('tensorflow.Example'))


Example = _example_class()


def encode_example(features):
    """{name: bytes | str | int | float, or a list of one kind} -> serialized tf.train.Example
    (for writing shards, e.g. bench/data_loader.py)."""
    message = Example()
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = message.features.feature[name]
        if all(isinstance(v, (bytes, str)) for v in values):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, int) for v in values):
            feature.int64_list.value.extend(values)
        else:
            feature.float_list.value.extend(values)
    return message.SerializeToString()


def frame(data):
    """One record: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack('<Q', len(data))
    return length + struct.pack('<I', masked_crc(length)) + data + struct.pack('<I', masked_crc(data))


def parse_example(data):
    """Serialized tf.train.Example -> {feature name: list of bytes / ints / floats}; raises
    ValueError when the bytes are not an Example."""
    try:
        message = Example.FromString(data)
    except Exception as e:  # noqa: BLE001 -- protobuf's DecodeError (its module differs by backend)
        raise ValueError(f"not a tf.train.Example ({type(e).__name__})") from None
    out = {}
    for name, feature in message.features.feature.items():
        kind = feature.WhichOneof('kind')
        out[name] = list(getattr(feature, kind).value) if kind else []
    return out


# ----------------------------------------------------------------------------- img2dataset shards

def shard_samples(sources, handler):
    """Raw training samples of tfrecord shards for streaming.StreamReader, in file order:
    {'__url__', '__key__' (img2dataset's `key`, else the record number), feature name: its
    first bytes value} -- img2dataset's `jpg` and `txt` are what StreamReader decodes. A
    record failing its CRC or not an Example keeps its place as {'__bad__': why}. A shard
    that cannot be read on goes to `handler(exception)` (True: go on with the next shard)."""
    for source in sources:
        url = source['url']
        try:
            with open_shard(url) as f:
                for n, (data, intact) in enumerate(records(f, url)):
                    yield _sample(data, intact, url, n)
        except (ShardError, OSError, EOFError) as e:       # gzip: EOFError / BadGzipFile (an OSError)
            if not handler(e):
                raise


def _sample(data, intact, url, n):
    sample = {'__url__': url, '__key__': f'#{n}'}
    if not intact:
        return {**sample, '__bad__': f'record #{n}: data CRC mismatch'}
    try:
        features = parse_example(data)
    except ValueError as e:
        return {**sample, '__bad__': f'record #{n}: {e}'}
    for name, values in features.items():
        if values and isinstance(values[0], bytes):
            sample[name] = values[0]
    key = sample.pop('key', b'')
    if key:
        sample['__key__'] = key.decode('utf-8', 'replace')
    return sample
