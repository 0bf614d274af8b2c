"""A pure-Python reader for R's serialization format (R Internals §1.8), the subset that data
packages use: how demo/build.py reads Jane Austen's novels out of Debian's r-cran-janeaustenr
without R.

Glossary
  item        one serialized R object: an int of flags (type = flags & 0xFF, has-attributes bit 9,
              has-tag bit 10, gp "levels" = flags >> 12, for CHARSXP its encoding), then its
              payload
  SEXP type   R's object kinds: character vectors (STRSXP of CHARSXP), lists (VECSXP), pairlists,
              symbols, ...
  .rda        RDX2/RDX3 magic, then a pairlist {name: value}; the file gzip, bzip2 or xz
              compressed (or not)
  lazy-load   data/Rdata.rdx (an index: name -> offset, length) + data/Rdata.rdb (one compressed
              record per object)
"""

import bz2
import gzip
import lzma
import struct
import zlib

#
# A stream is "X\n" (XDR, big-endian), then version 2|3, writer version, min reader version (v3:
# + the native encoding), then one item. An item starts with an int of flags: type = flags & 0xFF,
# has-attributes bit 9, has-tag bit 10, gp "levels" = flags >> 12 (for CHARSXP: its encoding).
# Vectors: length (-1: two ints for a long length), then elements; strings are CHARSXP items
# (length -1 = NA). Pairlists: [attr] [tag] car, cdr. Symbols are a CHARSXP the first time and a
# reference (REFSXP, index in flags >> 8) afterwards.

NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP = \
    0, 1, 2, 9, 10, 13, 14, 16, 19, 20, 24
ALTREP_SXP, EMPTYENV, BASEENV, BASENAMESPACE, MISSINGARG, UNBOUNDVALUE, GLOBALENV, NILVALUE, \
    REFSXP = 238, 242, 241, 250, 251, 252, 253, 254, 255
HAS_ATTR, HAS_TAG, LATIN1, NA_INT = 1 << 9, 1 << 10, 1 << 2, -(1 << 31)
RTYPES = {LGLSXP: "logical", INTSXP: "integer", REALSXP: "double", STRSXP: "character",
          VECSXP: "list", EXPRSXP: "expression", RAWSXP: "raw"}


class RFormatError(ValueError):
    """Bytes that are not R serialization this reader handles: the message names what it met."""


class RSymbol(str):
    """An R name (a symbol), as opposed to a character string."""


