"""In-training forgetting probes: cheap numbers to log every N steps, so that forgetting is a curve over steps.

- ``probe_ppl``: perplexity of the model on a fixed set of held-out general texts (exp of the mean token NLL);
- ``probe_kl``: KL(base ‖ model), the mean over the same tokens of Σ_v p_base(v) (log p_base(v) − log p_model(v))
  (the forward KL to the base on held-out text, as in *RL's Razor*).

The base side is captured once, before training (`Probes.capture_base`): its log-probabilities are kept on the
CPU — the whole vocabulary (float32) when it has at most `full_vocab_max` entries, else (float16) the base's
top `topk` tokens per position plus one bucket for the rest. With the bucket the KL is that of the two
distributions coarsened to (top-k tokens, everything else): a lower bound of the full KL, exact when the base
puts all its mass on its top-k.

    probes = Probes(tokenizer, texts, max_length=128)
    probes.capture_base(model)          # before method.prepare / training
    row.update(probes(model))           # every N steps: {"probe_ppl", "probe_kl"}

In a run (`ftlab.train.loop.train(probes=...)`) the curve gets a step-0 row with the base's numbers and a probe every
`eval.probe_every` steps and at the last step. The base reference travels in every training-state checkpoint
(`state_dict` / `load_state_dict`, file ``probes.pt``), so a resumed run computes its KL against the very same
numbers, whatever the machine it resumes on.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ftlab.models.logits import chunk_positions, head_split, vocab_size
from ftlab.models.structure import eval_mode, model_device, pad_id
from ftlab.utils.padding import right_pad

__all__ = ["Probes", "build_probes", "probe_texts"]


class Probes:
    """texts: plain strings (every token after the first counts) or (context, continuation) pairs: only the
    continuation's tokens (and an eos) count, as in a perplexity task with a context. The tiny world's base was
    trained on answers, never on prompts: its probe set is held-out (prompt, answer) pairs."""

    def __init__(self, tokenizer, texts: list, max_length: int = 128, batch_size: int = 16,
                 topk: int = 256, full_vocab_max: int = 4096):
        if not texts:
            raise ValueError("probes: no probe texts")
        self.batch_size, self.topk, self.full_vocab_max = batch_size, topk, full_vocab_max
        self.seqs, self.first = [], []  # token ids; index of the first token whose prediction counts
        for t in texts:
            if isinstance(t, str):
                ids, first = tokenizer(t, add_special_tokens=True)["input_ids"], 1
            else:
                ctx, cont = t
                c = tokenizer(ctx, add_special_tokens=True)["input_ids"]
                ids = c + tokenizer(cont, add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    ids = ids + [tokenizer.eos_token_id]
                first = max(len(c), 1)
            ids = ids[:max_length]
            if len(ids) > first:
                self.seqs.append(ids)
                self.first.append(first)
        if not self.seqs:
            raise ValueError("probes: no probe text has a token to predict (shorter than 2 tokens, or a context "
                             "that fills probe_max_length)")
        self.pad = pad_id(tokenizer)
        self.base: Optional[list[dict]] = None  # per batch: {"idx": [B,T,K] or None, "logp": [B,T,K(+1)]}
        self.base_ppl: Optional[float] = None
        self.every = 0  # steps between probes in a run (ftlab.train.loop); build_probes sets eval.probe_every

    def _batches(self, device):
        for s in range(0, len(self.seqs), self.batch_size):
            chunk = self.seqs[s:s + self.batch_size]
            ids, mask = right_pad(chunk, self.pad)
            scored = torch.zeros(ids.shape, dtype=torch.float32)  # tokens whose prediction counts
            for i, (e, f) in enumerate(zip(chunk, self.first[s:s + self.batch_size])):
                scored[i, f:len(e)] = 1
            yield ids.to(device), mask.to(device), scored.to(device)

    @torch.inference_mode()
    def _logprobs(self, model):
        """Per batch, per chunk of positions (ftlab.models.logits; one chunk while the batch's logits are within
        its budget): (batch number, log-probs [B,t,V] float32, targets [B,t], mask [B,t], the chunk's first
        position), over the T-1 positions that predict a token. The whole [B, T, V] log-probs are never held for a
        large vocabulary."""
        with eval_mode(model):
            for nb, (ids, mask, scored) in enumerate(self._batches(model_device(model))):
                with head_split(model) as head:
                    # prompt-learning PEFT models prepend virtual tokens to the outputs: keep the text's positions
                    hidden = model(input_ids=ids, attention_mask=mask).logits[:, -ids.shape[1]:]
                vocab = vocab_size(head) if head is not None else hidden.shape[-1]
                chunk, n = chunk_positions(vocab, rows=ids.shape[0]), ids.shape[1] - 1
                if chunk >= ids.shape[1]:  # one chunk: the head on the whole hidden state, as the model would
                    logits = (hidden if head is None else head(hidden))[:, :-1].float()
                    yield nb, logits.log_softmax(-1), ids[:, 1:], scored[:, 1:], 0
                    continue
                for s in range(0, n, chunk):
                    e = min(s + chunk, n)
                    h = hidden[:, s:e]
                    logits = (h if head is None else head(h)).float()
                    yield nb, logits.log_softmax(-1), ids[:, s + 1:e + 1], scored[:, s + 1:e + 1], s

    def capture_base(self, model) -> dict:
        """Run the base model on the probe set and keep what the KL needs. Returns the base's numbers."""
        self.base = []
        nll = count = 0.0
        parts: list[list[tuple]] = []  # per batch, its chunks' (idx, logp)
        for nb, logp, tgt, m, _ in self._logprobs(model):
            nll += float((-logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * m).sum())
            count += float(m.sum())
            if nb == len(parts):
                parts.append([])
            if logp.shape[-1] <= self.full_vocab_max:
                parts[-1].append((None, logp.to("cpu")))
            else:
                top, idx = logp.topk(self.topk, dim=-1)
                rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)
                # int32 indices: half the bytes in every checkpoint that carries the reference
                parts[-1].append((idx.to("cpu", torch.int32), torch.cat([top, rest], -1).to("cpu", torch.float16)))
        for chunks in parts:  # one reference per batch, whatever the chunking (checkpoints keep this layout)
            idx = None if chunks[0][0] is None else torch.cat([c[0] for c in chunks], 1)
            self.base.append({"idx": idx, "logp": chunks[0][1] if len(chunks) == 1 else torch.cat([c[1] for c in
                                                                                                   chunks], 1)})
        self.base_ppl = math.exp(nll / count)
        return {"probe_ppl": self.base_ppl, "probe_kl": 0.0}

    def base_row(self) -> dict:
        """The curve's step-0 numbers: the base model's perplexity, KL 0."""
        if self.base_ppl is None:
            raise RuntimeError("probes: call capture_base(base model) first")
        return {"probe_ppl": self.base_ppl, "probe_kl": 0.0}

    def state_dict(self) -> dict:
        """The base reference (tensors and numbers only: read back with torch.load(weights_only=True))."""
        if self.base is None:
            return {}
        return {"base_ppl": self.base_ppl, "n_seqs": len(self.seqs),
                "idx": [b["idx"] if b["idx"] is not None else torch.empty(0, dtype=torch.int32) for b in self.base],
                "logp": [b["logp"] for b in self.base]}

    def load_state_dict(self, state: dict) -> None:
        """Use a saved base reference (a checkpoint's) instead of the one captured in this process."""
        if not state:
            return
        if state["n_seqs"] != len(self.seqs) or len(state["logp"]) != len(list(self._batch_starts())):
            raise ValueError(f"probes: the checkpoint's base reference has {state['n_seqs']} probe texts, this "
                             f"run's probe set has {len(self.seqs)}; the probe set must not change on resume")
        self.base_ppl = float(state["base_ppl"])
        self.base = [{"idx": None if i.numel() == 0 else i, "logp": lp}
                     for i, lp in zip(state["idx"], state["logp"])]

    def _batch_starts(self):
        return range(0, len(self.seqs), self.batch_size)

    def __call__(self, model) -> dict:
        """{"probe_ppl", "probe_kl"} of `model` now (capture_base first)."""
        if self.base is None:
            raise RuntimeError("probes: call capture_base(base model) before training")
        nll = count = kl = 0.0
        for nb, logp, tgt, m, s in self._logprobs(model):
            b = self.base[nb]
            nll += float((-logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * m).sum())
            count += float(m.sum())
            t = logp.shape[1]
            base = b["logp"][:, s:s + t].to(logp.device, torch.float32)
            if b["idx"] is None:
                per_tok = (base.exp() * (base - logp)).sum(-1)
            else:
                idx = b["idx"][:, s:s + t].to(logp.device, torch.long)
                top = logp.gather(-1, idx)
                rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)
                cur = torch.cat([top, rest], -1)
                per_tok = (base.exp() * (base - cur)).sum(-1)
            kl += float((per_tok * m).sum())
        return {"probe_ppl": math.exp(nll / count), "probe_kl": kl / count}


