"""Read upstream nanochat's `tokenizer.pkl` (a pickled `tiktoken.Encoding`) without tiktoken and
without running anything the pickle asks for.

A pickle is a program: unpickling calls whatever global it names. tiktoken pickles an Encoding as
`tiktoken.core.Encoding.__new__()` followed by `__setstate__({"name", "pat_str",
"mergeable_ranks", "special_tokens"})` (protocol 2+: the NEWOBJ and BUILD opcodes), so the only
global a genuine one names is `tiktoken.core.Encoding`, plus `_codecs.encode` under protocol 2,
which spells every bytes object as `_codecs.encode(str, "latin1")`. The unpickler here resolves
the class to an inert stand-in that records the state and `_codecs.encode` to a function that only
turns a str into latin-1 bytes; every other global is refused before it is looked up, so a hostile
pickle (say `os.system`) fails with a clear error and nothing of it runs. The state is then
checked field by field: bytes -> int ranks, str -> int specials, a str pattern. Protocols 0 and 1
need `copyreg._reconstructor` as well and are refused (tiktoken's pickles use the default, 4+).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

# The one global a tiktoken Encoding pickle names (tiktoken pickles by class, protocol >= 2).
ENCODING_GLOBAL = ("tiktoken.core", "Encoding")
LATIN1_GLOBAL = ("_codecs", "encode")  # protocol 2 spells bytes as _codecs.encode(str, "latin1")
MAX_PICKLE_BYTES = 256 * 1024 * 1024  # a 200K-token vocabulary is a few MB; refuse anything absurd


class PickleRefused(ValueError):
    """The file is not a tiktoken Encoding pickle; nothing in it was executed."""


@dataclass(frozen=True)
class TiktokenEncoding:
    """What a tiktoken Encoding is made of (tiktoken.Encoding's constructor arguments)."""

    name: str
    pat_str: str
    mergeable_ranks: dict[bytes, int]
    special_tokens: dict[str, int]

    @property
    def n_vocab(self) -> int:
        return max([*self.mergeable_ranks.values(), *self.special_tokens.values()]) + 1


class _EncodingState:
    """Stand-in for tiktoken.core.Encoding: holds the pickled state, runs nothing."""

    def __init__(self, *args, **kwargs):
        # Only reachable through REDUCE (calling the class), which tiktoken's pickles never use.
        raise pickle.UnpicklingError("tiktoken.core.Encoding may only be rebuilt by __setstate__")

    def __setstate__(self, state) -> None:
        self.state = state


def _latin1(text, encoding="latin1"):
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only admitted for (str, 'latin1'): protocol-2 bytes")
    return text.encode("latin-1")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) == ENCODING_GLOBAL:
            return _EncodingState
        if (module, name) == LATIN1_GLOBAL:
            return _latin1
        raise PickleRefused(
            f"{self.source}: refused to load: the pickle asks for {module}.{name}, and only "
            f"{'.'.join(ENCODING_GLOBAL)} (a tiktoken tokenizer) is allowed; nothing was executed"
        )

    def persistent_load(self, pid):
        raise PickleRefused(f"{self.source}: refused to load: persistent ids are not allowed")


def _check_state(state, source: str) -> TiktokenEncoding:
    if isinstance(state, str):
        raise PickleRefused(
            f"{source}: the pickle refers to tiktoken's registered encoding {state!r} by name "
            "instead of carrying its vocabulary; only self-contained encodings (nanochat's) import"
        )
    if not isinstance(state, dict):
        raise PickleRefused(f"{source}: Encoding state is a {type(state).__name__}, expected a dict")
    missing = [k for k in ("pat_str", "mergeable_ranks", "special_tokens") if k not in state]
    if missing:
        raise PickleRefused(f"{source}: Encoding state lacks {missing}")
    name, pat, ranks, specials = (
        state.get("name", ""),
        state["pat_str"],
        state["mergeable_ranks"],
        state["special_tokens"],
    )
    if not isinstance(name, str) or not isinstance(pat, str):
        raise PickleRefused(f"{source}: Encoding name and pat_str must be strings")
    if not isinstance(ranks, dict) or not all(type(k) is bytes and type(v) is int for k, v in ranks.items()):
        raise PickleRefused(f"{source}: mergeable_ranks must map bytes to int")
    if not isinstance(specials, dict) or not all(
        type(k) is str and type(v) is int for k, v in specials.items()
    ):
        raise PickleRefused(f"{source}: special_tokens must map str to int")
    return TiktokenEncoding(name, pat, dict(ranks), dict(specials))


def loads_encoding(data: bytes, source: str = "<bytes>") -> TiktokenEncoding:
    """Parse the bytes of a pickled tiktoken Encoding (see the module doc for what is admitted)."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), source).load()
    except PickleRefused:
        raise
    except Exception as e:  # truncated or corrupt: pickle raises many types
        raise PickleRefused(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise PickleRefused(f"{source}: the pickle holds a {type(obj).__name__}, not a tiktoken Encoding")
    return _check_state(obj.state, source)


def read_encoding(path: Path) -> TiktokenEncoding:
    """Read `tokenizer.pkl` (upstream's RustBPETokenizer.save) safely."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise PickleRefused(f"{path}: {size} bytes is too large for a tokenizer pickle")
    return loads_encoding(path.read_bytes(), str(path))
