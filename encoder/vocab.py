"""Finding and reading the vocabulary files (`ja-bpe.txt`, `emoji.json`).

The vocabulary is data that users keep beside their model; it is never part of the project.
Where it is looked for, in order (first hit wins):
  1. the directory given explicitly (`--vocab DIR`),
  2. the model directory,
  3. `$GPT2JA_VOCAB_DIR`,
  4. this `encoder/` folder (git-ignored, where a user may drop the files),
  5. the fetched copy, `$GPT2JA_HOME/vocab`: fetched there (fetch.py, checked against the
     released files' SHA-256) when none of the above has it, unless $GPT2JA_OFFLINE is set.
"""
import json
import os
from pathlib import Path

import fetch
from cli import UsageError

VOCAB_FILE = 'ja-bpe.txt'
EMOJI_FILE = 'emoji.json'
VOCAB_ENV = 'GPT2JA_VOCAB_DIR'
PACKAGE_DIR = Path(__file__).resolve().parent


class VocabularyError(UsageError):
    """The vocabulary files are missing or unreadable."""


def _has_vocab(directory):
    return (Path(directory) / VOCAB_FILE).is_file() and (Path(directory) / EMOJI_FILE).is_file()


def vocab_search_path(vocab_dir=None, model_dir=None):
    """The directories searched for the vocabulary, in order, as (label, path) pairs."""
    candidates = []
    if vocab_dir is not None:
        candidates.append(('--vocab', Path(vocab_dir)))
        return candidates  # an explicit choice is never silently replaced by another
    if model_dir is not None:
        candidates.append(('the model directory', Path(model_dir)))
    if os.environ.get(VOCAB_ENV):
        candidates.append(('$' + VOCAB_ENV, Path(os.environ[VOCAB_ENV])))
    candidates.append(('encoder/', PACKAGE_DIR))
    settings = fetch.Settings.from_env()
    candidates.append(('$GPT2JA_HOME/vocab', settings.home / fetch.VOCAB_SUBDIR))
    return candidates


def find_vocab_dir(vocab_dir=None, model_dir=None):
    """The directory holding both vocabulary files, fetched into the cache when no directory
    searched has them (unless --vocab was given or fetching is off); VocabularyError if none."""
    candidates = vocab_search_path(vocab_dir, model_dir)
    for _, directory in candidates:
        if _has_vocab(directory):
            return directory
    looked = ', '.join(f'{label} ({path})' for label, path in candidates)
    settings = fetch.Settings.from_env()
    if vocab_dir is None and not settings.offline:
        try:
            return fetch.fetch_vocab(settings)
        except fetch.FetchError as exc:
            raise VocabularyError(f'vocabulary not found in {looked}, and fetching it failed: '
                                  f'{exc}') from None
    offline = f' (${fetch.OFFLINE_ENV} is set)' if vocab_dir is None else ''
    raise VocabularyError(
        f'vocabulary not found: {VOCAB_FILE} and {EMOJI_FILE} must both be in one of: {looked}; '
        f'pass --vocab DIR, set ${VOCAB_ENV}, or fetch it with `{fetch.FETCH_COMMAND} vocab`'
        f'{offline}')


def find_model_vocab_dir(model):
    """The vocabulary of `--model` for tools that need only the vocabulary: a model
    directory's own (else searched for as above); for a released name with no such
    directory, the released vocabulary, without fetching the model itself."""
    path = Path(model)
    if path.is_dir():
        return find_vocab_dir(model_dir=path)
    if fetch.is_released(model):
        # Every released model has the same vocabulary; a cached copy of the model holds it.
        return find_vocab_dir(model_dir=fetch.cached_model_path(str(model)))
    raise VocabularyError(f'--model {model} is neither a model directory nor a released model '
                          f'({", ".join(fetch.RELEASED_MODELS)}); pass --model DIR or --vocab DIR')


def read_vocab(vocab_dir):
    """The token list of `ja-bpe.txt`: the id of a token is its 0-based line number."""
    path = Path(vocab_dir) / VOCAB_FILE
    try:
        text = path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f'cannot read {path}: {exc}') from None
    # Split on '\n' only: the file has no trailing newline, and tokens never contain '\n'.
    tokens = text.split('\n')
    if tokens and tokens[-1] == '':
        tokens.pop()  # tolerate a trailing newline added by an editor
    if len(tokens) < 2:
        raise VocabularyError(f'{path} holds no vocabulary')
    return tokens


def read_emoji(vocab_dir):
    """The two tables of `emoji.json`, keys kept in file order (the order matters)."""
    path = Path(vocab_dir) / EMOJI_FILE
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VocabularyError(f'cannot read {path}: {exc}') from None
    if (not isinstance(data, dict) or not isinstance(data.get('emoji'), dict)
            or not isinstance(data.get('emoji_inv'), dict)):
        raise VocabularyError(f'{path} must hold an object with "emoji" and "emoji_inv" objects')
    return data['emoji'], data['emoji_inv']
