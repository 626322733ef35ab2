"""The Japanese BPE encoder: text to token ids and back, exactly as ENCODER.md states.

`get_encoder(vocab_dir)` reads the two vocabulary files and returns an `Encoder`.
The steps are those of ENCODER.md; what makes them fast (and why each shortcut gives the
same ids as the plain reading, kept in tests/plain_encoder.py) is said where it is done:
  - emoji: only the keys that can occur are tried, still one after another in file order;
  - longest match: tags are found with one regex, and the one- or two-character matches
    of the text between them are computed with numpy over the whole text at once.
"""
import functools
import re
import typing

import numpy as np

from encoder.clean import clean_text
from encoder.vocab import VocabularyError, read_emoji, read_vocab

END_OF_TEXT = '<|endoftext|>'
# Step 1 of ENCODER.md, in its order ('\r\n' before its parts).
WHITESPACE_REPLACEMENTS = [(' ', '<SP>'), ('\u3000', '<SP>'), ('\r\n', '<BR>'), ('\n', '<BR>'),
                           ('\r', '<BR>'), ('\t', '<TAB>'), ('\u2014', 'ー'), ('\u2212', 'ー')]
DECODED_TAGS = {'<SP>': ' ', '<BR>': '\n', '<TAB>': '\t'}
TAG_START = '<'
END_OF_KEY = ''  # marks, in the emoji trie, the node where a key ends
# Beyond the last code point, so that a tag standing for itself in the code-point array
# can never be mistaken for a character of the text.
TAG_CODE_BASE = 0x110000


def get_encoder(vocab_dir):
    """The encoder for the vocabulary files (`ja-bpe.txt`, `emoji.json`) in `vocab_dir`."""
    emoji, emoji_inv = read_emoji(vocab_dir)
    return Encoder(read_vocab(vocab_dir), emoji, emoji_inv)


def byte_token(byte):
    return f'<|byte{byte}|>'


def is_byte_token(token):
    return token.startswith('<|byte') and token.endswith('|>')


def is_emoji_token(token):
    return token.startswith('<|emoji') and token.endswith('|>')


def trie_regex(words):
    """A regex matching the longest of `words` that starts where it is tried.

    Built as a trie, so a match costs one step per character rather than one per word.
    Compiling costs time per character of the pattern, so the pattern is kept short: no
    group around a single branch, and branches that differ only in their first character
    (`<|byte1|>`, `<|byte2|>`, ...) share one character class.
    """
    trie = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[''] = {}  # marks the end of a word

    def pattern(node):
        # A trie's branches start with distinct characters, so at most one of them can
        # match and their order does not matter: grouping them by what follows is exact.
        chars_by_rest = {}
        for char, child in node.items():
            if char:
                chars_by_rest.setdefault(pattern(child), []).append(char)
        branches = [char_class(chars) + rest for rest, chars in chars_by_rest.items()]
        if not branches:
            return ''
        if '' in node:
            # Greedy '?': a longer word is tried first, a shorter one is the fallback.
            return '(?:' + '|'.join(branches) + ')?'
        return branches[0] if len(branches) == 1 else '(?:' + '|'.join(branches) + ')'

    return re.compile(pattern(trie))


def char_class(chars):
    """A regex matching any one of `chars` (distinct characters)."""
    escaped = ''.join(map(re.escape, chars))
    return escaped if len(chars) == 1 else '[' + escaped + ']'


def vocabulary_codes(text):
    """The code points of `text`, a string of vocabulary data, as an int32 array.

    Unlike text_codes, a lone surrogate is kept as its code rather than refused: the
    vocabulary may hold one, as it may hold any other code point. [len(text)]
    """
    return np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), dtype=np.int32)


class EntryCodes(typing.NamedTuple):
    """Each vocabulary entry's length and the codes of its first two characters, -1 where
    it is shorter. [len(tokens)] each."""
    lengths: np.ndarray
    first: np.ndarray
    second: np.ndarray


