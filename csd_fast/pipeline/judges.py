"""What `csd eval` measures a response with: a language identifier and a reward model.

    judge = LanguageJudge(["en", "da"])
    judge.language("Bilen er rød.")            # "da" (None when undecided)
    judge.switches("The car is red. Bilen er rød og huset er hvidt.")   # True
    scorer = RewardScorer("path/to/rm")          # AutoModelForSequenceClassification, num_labels 1
    scorer.score(prompts, responses)             # raw logits (no sigmoid), one per response

Language identification is lingua (`pip install lingua-language-detector`, models inside the
wheel: nothing is downloaded), restricted to the languages under evaluation plus `extra`
candidates (restricting the candidates is what makes it reliable on short responses). A response
code-switches when lingua's mixed-language pass finds at least two languages, each over at
least `min_words` words (shorter runs are names, loanwords, code: not a switch).

Reward scoring follows the Skywork-Reward-V2 usage (REFERENCE.md): the RM's own chat template
over [user: prompt, assistant: response] when it has one (no system prompt), a duplicated leading
BOS stripped, and the raw logit as the score: win rates and μ±2σ pair rules need raw logits, not
sigmoids. Without a chat template the text is prompt + response. The transformers path here is the
fallback until the sampling harness's vLLM scorer (`csd score`, issue #9) lands.
"""

from __future__ import annotations

import json


class LanguageJudge:
    """lingua over a fixed set of ISO 639-1 codes."""

    def __init__(self, languages: list[str], extra: tuple[str, ...] = ("en",), min_words: int = 3):
        try:
            from lingua import IsoCode639_1, LanguageDetectorBuilder
        except ImportError as e:
            raise ImportError(
                "language fidelity needs `pip install lingua-language-detector` "
                "(or `pip install -e .[eval]`)"
            ) from e
        codes = sorted({*languages, *extra})
        isos = []
        for code in codes:
            try:
                isos.append(IsoCode639_1.from_str(code))
            except ValueError:
                raise ValueError(
                    f"language {code!r} is not an ISO 639-1 code lingua knows (e.g. 'da', 'en')"
                ) from None
        if len(isos) < 2:
            raise ValueError(f"language identification needs two candidate languages, got {codes}")
        self._detector = LanguageDetectorBuilder.from_iso_codes_639_1(*isos).build()
        self.min_words = min_words

    @staticmethod
    def _code(language) -> str:
        return language.iso_code_639_1.name.lower()

    def language(self, text: str) -> str | None:
        found = self._detector.detect_language_of(text)
        return None if found is None else self._code(found)

    def switches(self, text: str) -> bool:
        runs = self._detector.detect_multiple_languages_of(text)
        langs = {self._code(r.language) for r in runs if r.word_count >= self.min_words}
        return len(langs) >= 2


class RewardScorer:
    """A sequence-classification reward model (num_labels 1) scoring with raw logits."""

    def __init__(self, model_path: str, *, batch_size: int = 16, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype=torch.float32
        ).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_path}: a reward model has num_labels=1, not "
                             f"{self.model.config.num_labels}")  # fmt: skip
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size

    def _ids(self, prompt, response: str) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str) and prompt.startswith("[{"):
            prompt = json.loads(prompt)  # a message list stored as JSON in a Parquet shard
        if tok.chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(
                [*messages, {"role": "assistant", "content": response}], tokenize=False
            )
            ids = tok(text, add_special_tokens=True)["input_ids"]
            bos = tok.bos_token_id
            if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
                ids = ids[1:]  # the template wrote BOS and the tokenizer added another
            return ids
        return tok(prompt + response, add_special_tokens=True)["input_ids"]

    def score(self, prompts: list, responses: list[str]) -> list[float]:
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        pad = self.tokenizer.pad_token_id
        out: list[float] = []
        for s in range(0, len(responses), self.batch_size):
            seqs = [self._ids(p, r) for p, r in zip(prompts[s : s + self.batch_size],
                                                     responses[s : s + self.batch_size],
                                                     strict=True)]  # fmt: skip
            T = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), T), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), T), dtype=torch.long)
            for i, x in enumerate(seqs):  # right padding: the model reads the last real token
                ids[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
            out += logits[:, 0].float().cpu().tolist()
        return out
