"""A plain, obviously-correct implementation of ENCODER.md, kept as the reference.

It follows the text of ENCODER.md step by step, with no speed tricks: one scan of the
text per emoji key and a Python loop for the longest match. The tests check the fast
`encoder.Encoder` against it, and `bench/bench_encoder.py` times both. Its clean-up
regexes are written independently of `encoder/clean.py`, in the one-line form of the
original encoder, so that the property tests compare two spellings of the same rules.
"""
import json
import re
from pathlib import Path

import jaconv

PLAIN_REPLACEMENTS = [(' ', '<SP>'), ('\u3000', '<SP>'), ('\r\n', '<BR>'), ('\n', '<BR>'),
                      ('\r', '<BR>'), ('\t', '<TAB>'), ('\u2014', 'ー'), ('\u2212', 'ー')]

_WEEKDAYS = r'\(日\)|\(月\)|\(火\)|\(水\)|\(木\)|\(金\)|\(土\)'
_NUMBER = r'(0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)'
PLAIN_CLEAN_PATTERNS = [
    (r"(https?|ftp)(:\/\/[-_\.!~*\'()a-zA-Z0-9;\/?:\@&=\+$,%#]+)", '<URL>'),
    (r'[A-Za-z0-9\._+]*@[\-_0-9A-Za-z]+(\.[A-Za-z]+)*', '<EMAIL>'),
    (r'[\(]{0,1}[0-9]{2,4}[\)\-\(]{0,1}[0-9]{2,4}[\)\-]{0,1}[0-9]{3,4}', '<TEL>'),
    (r'([12]\d{3}[/\-年])*(0?[1-9]|1[0-2])[/\-月]((0?[1-9]|[12][0-9]|3[01])日?)*'
     r'(\d{1,2}|:|\d{1,2}時|\d{1,2}分|' + _WEEKDAYS + r')*', '<DATE>'),
    (r'(明治|大正|昭和|平成|令和)\d{1,2}年(0?[1-9]|1[0-2])月(0?[1-9]|[12][0-9]|3[01])日'
     r'(\d{1,2}|:|\d{1,2}時|\d{1,2}分|' + _WEEKDAYS + r')*', '<DATE>'),
    (r'(' + _NUMBER + r'*億)*(' + _NUMBER + r'*万)*(' + _NUMBER + r'*千)*' + _NUMBER + r'*'
     r'(千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)+'
     r'(\(税込\)|\(税抜\)|\+tax)*', '<PRICE>'),
]


class PlainEncoder:
    """ENCODER.md, literally. Slow; for tests and the benchmark only."""

    def __init__(self, vocab_dir):
        vocab_dir = Path(vocab_dir)
        self.tokens = (vocab_dir / 'ja-bpe.txt').read_text(encoding='utf-8').split('\n')
        emoji = json.loads((vocab_dir / 'emoji.json').read_text(encoding='utf-8'))
        self.emoji, self.emoji_inv = emoji['emoji'], emoji['emoji_inv']
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.maxlen = max(len(token) for token in self.tokens)
        self.clean_patterns = [(re.compile(p), tag) for p, tag in PLAIN_CLEAN_PATTERNS]

    def clean(self, text):
        text = jaconv.z2h(text, kana=False, digit=True, ascii=True)
        for pattern, tag in self.clean_patterns:
            text = pattern.sub(tag, text)
        return text

    def encode(self, text, clean=False):
        for old, new in PLAIN_REPLACEMENTS:
            text = text.replace(old, new)
        for key, tag in self.emoji.items():
            if key in text:
                text = text.replace(key, tag)
        if clean:
            text = self.clean(text)
        result = []
        pos = 0
        while pos < len(text):
            if text[pos] == '<':
                ends = range(min(len(text), pos + self.maxlen + 1), pos, -1)
            else:
                ends = (pos + 2, pos + 1)
            for end in ends:
                if end <= len(text) and text[pos:end] in self.ids:
                    result.append(self.ids[text[pos:end]])
                    pos = end
                    break
            else:
                result.extend(self.ids[f'<|byte{b}|>'] for b in text[pos].encode('utf-8'))
                pos += 1
        return result

    def decode(self, ids):
        words, pending_bytes = [], []
        for i in ids:
            token = self.tokens[i]
            if token.startswith('<|byte') and token.endswith('|>'):
                pending_bytes.append(int(token[6:-2]))
                continue
            if pending_bytes:
                words.append(bytes(pending_bytes).decode('utf-8', errors='replace'))
                pending_bytes = []
            if token.startswith('<|emoji') and token.endswith('|>'):
                words.append(self.emoji_inv[token])
            else:
                words.append({'<SP>': ' ', '<BR>': '\n', '<TAB>': '\t'}.get(token, token))
        if pending_bytes:
            words.append(bytes(pending_bytes).decode('utf-8', errors='replace'))
        return ''.join(words)
