"""The batch's sampler: each row's next token from its logits, by that row's own rules.

One call picks a token for every row of a decoding step (or of a prefill), with each
row's sampling parameters, repetition rules and random generator, in the order Hugging
Face's `generate` applies them. It is the one sampler of the batching path; the
sequential path samples through transformers' `generate()`, with the arguments
`SamplingParams.generate_kwargs` translates.

A row is anything shaped like `SamplingRow` (the scheduler's sequences): the sampler reads
its request, tokens and random generator and changes nothing of it. It knows no model,
cache, thread or handle: hand it logits, it hands back tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from .generation import GenerationRequest

NUCLEUS_DRAWS = 8
"""Draws before a row's nucleus is found by sorting instead. A draw lands in the nucleus
with probability at least top-p, so with top-p 0.5 or more eight misses in a row happen
less than once in 250 rows."""


class SamplingRow(Protocol):
    """What the sampler reads of one row (the scheduler's `_Sequence` is one)."""

    @property
    def request(self) -> GenerationRequest:
        """Its sampling parameters and `min_new_tokens`."""
        ...

    @property
    def generator(self) -> torch.Generator | None:
        """Its own random generator (seeded requests), or None: the global one."""
        ...

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens (what the n-gram rule looks at)."""
        ...

    @property
    def new(self) -> list[int]:
        """Generated tokens (what `min_new_tokens` counts)."""
        ...

    @property
    def seen(self) -> torch.Tensor | None:
        """Distinct tokens so far, for the repetition penalty (set where it applies)."""
        ...

    @property
    def ngrams(self) -> dict[tuple[int, ...], set[int]]:
        """For each (n-1)-gram so far, the tokens that followed it."""
        ...


def sample_next_tokens(
    seqs: Sequence[SamplingRow], logits: torch.Tensor, eos: int
) -> list[int | None]:
    """Pick each row's next token with that row's own rules, in the order Hugging Face's
    `generate` applies them: repetition penalty, no-repeat n-gram, min new tokens, then
    (when sampling) temperature, top-k, top-p.

    None for a row whose scores are not usable: NaN or +inf (a damaged adapter, whatever
    the row's own rules did to them) or no finite score left. Other rows are not
    affected: each row is picked from its own scores."""
    import torch

    device = logits.device
    scores = logits.clone()
    # Repetition penalty over every token seen so far (prompt included), as in HF.
    penalised = [
        (row, s) for row, s in enumerate(seqs) if s.request.params.repetition_penalty != 1.0
    ]
    if penalised:  # one gather and one scatter for the whole batch
        seen = [s.seen for _, s in penalised]
        counts = torch.tensor([len(t) for t in seen], device=device)  # type: ignore[arg-type]
        cols = torch.cat(seen)  # type: ignore[arg-type]
        rows_ = torch.tensor([row for row, _ in penalised], device=device).repeat_interleave(counts)
        penalty = torch.tensor(
            [s.request.params.repetition_penalty for _, s in penalised], device=device
        ).repeat_interleave(counts)
        picked = scores[rows_, cols]
        scores[rows_, cols] = torch.where(picked < 0, picked * penalty, picked / penalty)
    # Banned tokens (no-repeat n-grams, end of text before min_new_tokens): one scatter.
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for row, seq in enumerate(seqs):
        n = seq.request.params.no_repeat_ngram_size
        if n > 0 and len(seq.tokens) >= n - 1:
            banned = seq.ngrams.get(tuple(seq.tokens[len(seq.tokens) - n + 1 :]))
            if banned:
                ban_rows.extend([row] * len(banned))
                ban_cols.extend(banned)
        if len(seq.new) < seq.request.min_new_tokens:
            ban_rows.append(row)
            ban_cols.append(eos)
    if ban_rows:
        scores[ban_rows, ban_cols] = float("-inf")

    # A row's best score is NaN if any is, +inf if any is and none is NaN, and -inf if
    # all are: one reduction finds the broken rows. (Comparisons and argmax over the
    # whole vocabulary cost ten times more than a reduction on a CPU: only greedy rows
    # take an argmax.)
    top = scores.amax(dim=-1)
    broken = (top.isnan() | top.isinf()).tolist()
    chosen = [-1] * len(seqs)
    greedy = [r for r, s in enumerate(seqs) if s.request.params.temperature == 0.0]
    sampled = [r for r, s in enumerate(seqs) if s.request.params.temperature != 0.0]
    greedy = [r for r in greedy if not broken[r]]
    sampled = [r for r in sampled if not broken[r]]
    if greedy:
        index = torch.tensor(greedy, device=device)
        picks = scores.index_select(0, index).argmax(dim=-1).tolist()
        for row, token in zip(greedy, picks, strict=True):
            chosen[row] = token
    if sampled:
        _sample_rows(seqs, scores, sampled, chosen)
    return [None if token < 0 else token for token in chosen]


def _sample_rows(
    seqs: Sequence[SamplingRow], scores: torch.Tensor, rows: list[int], chosen: list[int]
) -> None:
    """Sample `rows` in one batch: temperature, top-k (as Hugging Face's warper: below
    the k-th best score is out), then top-p.

    Top-p without sorting the vocabulary: draw from the whole (tempered, top-k)
    distribution, and keep the draw if it lies in the nucleus, that is if the tokens more
    likely than it hold less than `top_p` of the mass; else draw again. What is kept is
    distributed exactly as the nucleus renormalised, and a draw is kept with probability
    at least `top_p`. Each row draws from its own random generator, so a seeded row
    samples the same whatever else is in the batch.

    A row whose tempered distribution is not usable (a temperature so small that the
    division overflows: infinities, then NaN probabilities) takes the distribution's
    limit as the temperature goes to 0: its greedy token. The rows' scores must be
    usable (see `sample_next_tokens`)."""
    import torch

    device = scores.device
    params = [seqs[row].request.params for row in rows]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    raw = scores.index_select(0, torch.tensor(rows, device=device))
    scaled = raw / temperature.unsqueeze(1)
    ks = [max(0, min(p.top_k, scaled.shape[-1])) for p in params]
    cut = [i for i, k in enumerate(ks) if k > 0]  # the rows with a top-k
    if cut:
        some = torch.tensor(cut, device=device)
        best = scaled.index_select(0, some).topk(max(ks), dim=-1).values
        kth = scaled.new_full((len(rows), 1), float("-inf"))  # no cut: nothing is below
        kth[some] = best.gather(1, torch.tensor([[ks[i] - 1] for i in cut], device=device))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    total = probs.sum(dim=-1, keepdim=True)  # not finite if any probability is not
    usable = total.isfinite() & (total > 0)
    if not bool(usable.all()):  # such a row draws its argmax
        greedy = torch.zeros_like(probs).scatter_(1, raw.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(usable, probs, greedy)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    pending = list(range(len(rows)))
    for _ in range(NUCLEUS_DRAWS):
        if not pending:
            return
        index = torch.tensor(pending, device=device)
        p = probs.index_select(0, index)
        tokens = _inverse_cdf(p, _uniform(seqs, [rows[i] for i in pending], device))
        picked = p.gather(1, tokens)
        more_likely = torch.where(p > picked, p, 0.0).sum(dim=-1)
        kept = ((picked.squeeze(1) > 0) & (more_likely < top_p.index_select(0, index))).tolist()
        for i, keep, token in zip(pending, kept, tokens.flatten().tolist(), strict=True):
            if keep:
                chosen[rows[i]] = token
        pending = [i for i, keep in zip(pending, kept, strict=True) if not keep]
    if pending:  # a narrow nucleus in a flat distribution: rank these rows' tokens
        index = torch.tensor(pending, device=device)
        ranked, ids = probs.index_select(0, index).sort(dim=-1, descending=True)
        before = ranked.cumsum(dim=-1) - ranked  # the mass of the more likely tokens
        ranked[before >= top_p.index_select(0, index).unsqueeze(1)] = 0.0  # rank 0 stays
        picks = _inverse_cdf(ranked, _uniform(seqs, [rows[i] for i in pending], device))
        picks = torch.minimum(picks, (ranked > 0).sum(dim=-1, keepdim=True) - 1).clamp_(min=0)
        for i, token in zip(pending, ids.gather(1, picks).flatten().tolist(), strict=True):
            chosen[rows[i]] = token


def _uniform(seqs: Sequence[SamplingRow], rows: list[int], device: torch.device) -> torch.Tensor:
    """One uniform number per row, each from the row's own random generator."""
    import torch

    return torch.cat([torch.rand(1, generator=seqs[row].generator, device=device) for row in rows])


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each row of (unnormalised) `probs`, the index where `uniform` falls in its
    cumulative distribution: a draw, as a [rows, 1] tensor of indices."""
    import torch

    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
