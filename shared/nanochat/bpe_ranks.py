"""Byte-level BPE given as tiktoken-style ranks -> the platform's `tokenizers` pipeline.

Upstream nanochat trains with rustbpe and encodes with tiktoken. Both describe a vocabulary as
*mergeable ranks*: token bytes -> rank, where the rank is also the token id, the 256 single bytes
come first and every longer token was made by merging two lower-ranked ones. tiktoken encodes a
regex piece like this:
  1. if the whole piece is a token, that token (no merging at all);
  2. else start from single bytes and repeatedly merge the adjacent pair whose concatenation has
     the lowest rank (leftmost first on a tie), until no adjacent pair concatenates to a token.
`tokenizers`' BPE does the same with `ignore_merges=True` (step 1) and a merge list in which the
pair (a, b) has the priority of rank(a + b) (step 2). Every split of a token into two tokens is
listed, because tiktoken merges by the *concatenation*, not by the pair that training merged.

Token ids stay the ranks; specials follow the ranks in id order, as upstream appends them.
`reference_encode` is tiktoken's algorithm in plain Python (no tiktoken needed), used to verify a
conversion on probe text before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table, the alphabet byte-level BPE stores tokens in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def token_str(token: bytes) -> str:
    """Bytes of a token in the byte-level alphabet (how tokenizer.json spells it)."""
    return token.decode("latin-1").translate(_latin1_table())


@lru_cache(maxsize=1)
def _latin1_table() -> dict[int, str]:
    # bytes decoded as latin-1 are code points 0..255; map each to its byte-level char
    return dict(byte_to_unicode().items())


def check_ranks(mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int]) -> None:
    """Refuse vocabularies the conversion cannot reproduce id for id; messages say what is off."""
    n = len(mergeable_ranks)
    if sorted(mergeable_ranks.values()) != list(range(n)):
        raise ValueError(f"mergeable ranks must be the ids 0..{n - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
    if missing:
        raise ValueError(
            f"mergeable ranks lack {len(missing)} single byte(s) (first: {missing[0]}): not byte-level BPE"
        )
    want = list(range(n, n + len(special_tokens)))
    if sorted(special_tokens.values()) != want:
        raise ValueError(
            f"special token ids must follow the {n} ranks ({n}..{n + len(special_tokens) - 1}), "
            f"got {sorted(special_tokens.values())}"
        )


def spell_vocab(mergeable_ranks: dict[bytes, int]) -> list[str]:
    """Every token in the byte-level alphabet, indexed by rank (ranks are dense, see check_ranks)."""
    spelled = [""] * len(mergeable_ranks)
    table = _latin1_table()
    for token, rank in mergeable_ranks.items():
        spelled[rank] = token.decode("latin-1").translate(table)
    return spelled


def merges_from_ranks(
    mergeable_ranks: dict[bytes, int], spelled: list[str] | None = None
) -> list[tuple[str, str]]:
    """Every (left, right) split of every multi-byte token into two tokens, ordered by the rank of
    the token they make (then by the ranks of the halves, as transformers' tiktoken converter)."""
    ranked: list[tuple[int, int, int]] = []
    get = mergeable_ranks.get
    for token, rank in mergeable_ranks.items():
        for i in range(1, len(token)):
            rl = get(token[:i])
            if rl is not None:
                rr = get(token[i:])
                if rr is not None:
                    ranked.append((rank, rl, rr))
    ranked.sort()
    spelled = spelled or spell_vocab(mergeable_ranks)
    return [(spelled[rl], spelled[rr]) for _, rl, rr in ranked]


def build_hf_tokenizer(
    mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]
) -> HFTokenizer:
    """The `tokenizers` pipeline equivalent to tiktoken's Encoding(pattern, ranks, specials)."""
    check_ranks(mergeable_ranks, special_tokens)
    spelled = spell_vocab(mergeable_ranks)
    bpe = models.BPE(
        vocab={piece: rank for rank, piece in enumerate(spelled)},
        merges=merges_from_ranks(mergeable_ranks, spelled),
        ignore_merges=True,  # a piece that is a token is that token (tiktoken's first step)
        byte_fallback=False,
        fuse_unk=False,
    )
    tok = HFTokenizer(bpe)
    tok.normalizer = None
    # Split on the regex first (isolated keeps every char), then map bytes to printable chars.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added in id order, so each takes the next id after the ranks: the id upstream gave it.
    ordered = sorted(special_tokens.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in ordered])
    wrong = {s: tok.token_to_id(s) for s, i in ordered if tok.token_to_id(s) != i}
    if wrong:  # a special that is also a BPE token would keep the BPE id
        raise ValueError(f"special tokens landed on other ids than upstream's: {wrong}")
    return tok


# ----------------------------------------------------------------------------- reference encoder


def _byte_pair_merge(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """tiktoken's merge loop on one regex piece (lowest-rank concatenation first, leftmost on ties)."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]


def reference_encode(mergeable_ranks: dict[bytes, int], pattern: str, text: str) -> list[int]:
    """tiktoken's `encode_ordinary` in plain Python (slow; for verification on probe text)."""
    import regex

    ids: list[int] = []
    for m in regex.finditer(pattern, text):
        ids.extend(_byte_pair_merge(mergeable_ranks, m.group().encode("utf-8")))
    return ids


# Fixed probes: what differs between regex engines and merge orders (scripts, digits, runs).
SAMPLE_TEXTS = (
    "Hello world! This is a test.\nNumbers: 123, 4567, 89, 3.14159 and 1,000,000.\n",
    "Contractions: I'm, you're, it's, WE'LL, they've. Special chars: @#$%^&*() <|bos|>",
    "Unicode: 你好世界 🌍 e\u0301 \u200b Ünïcödé ǅ Ⅻ ٣٤ \U0001f469\u200d\U0001f52c Ωμέγα Привет मनुष्य",
    "whitespace:  a   b    c\t\t\td\n\n\n\r\n  \u00a0\u3000  \n    indented\n        more   ",
    "digits 0 00 000 0000 12345678901234567890 -7 +8 ½ ²",
)


def probe_texts(mergeable_ranks: dict[bytes, int]) -> Iterable[str]:
    """Text a conversion is checked on: fixed samples, then every token that is valid UTF-8 on its
    own, doubled and glued to its neighbours in rank order (pieces that need merging)."""
    yield from SAMPLE_TEXTS
    valid = []
    for token in sorted(mergeable_ranks, key=mergeable_ranks.__getitem__):
        try:
            valid.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    yield from valid
    for i in range(0, len(valid), 64):
        chunk = valid[i : i + 64]
        yield "".join(chunk)
        yield "".join(t + t for t in chunk)
