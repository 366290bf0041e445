"""Text data for hkpipe: byte-level tokens, token files, deterministic batch sampling.

See :func:`prepare` (tokenise a corpus once into a new or empty folder, default: the Shakespeare
corpus from the ``shakespeare`` package; reuse a folder it prepared; use your own ``train.bin``/
``val.bin`` + ``meta.json`` as they are; never overwrite or delete a file it did not write),
:func:`validate` (cheap checks of a data folder), :func:`load` (memory-map the token files) and
:func:`sample_batch` (random windows, deterministic in ``(seed, split, step)``, per-process sharding
for multi-host).
"""

from hkpipe._src.data import BYTE_VOCAB_SIZE
from hkpipe._src.data import TokenData
from hkpipe._src.data import decode
from hkpipe._src.data import encode
from hkpipe._src.data import load
from hkpipe._src.data import prepare
from hkpipe._src.data import sample_batch
from hkpipe._src.data import shakespeare_dir
from hkpipe._src.data import validate

__all__ = ("BYTE_VOCAB_SIZE", "TokenData", "decode", "encode", "load", "prepare", "sample_batch",
           "shakespeare_dir", "validate")