class RVector(list):
    """An R vector: its elements (NA -> None), rtype ("character", "list", ...) and attributes
    {name: value}."""

    def __init__(self, items, rtype, attrs=None):
        super().__init__(items)
        self.rtype, self.attrs = rtype, attrs or {}

    def named(self) -> dict:
        return dict(zip(self.attrs["names"], self))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise RFormatError(f"R serialization format {data[:2]!r} not supported "
                               f"(want XDR binary, b'X\\n')")
        self.pos = 2
        version, _writer, _min_reader = self.ints(3)
        if version == 3:
            self.take(self.ints(1)[0])  # the writer's native encoding name
        elif version != 2:
            raise RFormatError(f"R serialization version {version} not supported (want 2 or 3)")

    def ints(self, n):
        out = struct.unpack_from(f">{n}i", self.data, self.pos)
        self.pos += 4 * n
        return out

    def take(self, n) -> bytes:
        if self.pos + n > len(self.data):
            raise RFormatError(f"R stream truncated at byte {self.pos} (wanted {n} more)")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def length(self):
        n = self.ints(1)[0]
        if n == -1:
            hi, lo = self.ints(2)
            n = (hi << 32) + lo
        return n

    def item(self, flags=None):
        flags = self.ints(1)[0] if flags is None else flags
        t = flags & 0xFF
        if t == NILVALUE:
            return None
        if t in (EMPTYENV, BASEENV, BASENAMESPACE, MISSINGARG, UNBOUNDVALUE, GLOBALENV):
            return RSymbol(f"<special {t}>")
        if t == REFSXP:
            return self.refs[(flags >> 8 or self.ints(1)[0]) - 1]
        if t == SYMSXP:
            self.refs.append(RSymbol(self.item()))
            return self.refs[-1]
        if t == LISTSXP:
            return self.pairlist(flags)
        if t == CHARSXP:
            n = self.ints(1)[0]
            encoding = "latin-1" if flags >> 12 & LATIN1 else "utf-8"
            s = None if n == -1 else self.take(n).decode(encoding, "replace")
            if flags & HAS_ATTR:
                self.item()
            return s
        if t in RTYPES:
            n = self.length()
            if t in (STRSXP, VECSXP, EXPRSXP):
                items = [self.item() for _ in range(n)]
            elif t in (INTSXP, LGLSXP):
                ints = struct.unpack(f">{n}i", self.take(4 * n))
                items = [None if x == NA_INT else x for x in ints]
            elif t == REALSXP:
                items = list(struct.unpack(f">{n}d", self.take(8 * n)))
            else:
                items = self.take(n)
            return RVector(items, RTYPES[t], self.pairlist() if flags & HAS_ATTR else None)
        if t == ALTREP_SXP:
            return self.altrep()
        raise RFormatError(f"R object of SEXP type {t} at byte {self.pos} is not data (this reader "
                           f"handles vectors, lists and pairlists)")

    def pairlist(self, flags=None) -> dict:
        """{tag (or position): value}; iterative over the cdr chain, so long pairlists do not
        recurse."""
        out = {}
        flags = self.ints(1)[0] if flags is None else flags
        while flags & 0xFF == LISTSXP:
            if flags & HAS_ATTR:
                self.item()
            tag = self.item() if flags & HAS_TAG else len(out)
            out[str(tag) if isinstance(tag, str) else tag] = self.item()
            flags = self.ints(1)[0]
        self.item(flags)  # the terminating NILVALUE
        return out

    def altrep(self):
        """Compact sequences and wrappers, which R ≥ 3.5 may write for vectors it made lazily."""
        info, state, attrs = self.pairlist(), self.item(), self.item()
        kind = info[0]
        if kind == "compact_intseq" or kind == "compact_realseq":
            n, start, step = state
            items = [start + i * step for i in range(int(n))]
            return RVector([int(x) for x in items] if kind == "compact_intseq" else items,
                           "integer" if kind == "compact_intseq" else "double", attrs)
        if kind.startswith("wrap_"):
            state[0].attrs.update(attrs or {})
            return state[0]
        raise RFormatError(f"R ALTREP class {kind!r} not supported")


def _decompress(data: bytes) -> bytes:
    """R's file compressions, by magic number: gzip, bzip2, xz, or none."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def unserialize(data: bytes):
    """One R object from a (possibly compressed) serialization stream, e.g. an .rds file."""
    return _Reader(_decompress(data)).item()


def read_rda(data: bytes) -> dict:
    """The variables of an .rda / .RData file: RDX2/RDX3 magic, then a pairlist {name: value}."""
    data = _decompress(data)
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RFormatError(f"not an R save file: starts with {data[:5]!r}, want RDX2 or RDX3")
    return _Reader(data[5:]).item()


def read_lazyload(rdx: bytes, rdb: bytes) -> dict:
    """The variables of an R lazy-load database (data/Rdata.rdx + .rdb). The .rdx is an .rds of
    list(variables = list(name = c(offset, length)), references, compressed); each .rdb record is
    a 4-byte big-endian raw length, for compressed 2/3 a type byte ('Z' xz, '2' bzip2, '0' none),
    then the stream."""
    index = unserialize(rdx).named()
    how = index["compressed"][0]
    out = {}
    for name, (offset, n) in index["variables"].named().items():
        rec = rdb[offset:offset + n]
        if how in (True, 1):
            raw = zlib.decompress(rec[4:])
        else:
            kind, body = rec[4:5], rec[5:]
            raw = {b"Z": lzma.decompress, b"2": bz2.decompress, b"0": bytes}[kind](body)
        out[name] = _Reader(raw).item()
    return out
