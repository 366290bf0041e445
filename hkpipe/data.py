"""Text data for hkpipe: byte-level or BPE tokens, token files, deterministic batch sampling.

See :func:`prepare` (tokenise a corpus once into a new or empty folder, default: the Shakespeare
corpus from the ``shakespeare`` package; reuse a folder it prepared; use your own ``train.bin``/
``val.bin`` + ``meta.json`` as they are; never overwrite or delete a file it did not write),
:func:`validate` (cheap checks of a data folder), :func:`load` (memory-map the token files) and
:func:`sample_batch` (random windows, deterministic in ``(seed, split, step)``, per-process sharding
for multi-host).

Tokenizers: :func:`prepare_tokens` with a :class:`TokenizerSpec` (``"bytes"``, or ``"bpe"`` with a
vocabulary size: a byte-level BPE trained locally on the corpus with Hugging Face ``tokenizers``
and cached in ``<data_dir>/bpe<vocab_size>-<corpus key>``), :func:`load_tokenizer` (the tokenizer
of a data folder), :func:`train_bpe`, and :func:`bits_per_byte` / :func:`val_bits_per_byte`
(losses of different tokenizers on one scale).
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
from hkpipe._src.tokenizer import BPETokenizer
from hkpipe._src.tokenizer import ByteTokenizer
from hkpipe._src.tokenizer import Tokenizer
from hkpipe._src.tokenizer import TokenizerSpec
from hkpipe._src.tokenizer import bits_per_byte
from hkpipe._src.tokenizer import load_tokenizer
from hkpipe._src.tokenizer import prepare_tokens
from hkpipe._src.tokenizer import train_bpe
from hkpipe._src.tokenizer import val_bits_per_byte

__all__ = ("BPETokenizer", "BYTE_VOCAB_SIZE", "ByteTokenizer", "TokenData", "Tokenizer",
           "TokenizerSpec", "bits_per_byte", "decode", "encode", "load", "load_tokenizer",
           "prepare", "prepare_tokens", "sample_batch", "shakespeare_dir", "train_bpe", "validate",
           "val_bits_per_byte")
