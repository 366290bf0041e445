"""Text data for hkpipe: byte-level tokens, token files, deterministic batch sampling.

See :func:`prepare` (tokenise a corpus once; default: the Shakespeare corpus from the
``shakespeare`` package), :func:`load` (memory-map the token files) and :func:`sample_batch`
(random windows, deterministic in ``(seed, split, step)``, per-process sharding for multi-host).
"""

from hkpipe._src.data import BYTE_VOCAB_SIZE
from hkpipe._src.data import TokenData
from hkpipe._src.data import decode
from hkpipe._src.data import encode
from hkpipe._src.data import load
from hkpipe._src.data import prepare
from hkpipe._src.data import sample_batch
from hkpipe._src.data import shakespeare_dir

__all__ = ("BYTE_VOCAB_SIZE", "TokenData", "decode", "encode", "load", "prepare", "sample_batch",
           "shakespeare_dir")