def entry_codes(tokens):
    """The EntryCodes of `tokens`, read from one string of them all rather than entry by
    entry."""
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    # Two -1s after the last code, for the missing characters of a short last entry.
    codes = np.append(vocabulary_codes(''.join(tokens)), [-1, -1])
    starts = np.cumsum(lengths) - lengths
    return EntryCodes(lengths, np.where(lengths >= 1, codes[starts], -1),
                      np.where(lengths >= 2, codes[starts + 1], -1))


def vocabulary_shape_error(token):
    """What in `token` breaks the facts that the fast longest match relies on, or None."""
    if TAG_START in token[1:]:
        return f'unexpected vocabulary entry {token!r}: "<" inside an entry'
    if len(token) > 2 and not token.startswith(TAG_START):
        return (f'unexpected vocabulary entry {token!r}: only entries starting with "<" '
                'may be longer than two characters')
    if token == '':
        return f'unexpected vocabulary entry {token!r}'
    return None


def check_vocabulary_shape(tokens, entries):
    """The facts about the vocabulary that the fast longest match relies on.

    `entries` are the EntryCodes of `tokens`. VocabularyError names the first offender.
    """
    # Only an entry that is empty, longer than two characters or has "<" second can break
    # a rule; those few are checked one by one, in order.
    suspects = ((entries.lengths == 0) | (entries.lengths > 2)
                | (entries.second == ord(TAG_START)))
    for i in np.flatnonzero(suspects).tolist():
        if error := vocabulary_shape_error(tokens[i]):
            raise VocabularyError(error)
    # Every byte tag and the end-of-text tag start with "<".
    present = {tokens[i] for i in np.flatnonzero(entries.first == ord(TAG_START)).tolist()}
    missing = [byte_token(b) for b in range(255) if byte_token(b) not in present]
    if missing or END_OF_TEXT not in present:
        raise VocabularyError(f'vocabulary lacks {(missing or [END_OF_TEXT])[0]}')


def any_key_meets_a_tag(keys, tags):
    """Whether an occurrence of some key could overlap an occurrence of some tag in a text:
    whether, for some key and tag, the key is inside the tag, the tag is inside the key, a
    proper suffix of the key begins the tag, or a proper prefix of the key ends the tag.

    Asked pair by pair (tests/test_encoder.py checks this against that plain reading), it
    is keys x tags Python-level checks, 4,314 x 12 for the released vocabulary. Two facts
    make it cheap:
      - non-empty strings can only overlap where they share a character, so only the keys
        that share one with some tag are asked (51 of the released 4,314);
      - the tags' substrings, prefixes and suffixes are listed once, so each of those keys
        is asked with a set lookup and C-level string methods.
    """
    tags = set(tags)
    if not keys or not tags:
        return False
    if '' in tags or '' in keys:
        return True  # the empty string is inside every string
    tag_substrings = {tag[i:j] for tag in tags
                      for i in range(len(tag)) for j in range(i + 1, len(tag) + 1)}
    tag_prefixes = tuple({tag[:n] for tag in tags for n in range(1, len(tag) + 1)})
    tag_suffixes = tuple({tag[n:] for tag in tags for n in range(len(tag))})
    shares_a_char_with_a_tag = re.compile(char_class(sorted(set(''.join(tags))))).search
    # key[1:] ends with a non-empty string exactly when that string is a proper suffix of
    # the key; key[:-1] starts with one exactly when it is a proper prefix.
    return any(key in tag_substrings or any(tag in key for tag in tags)
               or key[1:].endswith(tag_prefixes) or key[:-1].startswith(tag_suffixes)
               for key in filter(shares_a_char_with_a_tag, keys))


