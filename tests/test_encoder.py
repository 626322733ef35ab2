"""The encoder gives the ids of the released models: the reference cases, and the same
ids and text as the plain reading of ENCODER.md (tests/plain_encoder.py) on thousands of
generated texts; and each shortcut taken in building the encoder gives what its plain
definition gives.

Run: python3 -m pytest -q tests/test_encoder.py
"""
import itertools
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoder import Encoder, VocabularyError, get_encoder
from encoder.bpe import EmojiReplacer, any_key_meets_a_tag, trie_regex
from plain_encoder import PlainEncoder
from synthetic_vocab import synthetic_tokens

GENERATED = settings(max_examples=1000, derandomize=True, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])

JAPANESE = list('吾輩は猫である。名前はまだ無い、「」『』（）！？…・ー―‐日本語漢字カタカナｱｲｳ囧槑𠮷𩸽')
PIECES = ['\u200d', '\ufe0f', '\u20e3', '🏻', '🏼', '🏿', '🇯', '🇵', '♀', '♂', '❤', '👍', '(', ')', '^',
          '_', 'o', '>', '<', '|', '1', '#', '*']
REGIONAL_INDICATORS = [chr(0x1F1E6 + i) for i in range(26)]
WHITESPACE = [' ', '\u3000', '\r\n', '\r', '\n', '\t', '—', '−']
TAGS = ['<BR>', '<SP>', '<TAB>', '<|endoftext|>', '<|emoji3|>', '<|byte12|>', '<URL>', '<SP',
        '<|emo', '<|byte', '<|endoftext', '<>', '<<BR>>', '|>']
CLEAN_BITS = ['2020年8月20日', '2021/3/13', '12/24', '10時30分', '(木)', '令和2年12月24日(金)',
              '平成31年4月1日', '1,980円', '(税込)', '3億5000万ドル', '500千円', '+tax', '12万ユーロ',
              'https://example.com/a?b=1&c=2', 'ftp://x.jp', 'info@example.co.jp', '@foo', '.',
              '03-1234-5678', '(03)1234-5678', '0120', '１２３', 'ＡＢＣ＠ｅｘ．ｊｐ', '０３－１２３４',
              '2', '0', '9', '99', ':', ',', '-', '/', '年', '月', '日', '円', 'ドル']


@pytest.fixture(scope='module')
def encoder(vocab_dir):
    return get_encoder(vocab_dir)


@pytest.fixture(scope='module')
def plain(vocab_dir):
    return PlainEncoder(vocab_dir)


@pytest.fixture(scope='module')
def synthetic_plain(synthetic_vocab_dir):
    return PlainEncoder(synthetic_vocab_dir)


