"""A real Llama whose greedy next token is looked up in a table, with a word-level tokenizer: generation tests
that need to know what each row will generate (when it produces a stop string, a newline, "Yes" or "No").

The model is `transformers.LlamaForCausalLM` with hand-set weights: one-hot token embeddings, attention and
feed-forward outputs zeroed (the residual stream is the token's embedding), and an LM head that maps each
token to its successor in the table. Its output at a position therefore depends on that position's token
only, whatever the padding, position or batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<eos>", "<s>", "[UNK]"]
PUNCTUATION = ["\n", ".", ",", "?", ":", "#"]


def save_table_model(directory: Path, words: list[str], table: dict[str, str], default: str,
                     add_bos: bool = False) -> Path:
    """Save the tokenizer and the model under ``directory``: after token ``w`` the model says ``table[w]``
    (``default`` for tokens not in the table). With ``add_bos`` the tokenizer puts ``<s>`` first, as Llama's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + PUNCTUATION + words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([  # words split at spaces; newlines and punctuation are tokens
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|[.,?:#]"), behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##")
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]",
                                        pad_token="<eos>", bos_token="<s>")
    tokenizer.save_pretrained(directory)

    size = len(vocab)
    config = LlamaConfig(vocab_size=size, hidden_size=4 * ((size + 3) // 4), intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=vocab["<s>"], eos_token_id=vocab["<eos>"],
                         pad_token_id=vocab["<eos>"])
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
        for token, index in vocab.items():
            model.model.embed_tokens.weight[index, index] = 1.0
            model.lm_head.weight[vocab[table.get(token, default)], index] = 10.0  # p(successor) ~ 1
    model.save_pretrained(directory)
    return directory
