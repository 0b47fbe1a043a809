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
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["Probes", "build_probes", "probe_texts"]


class Probes:
    def __init__(self, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 16,
                 topk: int = 256, full_vocab_max: int = 4096):
        if not texts:
            raise ValueError("probes: no probe texts")
        self.batch_size, self.topk, self.full_vocab_max = batch_size, topk, full_vocab_max
        enc = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        self.seqs = [e[:max_length] for e in enc if len(e) >= 2]
        if not self.seqs:
            raise ValueError("probes: every probe text is shorter than 2 tokens")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.base: Optional[list[dict]] = None  # per batch: {"idx": [B,T,K] or None, "logp": [B,T,K(+1)]}
        self.base_ppl: Optional[float] = None

    def _batches(self, device):
        for s in range(0, len(self.seqs), self.batch_size):
            chunk = self.seqs[s:s + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, e in enumerate(chunk):
                ids[i, :len(e)] = torch.tensor(e)
                mask[i, :len(e)] = 1
            yield ids.to(device), mask.to(device)

    @torch.inference_mode()
    def _logprobs(self, model):
        """Per batch: (log-probs [B,T-1,V] float32, targets [B,T-1], mask [B,T-1])."""
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            for ids, mask in self._batches(device):
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                yield logits.log_softmax(-1), ids[:, 1:], mask[:, 1:].float()
        finally:
            model.train(was)

    def capture_base(self, model) -> dict:
        """Run the base model on the probe set and keep what the KL needs. Returns the base's numbers."""
        self.base = []
        nll = count = 0.0
        for logp, tgt, m in self._logprobs(model):
            nll += float((-logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * m).sum())
            count += float(m.sum())
            if logp.shape[-1] <= self.full_vocab_max:
                self.base.append({"idx": None, "logp": logp.to("cpu")})
            else:
                top, idx = logp.topk(self.topk, dim=-1)
                rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)
                self.base.append({"idx": idx.to("cpu"), "logp": torch.cat([top, rest], -1).to("cpu", torch.float16)})
        self.base_ppl = math.exp(nll / count)
        return {"probe_ppl": self.base_ppl, "probe_kl": 0.0}

    def __call__(self, model) -> dict:
        """{"probe_ppl", "probe_kl"} of `model` now (capture_base first)."""
        if self.base is None:
            raise RuntimeError("probes: call capture_base(base model) before training")
        nll = count = kl = 0.0
        for b, (logp, tgt, m) in zip(self.base, self._logprobs(model)):
            nll += float((-logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) * m).sum())
            count += float(m.sum())
            base = b["logp"].to(logp.device, torch.float32)
            if b["idx"] is None:
                per_tok = (base.exp() * (base - logp)).sum(-1)
            else:
                idx = b["idx"].to(logp.device)
                top = logp.gather(-1, idx)
                rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)
                cur = torch.cat([top, rest], -1)
                per_tok = (base.exp() * (base - cur)).sum(-1)
            kl += float((per_tok * m).sum())
        return {"probe_ppl": math.exp(nll / count), "probe_kl": kl / count}


def probe_texts(cfg) -> list[str]:
    """eval.probe_n held-out general texts: the tiny world's pretraining text (model=tiny), else WikiText
    (eval.paths.wikitext when set, else the hub)."""
    n = cfg.eval.probe_n
    if cfg.model.name_or_path == "tiny":
        from ftlab.world import skills

        return skills.pretrain_text("test", n, seed=0, skills=list(cfg.model.world.skills))
    from ftlab.evaluate import load_task

    path = (getattr(cfg.eval, "paths", {}) or {}).get("wikitext")
    return [r["text"] for r in load_task("wikitext", "forget", n=n, **({"path": path} if path else {})).rows]


def build_probes(cfg, tokenizer) -> Optional["Probes"]:
    """The run's probes (None when eval.probe_every is 0). Capture the base with `.capture_base(model)`
    before the method touches the model, then call `probes(model)` every eval.probe_every steps."""
    if not getattr(cfg.eval, "probe_every", 0):
        return None
    return Probes(tokenizer, probe_texts(cfg), max_length=cfg.eval.probe_max_length,
                  batch_size=min(cfg.eval.batch_size, 32))