def reference_cases(shared_dir):
    with open(shared_dir / 'reference' / 'encoder-cases.jsonl', encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def test_reference_cases(encoder, shared_dir):
    cases = reference_cases(shared_dir)
    assert len(cases) == 80
    for case in cases:
        ids = encoder.encode(case['text'], clean=case['clean'])
        assert ids == case['ids'], case['text']
        assert encoder.decode(ids) == case['decoded'], case['text']


def test_plain_encoder_matches_reference_cases(plain, shared_dir):
    # The plain reading is the yardstick for the fast one, so it must itself be right.
    for case in reference_cases(shared_dir):
        assert plain.encode(case['text'], clean=case['clean']) == case['ids'], case['text']


def test_vocabulary_attributes(encoder):
    assert len(encoder) == 20573 == len(encoder.tokens)
    assert encoder.eot_id == 20572
    assert encoder.tokens[encoder.eot_id] == '<|endoftext|>'
    assert encoder.encode('<|endoftext|>') == [encoder.eot_id]
    ids = encoder.encode('猫 😀')
    assert [encoder.tokens[i] for i in ids] == ['猫', '<SP>', '<|emoji1|>']


def fragments(emoji_keys, clean):
    key_piece = st.sampled_from(emoji_keys).flatmap(
        lambda key: st.tuples(st.integers(0, len(key)), st.integers(0, len(key))).map(
            lambda ends: key[min(ends):max(ends)]))
    # Flags are pairs of regional indicators, so a run of them holds overlapping keys.
    regional_indicators = st.lists(st.sampled_from(REGIONAL_INDICATORS), min_size=2,
                                   max_size=5).map(''.join)
    key_then_piece = st.tuples(st.sampled_from(emoji_keys), key_piece).map(''.join)
    choices = [
        regional_indicators, key_then_piece, st.sampled_from(JAPANESE), st.characters(min_codepoint=32, max_codepoint=126),
        st.sampled_from(emoji_keys), key_piece, st.sampled_from(PIECES),
        st.sampled_from(WHITESPACE), st.sampled_from(TAGS),
        st.characters(min_codepoint=0xFF01, max_codepoint=0xFF5E),  # full-width ASCII
        st.characters(codec='utf-8', exclude_categories=['Cs']),  # anything, often bytes
    ]
    if clean:
        choices.append(st.sampled_from(CLEAN_BITS))
    return st.one_of(choices)


def texts(emoji_keys, clean):
    return st.lists(fragments(emoji_keys, clean), max_size=40).map(''.join)


@pytest.mark.slow
@GENERATED
@given(data=st.data())
def test_generated_texts_match_plain_encoder(encoder, plain, data):
    text = data.draw(texts(list(plain.emoji), clean=False))
    ids = encoder.encode(text)
    assert ids == plain.encode(text)
    assert encoder.decode(ids) == plain.decode(ids)


@pytest.mark.slow
@GENERATED
@given(data=st.data())
def test_generated_texts_with_clean_match_plain_encoder(encoder, plain, data):
    text = data.draw(texts(list(plain.emoji), clean=True))
    ids = encoder.encode(text, clean=True)
    assert ids == plain.encode(text, clean=True)
    assert encoder.decode(ids) == plain.decode(ids)


@pytest.mark.slow
@settings(max_examples=200, derandomize=True, deadline=None)
@given(data=st.data(), clean=st.booleans())
def test_generated_texts_match_plain_encoder_on_the_synthetic_vocabulary(synthetic_encoder,
                                                                        synthetic_plain, data, clean):
    # Runs without ../shared; the released vocabulary's larger emoji table is the case above.
    text = data.draw(texts(list(synthetic_plain.emoji), clean=clean))
    ids = synthetic_encoder.encode(text, clean=clean)
    assert ids == synthetic_plain.encode(text, clean=clean)
    assert synthetic_encoder.decode(ids) == synthetic_plain.decode(ids)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(data=st.data())
def test_decode_of_any_ids_matches_plain_encoder(encoder, plain, data):
    ids = data.draw(st.lists(st.one_of(st.integers(0, len(encoder) - 1),
                                       st.integers(20316, 20571)),  # byte tokens, often
                             max_size=30))
    assert encoder.decode(ids) == plain.decode(ids)


def test_long_texts_match_plain_encoder(encoder, plain, shared_dir):
    mixed = (shared_dir / 'corpus' / 'mixed-sns.txt').read_text(encoding='utf-8')[:20000]
    for clean in (False, True):
        assert encoder.encode(mixed, clean=clean) == plain.encode(mixed, clean=clean)


def test_emoji_order_decides_overlaps():
    # '🏻' comes first, so '👍🏻' can no longer match once it is replaced.
    replace = EmojiReplacer({'🏻': '<|emoji1|>', '👍🏻': '<|emoji2|>', '👍': '<|emoji3|>'})
    assert replace('a👍🏻b') == 'a<|emoji3|><|emoji1|>b'
    replace = EmojiReplacer({'👍🏻': '<|emoji2|>', '🏻': '<|emoji1|>'})
    assert replace('a👍🏻🏻') == 'a<|emoji2|><|emoji1|>'


def test_emoji_falls_back_to_whole_text_pass_where_a_tag_can_complete_a_key():
    # The tag of 'x' ends in 'T>', which with the 'y' after it makes the later key 'T>y'.
    replace = EmojiReplacer({'x': '<T>', 'T>y': '<U>'})
    assert not replace.tags_are_barriers
    assert replace('xy') == '<<U>'


BYTES_AND_END = [f'<|byte{b}|>' for b in range(255)] + ['<|endoftext|>']
LONG = 'only entries starting with "<" may be longer than two characters'


@pytest.mark.parametrize('tokens, message', [
    (['a', 'abc'] + BYTES_AND_END, f"unexpected vocabulary entry 'abc': {LONG}"),
    # The first offender in vocabulary order is named, whatever its fault.
    (['a', 'b<', 'abc'] + BYTES_AND_END, 'unexpected vocabulary entry \'b<\': "<" inside an entry'),
    (['a', 'abc', 'b<'] + BYTES_AND_END, f"unexpected vocabulary entry 'abc': {LONG}"),
    (['<a<'] + BYTES_AND_END, 'unexpected vocabulary entry \'<a<\': "<" inside an entry'),
    (['a', '', 'abc'] + BYTES_AND_END, "unexpected vocabulary entry ''"),
    (['a', 'abc'] + BYTES_AND_END[1:], f"unexpected vocabulary entry 'abc': {LONG}"),
    (['a'] + BYTES_AND_END[:7] + BYTES_AND_END[8:], 'vocabulary lacks <|byte7|>'),
    (['a'] + BYTES_AND_END[:-1], 'vocabulary lacks <|endoftext|>'),
])
def test_unexpected_vocabulary_shape_is_refused(tokens, message):
    with pytest.raises(VocabularyError) as error:
        Encoder(tokens, {}, {})
    assert str(error.value) == message


def test_a_repeated_entry_encodes_to_its_last_id_and_each_copy_decodes(tmp_path,
                                                                      synthetic_vocab_dir):
    tokens = synthetic_tokens()
    tokens[1:1] = ['は', '<SP>', 'から', '<|emoji1|>']  # each is also elsewhere, before or after
    (tmp_path / 'ja-bpe.txt').write_text('\n'.join(tokens), encoding='utf-8')
    shutil.copy(synthetic_vocab_dir / 'emoji.json', tmp_path)
    fast, plain = get_encoder(tmp_path), PlainEncoder(tmp_path)
    text = '吾輩は猫 から😀 '
    assert fast.encode(text) == plain.encode(text)
    assert fast.decode(range(len(tokens))) == plain.decode(range(len(tokens)))


def test_an_entry_holding_a_lone_surrogate_is_accepted_as_any_other():
    encoder = Encoder(['a', '\ud800'] + BYTES_AND_END, {}, {})
    assert encoder.decode([1, 0]) == '\ud800a'


# -- building the encoder: each shortcut gives what its plain definition gives ------------

def key_meets_tag(key, tag):
    """Whether an occurrence of `key` could overlap an occurrence of `tag` in some text: the
    plain definition that bpe.any_key_meets_a_tag answers for many keys and tags at once."""
    return (key in tag or tag in key
            or any(tag.startswith(key[-n:]) or tag.endswith(key[:n]) for n in range(1, len(key))))


def plain_may_extend(keys):
    """The keys inside which another key may start and run past their end."""
    proper_prefixes = {key[:n] for key in keys for n in range(1, len(key))}
    return {key for key in keys if any(key[j:] in proper_prefixes for j in range(1, len(key)))}


# Every string of one to three characters over a small alphabet: between them, every way
# for two short strings to overlap at either end, contain one another or miss.
SHORT_STRINGS = [''.join(chars) for n in range(1, 4)
                 for chars in itertools.product('ab<', repeat=n)]


def test_key_meets_tag_check_equals_the_plain_definition_for_each_pair():
    for key, tag in itertools.product(SHORT_STRINGS, SHORT_STRINGS):
        assert any_key_meets_a_tag([key], [tag]) == key_meets_tag(key, tag), (key, tag)


@pytest.mark.parametrize('key, meets', [
    ('😀', False), ('(^_^)', False),
    ('x<', True), ('x<|e', True),  # runs into a tag
    ('>x', True), ('1|>x', True),  # a tag runs into it
    ('moji1', True), ('<|emoji2|>', True),  # inside a tag
    ('x<|emoji1|>y', True),  # holds a tag
    ('e|', False), ('x>y', False), ('2<|emoji1', True),  # shares characters with the tags
])
def test_key_meets_tag_check_on_emoji_tags(key, meets):
    tags = ['<|emoji1|>', '<|emoji2|>']
    assert any_key_meets_a_tag(['😀', key], tags) == meets
    assert any(key_meets_tag(key, tag) for tag in tags) == meets


@settings(max_examples=500, derandomize=True, deadline=None)
@given(keys=st.lists(st.text('ab<>', max_size=4), max_size=6),
       tags=st.lists(st.text('ab<>', max_size=4), max_size=3))
def test_key_meets_tag_check_equals_the_plain_definition_for_sets(keys, tags):
    assert any_key_meets_a_tag(keys, tags) == any(
        key_meets_tag(key, tag) for key in keys for tag in tags)


@settings(max_examples=500, derandomize=True, deadline=None)
@given(keys=st.lists(st.text('ab|', min_size=1, max_size=5), min_size=1, max_size=8,
                     unique=True))
def test_may_extend_equals_the_plain_definition(keys):
    replace = EmojiReplacer({key: '<|emoji1|>' for key in keys})
    assert {key for key in keys if replace.may_extend(key)} == plain_may_extend(keys)


def test_shortcuts_equal_their_plain_definitions_on_the_released_emoji(plain):
    replace = EmojiReplacer(plain.emoji)
    may_extend = {key for key in replace.keys if replace.may_extend(key)}
    assert may_extend == plain_may_extend(replace.keys)
    tags = set(plain.emoji.values())
    assert replace.tags_are_barriers
    assert not any(key_meets_tag(key, tag) for key in replace.keys for tag in tags)


@settings(max_examples=500, derandomize=True, deadline=None)
@given(words=st.lists(st.text('ab-]^\\|', min_size=1, max_size=4), min_size=1, max_size=10),
       text=st.text('ab-]^\\|', max_size=12))
def test_tag_regex_matches_the_longest_word_at_each_position(words, text):
    regex = trie_regex(words)
    for position in range(len(text)):
        longest = max((word for word in words if text.startswith(word, position)), key=len,
                      default=None)
        match = regex.match(text, position)
        assert (match and match.group()) == longest, position


def test_lone_surrogate_is_refused_like_the_original(synthetic_encoder, synthetic_plain):
    for enc in (synthetic_encoder, synthetic_plain):
        with pytest.raises(UnicodeEncodeError):
            enc.encode('猫\ud800')
