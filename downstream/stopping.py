"""When greedy generation stops (`downstream.eval_qa`): per row at a complete answer line or at a stop string, or,
as the authors' WebQuestions / TriviaQA evaluator, for the whole batch at once (`BatchStopStrings`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StoppingCriteria


class AnswerLineComplete(StoppingCriteria):
    """Per row: stop once the generated text has a newline after its first non-blank character."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


class StopStrings(StoppingCriteria):
    """Per row: stop once the generated text contains any of ``stop``."""

    def __init__(self, tokenizer, prompt_width: int, stop: Sequence[str]):
        self.tokenizer, self.prompt_width, self.stop = tokenizer, prompt_width, tuple(stop)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool, device=input_ids.device)


class BatchStopStrings(StoppingCriteria):
    """The authors' WebQuestions / TriviaQA rule: the whole batch stops once, for one of ``stop``, every row has
    produced it (a row that has produced a string keeps counting as done for it); until then every row goes on."""

    def __init__(self, tokenizer, prompt_width: int, stop: Sequence[str]):
        self.tokenizer, self.prompt_width, self.stop = tokenizer, prompt_width, tuple(stop)
        self.seen = None  # (B, len(stop)) bool: which row has produced which stop string

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        now = torch.tensor([[s in t for s in self.stop] for t in texts], dtype=torch.bool)
        self.seen = now if self.seen is None else self.seen | now
        done = bool(self.seen.all(dim=0).any())
        return torch.full((len(texts),), done, dtype=torch.bool, device=input_ids.device)
