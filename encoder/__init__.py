"""The Japanese BPE encoder of the released gpt2ja models (see ENCODER.md in the shared data).

    from encoder import get_encoder, find_vocab_dir
    enc = get_encoder(find_vocab_dir(args.vocab))
    ids = enc.encode('吾輩は猫である。')   # list of ints
    text = enc.decode(ids)

`python -m encoder --help` encodes a folder of .txt files into an .npz of token ids.
"""
from encoder.bpe import Encoder, get_encoder  # noqa: F401
from encoder.vocab import VocabularyError, find_vocab_dir, read_emoji, read_vocab  # noqa: F401
