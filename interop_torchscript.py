"""The safe TorchScript reader of interop.py: the tensors of an OpenAI CLIP TorchScript archive
(its state dict and tensor attributes) read by an unpickler that only rebuilds tensors, without
torch.jit.load, so no code from the file runs."""
import collections
import pickle
import zipfile

import torch

_STORAGES = {'FloatStorage': torch.float32, 'HalfStorage': torch.float16, 'DoubleStorage': torch.float64,
             'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
             'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
             'BoolStorage': torch.bool}


class _ScriptObject:
    """A TorchScript object of an archive's data.pkl: its attributes are kept, its code never runs."""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *_):
    if storage.numel() == 0:
        return torch.zeros(tuple(size), dtype=storage.dtype)
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript data.pkl: tensors, dicts, lists and stand-ins for the scripted
    classes; any other global is refused, so no code from the file can run."""
    SAFE = {('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
            ('collections', 'OrderedDict'): collections.OrderedDict,
            **{('torch.jit._pickle', f'build_{k}list'): list for k in ('int', 'double', 'bool', 'tensor')}}

    def __init__(self, file, archive, root):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        if module == '__torch__' or module.startswith('__torch__.'):
            return _ScriptObject
        if module == 'torch' and name in _STORAGES:
            return _STORAGES[name]
        if (module, name) in self.SAFE:
            return self.SAFE[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _, _ = pid                        # ('storage', dtype, key, location, numel)
        data = self.archive.read(f'{self.root}/data/{key}')
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any('/code/' in n or n.endswith('/constants.pkl') for n in z.namelist())


def read_torchscript(path):
    """{name: tensor} of every tensor attribute of a TorchScript archive (its state dict, plus
    tensor attributes such as OpenAI's attention masks), without torch.jit.load."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
        if not pkl:
            raise ValueError(f"{path}: a TorchScript archive without data.pkl")
        root = pkl[0][:-len('/data.pkl')]
        if f'{root}/byteorder' in z.namelist() and z.read(f'{root}/byteorder') != b'little':
            raise ValueError(f"{path}: big-endian archive")
        with z.open(pkl[0]) as f:
            try:
                obj = _ArchiveUnpickler(f, z, root).load()
            except Exception as e:                  # a refused global, or a malformed archive
                raise ValueError(f"{path}: TorchScript archive: {e}") from None

    def walk(o, prefix):
        for k, v in (getattr(o, 'state', None) or {}).items():
            if torch.is_tensor(v):
                yield prefix + k, v
            elif isinstance(v, _ScriptObject):
                yield from walk(v, f'{prefix}{k}.')
    return dict(walk(obj, ''))