def probe_texts(cfg) -> list:
    """eval.probe_n held-out general texts: for model=tiny, (prompt, answer) pairs of held-out pretraining
    examples, the skills interleaved (drawn apart from the synth_* eval items); else WikiText (eval.paths.wikitext
    when set, else the hub)."""
    n = cfg.eval.probe_n
    if cfg.model.name_or_path == "tiny":
        from ftlab.world import skills

        names = [s for s in cfg.model.world.skills if skills.SKILLS[s].procedural] or list(cfg.model.world.skills)
        per = -(-n // len(names))
        pools = [skills.make_examples(s, "test", per, seed=7919) for s in names]
        return [(ex["prompt"], ex["response"]) for ex in
                [pool[j] for j in range(per) for pool in pools if j < len(pool)][:n]]
    from ftlab.eval.suites import load_task

    path = (getattr(cfg.eval, "paths", {}) or {}).get("wikitext")
    return [r["text"] for r in load_task("wikitext", "forget", n=n, **({"path": path} if path else {})).rows]


def build_probes(cfg, tokenizer) -> Optional["Probes"]:
    """The run's probes (None when eval.probe_every is 0). Capture the base with `.capture_base(model)`
    before the method touches the model, then call `probes(model)` every eval.probe_every steps."""
    if not getattr(cfg.eval, "probe_every", 0):
        return None
    probes = Probes(tokenizer, probe_texts(cfg), max_length=cfg.eval.probe_max_length,
                    batch_size=min(cfg.eval.batch_size, 32))
    probes.every = cfg.eval.probe_every
    return probes
