"""The Japanese BPE encoder of the released gpt2ja models (see ENCODER.md in the shared data)."""
from encoder.vocab import VocabularyError, find_vocab_dir, read_emoji, read_vocab  # noqa: F401
