"""Generation engines behind `csd sample` / `csd translate`: vLLM's offline `LLM`, or transformers.

    engine = open_engine("vllm", model_dir, profile, max_model_len=2048, seed=0)
    outs = engine.generate(prompt_ids, GenParams(n=64, temperature=1.0, max_tokens=512), seeds)
    outs[i][k]  # Completion(token_ids, text, finish_reason, cumulative_logprob) of prompt i
    engine.close()                       # explicit shutdown: interpreter-exit teardown can abort

Both take token ids (the prompt rendered once by `csd_fast.sampling.inputs`), so they see the same
tokens. vLLM gets one request per prompt with `n=K` (the prompt is prefilled once and its KV blocks
shared by the K samples; prefix caching on) and that prompt's own seed, so a prompt draws the same
samples whatever else is in the batch or the shard. The transformers engine seeds torch before
each prompt's `generate(num_return_sequences=K)` for the same reason. Texts are decoded as vLLM's
detokenizer does (the continuation of the decoded prompt), and stop strings cut them alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GenParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    cumulative_logprob: float | None


class VllmEngine:
    """vLLM's offline engine; the profile's arguments and any overrides go to `LLM(...)`."""

    def __init__(self, model: str, engine_args: dict, *, seed: int, max_model_len: int | None):
        from vllm import LLM

        args = dict(engine_args)
        if max_model_len:
            args.setdefault("max_model_len", max_model_len)
        self.llm = LLM(model=model, seed=seed, **args)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[list[int]], params: GenParams, seeds: list[int]):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sps = [
            SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else 0,
                max_tokens=params.max_tokens,
                stop=list(params.stop) or None,
                seed=seed,
                logprobs=0,  # the sampled token's log-prob only: cumulative_logprob is filled
            )
            for seed in seeds
        ]
        reqs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        outs = self.llm.generate(reqs, sps, use_tqdm=False)
        result = []
        for out in outs:
            comps = sorted(out.outputs, key=lambda c: c.index)
            result.append(
                [
                    Completion(
                        list(c.token_ids),
                        c.text,
                        c.finish_reason or "stop",
                        _finite(c.cumulative_logprob),
                    )
                    for c in comps
                ]
            )
        return result

    def close(self) -> None:
        shutdown_vllm(self.llm)
        self.llm = None


def shutdown_vllm(llm) -> None:
    """Stop vLLM's engine core (and its workers) now, not at interpreter exit."""
    if llm is None:
        return
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    import gc

    del llm, engine, core
    gc.collect()


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


class HfEngine:
    """transformers' `generate`, one prompt (with its K samples) per call, seeded per prompt."""

    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def generate(self, prompts: list[list[int]], params: GenParams, seeds: list[int]):
        return [self._one(ids, params, seed) for ids, seed in zip(prompts, seeds, strict=True)]

    def _one(self, ids: list[int], params: GenParams, seed: int) -> list[Completion]:
        import torch

        tok, model = self.tokenizer, self.model
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        if tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
        greedy = params.temperature <= 0
        kwargs = dict(
            max_new_tokens=params.max_tokens,
            num_return_sequences=params.n,
            do_sample=not greedy,
            pad_token_id=pad,
            eos_token_id=sorted(eos) or None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        if not greedy:
            kwargs.update(
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else None,
            )
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            # our own check on the decoded text: transformers' stop_strings criterion builds
            # token tables that fail on some tokenizers (e.g. word-level Metaspace ones)
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_StopOnStrings(tok, params.stop, len(ids))]
            )
        torch.manual_seed(seed)
        input_ids = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new = out.sequences[:, len(ids) :]  # (n, steps)
        # raw (pre-temperature) log-probs of the chosen tokens, as vLLM's default logprobs mode
        logits = torch.stack(out.logits, dim=1).float()  # (n, steps, V)
        token_logps = logits.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        head = tok.decode(ids, skip_special_tokens=True)
        comps = []
        for k in range(new.shape[0]):
            seq = new[k].tolist()
            end = next((t + 1 for t, x in enumerate(seq) if x in eos), None)
            stopped = end is not None
            seq = seq[:end] if stopped else seq
            full = tok.decode(ids + seq, skip_special_tokens=True)
            text = full[len(head) :] if full.startswith(head) else tok.decode(seq, True)
            cut = [text.find(s) for s in params.stop if s in text]
            if cut:
                text, stopped = text[: min(cut)], True
            reason = "stop" if stopped or len(seq) < params.max_tokens else "length"
            logp = float(token_logps[k, : len(seq)].sum())
            comps.append(Completion(seq, text, reason, _finite(logp)))
        return comps

    def close(self) -> None:
        self.model = None


class _StopOnStrings:
    """Stop a sequence once its decoded continuation contains one of the stop strings."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_len :], skip_special_tokens=True
        )
        hit = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


def open_engine(
    backend: str, model: str, profile, *, seed: int, max_model_len: int | None, dtype: str = "auto"
):
    """The engine of `backend` ("vllm" | "hf") with the profile's arguments applied."""
    if backend == "vllm":
        return VllmEngine(model, profile.engine, seed=seed, max_model_len=max_model_len)
    if backend == "hf":
        if dtype == "auto" and profile.name == "cpu":
            dtype = "float32"
        return HfEngine(model, dtype=dtype)
    raise ValueError(f"unknown backend {backend!r} (vllm | hf)")