class EmojiReplacer:
    """Step 2 of ENCODER.md: each emoji key, in file order, replaced by its tag.

    Done as ENCODER.md says, the step scans the text once per key (4,314 scans). Here the
    places where keys occur are found first, and only those are rewritten, still key
    after key in file order. That gives the same text because:
      - no key can match across or inside a tag (checked when built: `tags_are_barriers`),
        so a replacement never creates or breaks a match outside its own place;
      - a cluster (the span covered by key occurrences that overlap one another) holds
        every occurrence that touches it, so rewriting it alone, key after key, leaves it
        as the whole-text pass would.
    Where the first check fails (another vocabulary), the whole-text pass is used.
    """

    def __init__(self, emoji):
        self.tags = dict(emoji)
        self.keys = list(emoji)
        self.max_key_length = max(map(len, self.keys), default=0)
        self.index = dict(zip(self.keys, range(len(self.keys))))
        self.trie = {}
        for key in self.keys:
            node = self.trie
            for char in key:
                node = node.setdefault(char, {})
            node[END_OF_KEY] = key
        # Asked only of the keys that occur, once each: most never do.
        self.may_extend = functools.lru_cache(maxsize=None)(self._may_extend)
        self.tags_are_barriers = not any_key_meets_a_tag(self.keys, set(self.tags.values()))
        self.start_filter = KeyStartFilter(self.keys)
        self.rewrite_cluster = functools.lru_cache(maxsize=1 << 16)(self._rewrite_cluster)

    def __call__(self, text):
        if not self.tags_are_barriers:
            return self.replace_in_order(text, self.keys)
        pieces, pos = [], 0
        for start in self.start_filter.candidates(text):
            if start < pos or not (key := self.longest_key_at(text, start)):
                continue
            end = start + len(key)
            if self.may_extend(key):
                end = self._cluster_end(text, start, end)
            pieces += [text[pos:start], self.rewrite_cluster(text[start:end])]
            pos = end
        pieces.append(text[pos:])
        return ''.join(pieces)

    def longest_key_at(self, text, position):
        """The longest key that `text` holds at `position`, or None."""
        node, found = self.trie, None
        for char in text[position:position + self.max_key_length]:
            node = node.get(char)
            if node is None:
                break
            found = node.get(END_OF_KEY, found)
        return found

    def _may_extend(self, key):
        """Whether another key may start inside `key` and run past its end: whether a
        proper suffix of `key` is a proper prefix of some key."""
        return any(key[n:] in self.proper_prefixes for n in range(1, len(key)))

    @functools.cached_property
    def proper_prefixes(self):
        """Every proper prefix of a key; built when a text first holds a key."""
        return {key[:n] for key in self.keys for n in range(1, len(key))}

    def _cluster_end(self, text, start, end):
        position = start + 1
        while position < end:
            if key := self.longest_key_at(text, position):
                end = max(end, position + len(key))
            position += 1
        return end

    def _rewrite_cluster(self, cluster):
        found = {i for position in range(len(cluster))
                 if (key := self.longest_key_at(cluster, position))
                 for i in self.prefix_key_indices(key)}
        return self.replace_in_order(cluster, [self.keys[i] for i in sorted(found)])

    def prefix_key_indices(self, key):
        """The indices of the keys that are prefixes of `key` (itself included): exactly the
        keys that match where `key` is the longest match."""
        return [i for n in range(1, len(key) + 1) if (i := self.index.get(key[:n])) is not None]

    def replace_in_order(self, text, keys):
        for key in keys:
            text = text.replace(key, self.tags[key])
        return text


class KeyStartFilter:
    """Finds, with numpy over the whole text, the few places where an emoji key may start:
    a one-character key, or the first two characters of a longer one."""

    def __init__(self, keys):
        heads = vocabulary_codes(''.join({key[:2] for key in keys if len(key) > 1}))
        firsts, seconds = heads[0::2], heads[1::2]
        self.row = dense_index(firsts)
        self.column = dense_index(seconds)
        self.starts_pair = np.zeros((self.row.max() + 1, self.column.max() + 1), dtype=bool)
        self.starts_pair[self.row[firsts], self.column[seconds]] = True
        self.is_key = np.zeros(TAG_CODE_BASE, dtype=bool)
        self.is_key[vocabulary_codes(''.join(key for key in keys if len(key) == 1))] = True

    def candidates(self, text):
        """Positions in `text`, ascending, where some key may start (a superset)."""
        codes = text_codes(text)
        possible = self.is_key[codes]
        possible[:-1] |= self.starts_pair[self.row[codes[:-1]], self.column[codes[1:]]]
        return np.flatnonzero(possible).tolist()


