"""Reward-model scoring: raw logits of a sequence-classification model, packed without padding.

    scorer = PackedScorer("path/to/rm", dtype="bfloat16")
    ids = rm_input_ids(scorer.tokenizer, messages, response)      # the RM's own chat template
    rewards = scorer.score(list_of_ids, max_batch_tokens=8192)    # (n,) float64, raw logits

The score is the logit of the single label (`num_labels == 1`), never a sigmoid: mean +- 2 sigma
statistics of a prompt's rewards (sweet-spot pairs) need the raw values. The conversation is
rendered with the RM's chat template and tokenized the way the RM's card does it (tokenizer
default special tokens); when that duplicates the template's BOS, the extra one is stripped.

Packing: the sequences of a batch are concatenated with restarting position ids and
per-sequence segment ids, the layout `csd_fast.attention`'s "csd_packed" attention reads (block
causal). With flash-attn (GPU, bf16/fp16) a batch is one row and the varlen kernel spends no
compute on padding; without it (CPU, or no flash-attn) the dense block mask would cost
(batch tokens)^2, so sequences are placed into rows as long as the batch's longest sequence and
only the row tails are padding. The backbone's last hidden state at each sequence's last token
goes through the RM's `score` head, which is what the padded model computes at its last non-pad
position (one row shown):

    tokens     a0 a1 a2 | b0 b1 | c0 c1 c2 c3
    positions   0  1  2 |  0  1 |  0  1  2  3
    segment     0  0  0 |  1  1 |  2  2  2  2
    scored          ^        ^              ^     -> score(h[2]), score(h[4]), score(h[8])

Batches are length-sorted and filled to a token budget; on out-of-memory a batch is split in
two and the budget halved for the rest of the run.
"""

from __future__ import annotations

import numpy as np
import torch


def rm_input_ids(tokenizer, messages: list[dict], response: str, chat_template: str = "auto"):
    """Token ids of (conversation + assistant response) as the reward model expects them."""
    conv = [*messages, {"role": "assistant", "content": response}]
    template = None
    if chat_template not in ("auto", "none"):
        from pathlib import Path

        template = Path(chat_template).read_text()
    if chat_template != "none" and (template or getattr(tokenizer, "chat_template", None)):
        text = tokenizer.apply_chat_template(conv, chat_template=template, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in conv)
    ids = list(tokenizer(text)["input_ids"])
    return strip_double_bos(ids, tokenizer.bos_token_id)


def strip_double_bos(ids: list[int], bos: int | None) -> list[int]:
    """Drop the BOS the tokenizer added in front of the one the chat template wrote."""
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids


def pack_sequences(seqs: list[list[int]], device, row_capacity: int | None = None):
    """(backbone kwargs for "csd_packed", (B,) flat index of each sequence's last token).

    row_capacity=None: one row of sum(lengths) tokens with cu_seqlens (flash-attn's varlen
    kernel: attention cost is per sequence). Otherwise sequences are placed first-fit (longest
    first) into rows of row_capacity tokens: the dense block mask then costs R x C^2 instead of
    (sum of lengths)^2, and only the rows' tails are padding.
    """
    if row_capacity is None:
        rows = [list(range(len(seqs)))]
    else:
        rows, free = [], []
        for i in sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i)):
            r = next((r for r, f in enumerate(free) if f >= len(seqs[i])), None)
            if r is None:
                rows.append([])
                free.append(max(row_capacity, len(seqs[i])))
                r = len(rows) - 1
            rows[r].append(i)
            free[r] -= len(seqs[i])
    T = max(sum(len(seqs[i]) for i in row) for row in rows)
    R = len(rows)
    input_ids = torch.zeros(R, T, dtype=torch.long)
    position_ids = torch.zeros(R, T, dtype=torch.long)
    segment_ids = torch.full((R, T), -1, dtype=torch.long)
    last = torch.empty(len(seqs), dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            n = len(seqs[i])
            input_ids[r, col : col + n] = torch.tensor(seqs[i])
            position_ids[r, col : col + n] = torch.arange(n)
            segment_ids[r, col : col + n] = i
            last[i] = r * T + col + n - 1
            col += n
        position_ids[r, col:] = torch.arange(T - col)  # padding: its own run, never scored
    kwargs = {
        "input_ids": input_ids.to(device),
        "position_ids": position_ids.to(device),
        "csd_segment_ids": segment_ids.to(device),
        "csd_branch_ids": torch.zeros(R, T, dtype=torch.int8, device=device),
    }
    if row_capacity is None:
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        kwargs.update(
            cu_seqlens_q=cu.to(device),
            cu_seqlens_k=cu.to(device),
            max_seqlen_q=int(lengths.max()),
            max_seqlen_k=int(lengths.max()),
        )
    return kwargs, last.to(device)


def _flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def token_budget_batches(lengths: list[int], max_tokens: int, max_size: int) -> list[list[int]]:
    """Indices, longest first, cut into batches of <= max_tokens tokens (a longer one alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, used = [], [], 0
    for i in order:
        if cur and (used + lengths[i] > max_tokens or len(cur) >= max_size):
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class PackedScorer:
    """A `num_labels=1` AutoModelForSequenceClassification scored packed (or padded)."""

    def __init__(
        self, model: str, *, dtype: str = "auto", device: str | None = None, packing: bool = True
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from csd_fast.attention import enable_packed_attention, packed_attention_supported

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{model}: a reward model has num_labels=1, this one has "
                f"{self.model.config.num_labels}"
            )
        self.head = getattr(self.model, "score", None)
        ok, self.why_padded = packed_attention_supported(self.model)
        if self.head is None:
            ok, self.why_padded = False, "no `score` head"
        self.packed = packing and ok
        if not packing:
            self.why_padded = "packing off"
        if self.packed:
            enable_packed_attention(self.model)
        self.backbone = getattr(self.model, self.model.base_model_prefix)

    @torch.no_grad()
    def forward(self, seqs: list[list[int]]) -> torch.Tensor:
        """(B,) raw rewards of one batch."""
        if self.packed:
            one_row = _flash_available(self.device, self.model.dtype)
            cap = None if one_row else max(len(s) for s in seqs)
            kwargs, last = pack_sequences(seqs, self.device, row_capacity=cap)
            hidden = self.backbone(**kwargs, use_cache=False).last_hidden_state  # (R, T, H)
            return self.head(hidden.flatten(0, 1).index_select(0, last))[:, 0].float()
        lengths = torch.tensor([len(s) for s in seqs], device=self.device)
        T = int(lengths.max())
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), T), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), T), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, device=self.device)
            mask[i, : len(s)] = 1
        hidden = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False)
        h = hidden.last_hidden_state[torch.arange(len(seqs), device=self.device), lengths - 1]
        return self.head(h)[:, 0].float()

    def score(
        self,
        seqs: list[list[int]],
        *,
        max_batch_tokens: int,
        max_batch_size: int = 512,
        on_batch=None,
    ) -> np.ndarray:
        """Rewards of all sequences (input order), batch halved and budget lowered on OOM."""
        out = np.empty(len(seqs), dtype=np.float64)
        pending = token_budget_batches([len(s) for s in seqs], max_batch_tokens, max_batch_size)
        pending.reverse()  # a stack: longest batches first
        while pending:
            batch = pending.pop()
            try:
                rewards = self.forward([seqs[i] for i in batch])
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not _is_oom(e) or len(batch) == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                half = len(batch) // 2
                max_batch_tokens = max(max_batch_tokens // 2, 1)
                print(
                    f"[score] out of memory on {len(batch)} sequences: splitting, token "
                    f"budget now {max_batch_tokens}",
                    flush=True,
                )
                pending += [batch[half:], batch[:half]]
                continue
            out[batch] = rewards.cpu().double().numpy()
            if on_batch is not None:
                on_batch(len(batch))
        return out


class VllmScorer:
    """vLLM's pooling runner with the classifier's activation off: raw logits, as PackedScorer."""

    def __init__(
        self, model: str, engine_args: dict, *, seed: int = 0, max_model_len: int | None = None
    ):
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.config import PoolerConfig

        args = {k: v for k, v in engine_args.items() if k not in ("enable_chunked_prefill",)}
        if max_model_len:
            args.setdefault("max_model_len", max_model_len)
        self.llm = LLM(
            model=model,
            runner="pooling",
            seed=seed,
            pooler_config=PoolerConfig(use_activation=False),
            **args,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    def score(self, seqs: list[list[int]], **_) -> np.ndarray:
        from vllm.inputs import TokensPrompt

        outs = self.llm.classify([TokensPrompt(prompt_token_ids=s) for s in seqs], use_tqdm=False)
        return np.array([o.outputs.probs[0] for o in outs], dtype=np.float64)

    def close(self) -> None:
        from csd_fast.sampling.engines import shutdown_vllm

        shutdown_vllm(self.llm)
        self.llm = None
