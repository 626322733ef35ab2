"""The clean-up of `encode(text, clean=True)`: full-width ASCII to half-width, then URLs,
e-mail addresses, telephone numbers, dates and prices replaced by tags.

The patterns reproduce those of the encoder the released models were trained with,
quirks included (`2020年8月20日` becomes `<DATE>日`; ten bare digits are a `<TEL>`):
`../shared/reference/encoder-cases.jsonl` pins them. `\\d` matches any Unicode digit, as
it did in the original.
"""
import functools
import re

import jaconv

URL = r"(https?|ftp)(://[-_.!~*'()a-zA-Z0-9;/?:@&=+$,%#]+)"
EMAIL = r'[A-Za-z0-9._+]*@[-_0-9A-Za-z]+(\.[A-Za-z]+)*'
TEL = r'\(?[0-9]{2,4}[-()]?[0-9]{2,4}[-)]?[0-9]{3,4}'

MONTH = r'(0?[1-9]|1[0-2])'
DAY = r'(0?[1-9]|[12][0-9]|3[01])'
WEEKDAY = r'\([日月火水木金土]\)'
# What may trail a date: hours, minutes, colons and a weekday, in any order and number.
DATE_TAIL = r'(\d{1,2}|:|\d{1,2}時|\d{1,2}分|' + WEEKDAY + r')*'
WESTERN_DATE = r'(?=[0-9])([12]\d{3}[/\-年])*' + MONTH + r'[/\-月](' + DAY + r'日?)*' + DATE_TAIL
ERA_DATE = r'(明治|大正|昭和|平成|令和)\d{1,2}年' + MONTH + '月' + DAY + '日' + DATE_TAIL

NUMBER = r'(0|[1-9]\d*|[1-9]\d{0,2}(,\d{3})+)'
CURRENCY = r'(千円|万円|千万円|円|千ドル|万ドル|千万ドル|ドル|千ユーロ|万ユーロ|千万ユーロ|ユーロ)'
TAX = r'(\(税込\)|\(税抜\)|\+tax)'
PRICE = (r'(?=[\d億万千円ドユ])'  # the first character of any price; tried only there
         r'(' + NUMBER + r'*億)*(' + NUMBER + r'*万)*(' + NUMBER + r'*千)*'
         + NUMBER + r'*' + CURRENCY + r'+' + TAX + r'*')

# Order matters: a URL may hold an '@', and a date's digits could be read as a price.
# Each rule comes with a string that every match holds: a text without it is skipped.
CLEAN_RULES = [(re.compile(pattern), tag, required) for pattern, tag, required in [
    (URL, '<URL>', '://'), (EMAIL, '<EMAIL>', '@'), (TEL, '<TEL>', ''),
    (WESTERN_DATE, '<DATE>', ''), (ERA_DATE, '<DATE>', '年'), (PRICE, '<PRICE>', ''),
]]


@functools.cache
def half_width_conversion():
    """What `jaconv.z2h(kana=False, digit=True, ascii=True)` changes, as ({full: half},
    a regex matching any of the full characters); built on first use (0.1 s)."""
    # jaconv maps only characters of the Basic Multilingual Plane, one for one.
    every_char = ''.join(map(chr, range(0xD800))) + ''.join(map(chr, range(0xE000, 0x10000)))
    converted = jaconv.z2h(every_char, kana=False, digit=True, ascii=True)
    assert len(converted) == len(every_char)
    table = {a: b for a, b in zip(every_char, converted) if a != b}
    return table, re.compile('[' + ''.join(map(re.escape, table)) + ']')


def to_half_width(text):
    """`jaconv.z2h(text, kana=False, digit=True, ascii=True)`, faster on text that has
    few full-width characters (a regex finds them; translate looks up every character)."""
    table, full_width_char = half_width_conversion()
    return full_width_char.sub(lambda match: table[match.group()], text)


def clean_text(text):
    """`text` with full-width ASCII made half-width and URLs, e-mail addresses,
    telephone numbers, dates and prices replaced by `<URL>`, `<EMAIL>`, `<TEL>`,
    `<DATE>` and `<PRICE>`."""
    text = to_half_width(text)
    for pattern, tag, required in CLEAN_RULES:
        if required in text:
            text = pattern.sub(tag, text)
    return text