def text_codes(text):
    """The code points of `text` as an int32 array. [len(text)]"""
    return np.frombuffer(text.encode('utf-32-le'), dtype=np.int32).copy()


def dense_index(codes, size=TAG_CODE_BASE):
    """An array mapping each of `codes` to 1, 2, ... in ascending order, every other code
    to 0."""
    index = np.zeros(size, dtype=np.int32)
    ascending = np.sort(codes)
    # Each code that differs from the one before. Not np.unique: its first call in a
    # process costs more than building all the tables.
    distinct = ascending[np.diff(ascending, prepend=-1) != 0]
    index[distinct] = np.arange(1, len(distinct) + 1)
    return index


def encoded_ids(tokens, ids):
    """The id that the text of each entry encodes to: its own, unless a later entry repeats
    it. [len(tokens)]"""
    if len(ids) == len(tokens):  # no entry is repeated
        return np.arange(len(tokens), dtype=np.int32)
    return np.fromiter(map(ids.__getitem__, tokens), dtype=np.int32, count=len(tokens))


def decoded_entries(tokens, tag_ids, emoji_inv):
    """The text each entry decodes to. [len(tokens)]

    `tag_ids` are the ids of the entries starting with "<": only those (emoji and
    whitespace tags) decode to something other than themselves.
    """
    decoded = list(tokens)
    for i in tag_ids:
        token = tokens[i]
        decoded[i] = (emoji_inv.get(token, token) if is_emoji_token(token)
                      else DECODED_TAGS.get(token, token))
    return decoded


