"""A small vocabulary in the exact format of the released one (`ja-bpe.txt`, `emoji.json`;
see ENCODER.md in the shared data), so that tiny models can be built and run anywhere.

It has what the encoder requires of a vocabulary (every `<|byteB|>` tag, `<|endoftext|>`
last, no entry longer than two characters unless it is a tag) and enough Japanese to
encode the tests' texts mostly without byte fallbacks:

    write_synthetic_vocab(directory)   # -> directory, holding ja-bpe.txt and emoji.json
"""
import json
from pathlib import Path

HIRAGANA = [chr(code) for code in range(0x3041, 0x3097)]
KATAKANA = [chr(code) for code in range(0x30A1, 0x30FB)] + ['ー']
ASCII = [chr(code) for code in range(0x21, 0x7F)]  # '<' included, as in the released file
PUNCTUATION = list('。、「」『』（）！？…・〜')
KANJI = list('吾輩猫名前無今日晴犬本語漢字一二三四五六七八九十百千万円年月時分人大小中上下山川'
             '田学生先何私彼女子手目口出入見言気行来思雨天')
PAIRS = ['から', 'した', 'する', 'です', 'その', 'ある', 'まだ', 'ない', 'ます', 'こと', 'もの',
         'すも', 'もも', 'は猫', '吾輩', '名前', '今日', '晴れ', '日本', '本語', '漢字']
# The order of the released file: whitespace tags, clean-up tags, emoji, bytes, end of text.
TAGS = ['<BR>', '<SP>', '<TAB>', '<URL>', '<EMAIL>', '<TEL>', '<DATE>', '<PRICE>']
# emoji.json: keys in file order (the order matters), several keys may share one tag, and
# one key ('👍🏻') holds another ('👍') as its prefix.
EMOJI = {'😀': '<|emoji1|>', '😃': '<|emoji1|>', '👍🏻': '<|emoji2|>', '👍': '<|emoji2|>',
         '(^_^)': '<|emoji3|>'}
EMOJI_TAGS = sorted(set(EMOJI.values()))
END_OF_TEXT = '<|endoftext|>'


def synthetic_tokens():
    """The entries of ja-bpe.txt in order: the id of a token is its index."""
    return (PAIRS + HIRAGANA + KATAKANA + ASCII + PUNCTUATION + KANJI + TAGS + EMOJI_TAGS
            + [f'<|byte{b}|>' for b in range(255)] + [END_OF_TEXT])


def write_synthetic_vocab(directory):
    """Write ja-bpe.txt and emoji.json into `directory` (made if needed); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # As in the released file: one entry a line, no newline after the last.
    (directory / 'ja-bpe.txt').write_text('\n'.join(synthetic_tokens()), encoding='utf-8')
    inverse = {}
    for text, tag in EMOJI.items():
        inverse.setdefault(tag, text)
    (directory / 'emoji.json').write_text(
        json.dumps({'emoji': EMOJI, 'emoji_inv': inverse}, ensure_ascii=False), encoding='utf-8')
    return directory
