"""``python -m utils.embedded_corpus``: write the embedded corpus and its tokenizer (see `corpus.main`)."""

from utils.cli import run
from utils.embedded_corpus.corpus import main

if __name__ == "__main__":
    run(main)