class Encoder:
    """Text to ids and back (ENCODER.md). `tokens[id]` is the vocabulary entry of `id`."""

    def __init__(self, tokens, emoji, emoji_inv):
        self.tokens = list(tokens)
        entries = entry_codes(self.tokens)
        check_vocabulary_shape(self.tokens, entries)
        # Where an entry is repeated, its text encodes to the last one's id.
        self.ids = dict(zip(self.tokens, range(len(self.tokens))))
        self.eot_id = self.ids[END_OF_TEXT]
        self.replace_emoji = EmojiReplacer(emoji)
        tag_ids = np.flatnonzero(entries.first == ord(TAG_START)).tolist()
        self.decoded = decoded_entries(self.tokens, tag_ids, emoji_inv)
        self.byte_ids = np.array([self.ids[byte_token(b)] for b in range(255)] + [-1])
        self.tag_regex = trie_regex([self.tokens[i] for i in tag_ids])
        self._build_match_tables(entries)

    def _build_match_tables(self, entries):
        text_ids = encoded_ids(self.tokens, self.ids)
        # single_ids[code]: the id of the one-character entry `code`, or of the tag whose
        # id is code - TAG_CODE_BASE; -1 where the character falls back to bytes.
        self.single_ids = np.full(TAG_CODE_BASE + len(self.tokens), -1, dtype=np.int32)
        self.single_ids[TAG_CODE_BASE:] = np.arange(len(self.tokens))
        singles = entries.lengths == 1
        self.single_ids[entries.first[singles]] = text_ids[singles]
        # Two-character entries as a dense table: pair_ids[row[first], column[second]].
        # Row and column 0 stand for characters that begin or end no pair (-1 there).
        pairs = (entries.lengths == 2) & (entries.first != ord(TAG_START))
        firsts, seconds = entries.first[pairs], entries.second[pairs]
        self.pair_row = dense_index(firsts, len(self.single_ids))
        self.pair_column = dense_index(seconds, len(self.single_ids))
        self.pair_ids = np.full((self.pair_row.max() + 1, self.pair_column.max() + 1), -1,
                                dtype=np.int32)
        self.pair_ids[self.pair_row[firsts], self.pair_column[seconds]] = text_ids[pairs]

    def __len__(self):
        return len(self.tokens)

    def encode(self, text, clean=False):
        """The token ids of `text`; `clean` replaces URLs, dates, ... by tags first."""
        for old, new in WHITESPACE_REPLACEMENTS:
            text = text.replace(old, new)
        text = self.replace_emoji(text)
        if clean:
            text = clean_text(text)
        if not text:
            return []
        return self._longest_match(text)

    def _longest_match(self, text):
        # Every '<' starts a token: no entry holds a '<' after its first character, so no
        # match can run over one. Each tag (or lone '<') then stands for itself as one code
        # beyond Unicode, and the rest is matched by _match_pairs.
        codes = text_codes(text)
        spans = [(m.start(), m.end(), self.ids[m.group()]) for m in self.tag_regex.finditer(text)]
        if spans:
            starts, ends, tag_ids = np.array(spans, dtype=np.int32).T
            codes[starts] = TAG_CODE_BASE + tag_ids
            # Drop the characters after each tag's '<': +1 opens a tag's tail, -1 closes it.
            depth = np.zeros(len(codes) + 1, dtype=np.int32)
            depth[starts + 1] += 1
            depth[ends] -= 1
            codes = codes[np.cumsum(depth[:-1]) == 0]
        return self._match_pairs(codes)

    def _match_pairs(self, codes):
        """Ids of the left-to-right longest match of `codes` (one or two characters each)."""
        # pair_id[p]: id of the entry codes[p:p+2], or -1. [len(codes)]
        pair_id = np.append(
            self.pair_ids[self.pair_row[codes[:-1]], self.pair_column[codes[1:]]], -1)
        has_pair = pair_id >= 0
        # A token starts at p unless a pair started at p-1. Within a run of positions that
        # all have a pair, pairs start at the run's first position and every second one.
        positions = np.arange(len(codes), dtype=np.int32)
        run_starts = has_pair & ~np.append(False, has_pair[:-1])
        run_start = np.maximum.accumulate(np.where(run_starts, positions, 0))
        pair_starts = has_pair & ((positions - run_start) & 1 == 0)
        token_starts = ~np.append(False, pair_starts[:-1])
        ids = np.where(pair_starts, pair_id, self.single_ids[codes])[token_starts]
        unknown = ids < 0
        if unknown.any():
            ids = self._with_bytes(ids, unknown, codes[token_starts][unknown])
        return ids.tolist()

    def _with_bytes(self, ids, unknown, unknown_codes):
        """`ids` with each unknown character replaced by the ids of its UTF-8 bytes."""
        utf8 = ''.join(map(chr, unknown_codes.tolist())).encode('utf-8')
        byte_ids = self.byte_ids[np.frombuffer(utf8, dtype=np.uint8)]
        widths = np.ones(len(ids), dtype=np.int64)
        widths[unknown] = 1 + (unknown_codes >= 0x80) + (unknown_codes >= 0x800) + (
            unknown_codes >= 0x10000)
        out = np.repeat(ids, widths)
        out[np.repeat(unknown, widths)] = byte_ids
        return out

    def decode(self, ids):
        """The text of `ids`: runs of byte tokens are read as UTF-8 (errors replaced)."""
        words, pending_bytes = [], bytearray()
        for token_id in ids:
            token = self.tokens[token_id]
            if is_byte_token(token):
                pending_bytes.append(int(token[6:-2]))
                continue
            if pending_bytes:
                words.append(pending_bytes.decode('utf-8', errors='replace'))
                pending_bytes = bytearray()
            words.append(self.decoded[token_id])
        if pending_bytes:
            words.append(pending_bytes.decode('utf-8', errors='replace'))
        return ''.join(words)
