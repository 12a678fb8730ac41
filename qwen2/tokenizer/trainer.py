"""Learn a byte-level BPE vocabulary the way Qwen2's was built: NFC, Qwen2's split regex, GPT-2's
byte alphabet (so every string encodes, no unknown token), merges learned within the regex's
pieces, control tokens appended after the regular vocabulary.

The counting and merging run in the `tokenizers` library's BPE trainer (Rust, multi-threaded);
this module fixes the pipeline around it to Qwen2's and turns the result into a `Tokenizer`, whose
save() writes tokenizer.json, vocab.json, merges.txt and tokenizer_config.json that both this
package and `transformers` load with identical ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from qwen2.tokenizer.bpe import Tokenizer
from qwen2.tokenizer.chat import CHATML_TEMPLATE
from qwen2.tokenizer.vocab import PRETOKENIZE_REGEX, AddedToken, Vocabulary, build_tokenizer_json, bytes_to_token

# Qwen2's control tokens, in id order after the regular vocabulary (151643, 151644, 151645 in Qwen2).
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BYTE_ALPHABET = 256


@dataclass(frozen=True)
class TrainerConfig:
    vocab_size: int  # regular tokens + control tokens: the tokenizer's vocab_size
    min_frequency: int = 2  # a pair seen fewer times is never merged
    control_tokens: tuple[str, ...] = CONTROL_TOKENS
    max_token_length: int | None = 32  # characters of a merged token (byte-level); None = no limit
    chat_template: str | None = CHATML_TEMPLATE
    show_progress: bool = True

    def __post_init__(self) -> None:
        if len(set(self.control_tokens)) != len(self.control_tokens) or not all(self.control_tokens):
            raise ValueError(f"control tokens must be distinct non-empty strings: {self.control_tokens!r}")
        least = BYTE_ALPHABET + len(self.control_tokens)
        if not isinstance(self.vocab_size, int) or self.vocab_size < least:
            raise ValueError(f"vocab_size must be at least {least} (256 byte tokens + "
                             f"{len(self.control_tokens)} control tokens); got {self.vocab_size!r}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be at least 1; got {self.min_frequency}")


def train_tokenizer(texts: Iterable[str], config: TrainerConfig, *, length: int | None = None) -> Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer learned from `texts` (any iterable of documents;
    `length`, if known, only sizes the progress bar). Ids 0-255 are the single bytes in byte
    order, then one token per merge in the order learned, then the control tokens.
    The first control token is end-of-text (eos and pad), as in Qwen2's base models."""
    from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer(models.BPE())
    rust.normalizer = normalizers.NFC()
    rust.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = [bytes_to_token(bytes([b])) for b in range(BYTE_ALPHABET)]
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size - len(config.control_tokens),
                                  min_frequency=config.min_frequency, show_progress=config.show_progress,
                                  initial_alphabet=alphabet, special_tokens=[],
                                  max_token_length=config.max_token_length)
    rust.train_from_iterator(texts, trainer, length=length)
    model = json.loads(rust.to_str())["model"]
    learned = {token: i for token, i in model["vocab"].items()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Bytes first in byte order (the trainer orders its alphabet by character), then each merge's
    # result in merge order: an id then says how early a token was learned, as in GPT-2 and Qwen2.
    tokens = alphabet + [a + b for a, b in merges]
    if sorted(tokens) != sorted(learned) or len(set(tokens)) != len(tokens):
        raise RuntimeError("the BPE trainer's vocabulary is not the byte alphabet plus one token per merge")
    first = len(tokens)
    added = [AddedToken(id=first + i, content=t, special=True) for i, t in enumerate(config.control_tokens)]
    vocab = Vocabulary(tokens=tokens, merges=merges, added=added)  # type: ignore[arg-type]
    tokenizer_config = {"eos_token": config.control_tokens[0], "pad_token": config.control_tokens[0],
                        "bos_token": None, "chat_template": config.chat_template}
    return Tokenizer.from_tokenizer_json(build_tokenizer_json(vocab), tokenizer_config)
