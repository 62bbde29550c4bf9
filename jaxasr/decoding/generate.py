"""Batched greedy and beam search for Whisper with a preallocated KV cache.

Each search is one `nnx.jit` program: the encoder runs once, cross-attention keys/values are
projected once, and the decoder loop runs under `jax.lax.while_loop` over a fixed-size cache, so a
(batch, max_new_tokens[, beam]) bucket compiles once. Sequences end independently at end-of-text;
the loop stops when all have ended. `greedy_search_shrinking` (the Transcriber's) gives the same
tokens from one program per batch size, moving the rows still running into a batch half as large
whenever half of them have ended. Rules (prompt, suppression) follow Hugging Face's Whisper
`generate`, which is the reference the tests compare with token for token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxasr.decoding.prompt import DecodingRules
from jaxasr.models.whisper import KVCache, Whisper

NEG_INF = -jnp.inf


def max_new_tokens_for(model: Whisper, rules: DecodingRules, requested: int | None = None) -> int:
    """Generated-token budget: what was asked, capped by max_length and the position table."""
    limit = min(rules.max_length, model.cfg.max_target_positions) - len(rules.prompt)
    return limit if requested is None else max(1, min(requested, limit))


def _suppress(scores: jax.Array, rules: DecodingRules, first_step) -> jax.Array:
    """-inf on suppress_tokens always and on begin_suppress_tokens at the first generated token."""
    vocab = scores.shape[-1]
    always = np.zeros(vocab, bool)
    always[[t for t in rules.suppress_tokens if t < vocab]] = True
    begin = np.zeros(vocab, bool)
    begin[[t for t in rules.begin_suppress_tokens if t < vocab]] = True
    mask = jnp.asarray(always) | (jnp.asarray(begin) & first_step)
    return jnp.where(mask, NEG_INF, scores)


def _start(model: Whisper, features, rules: DecodingRules, max_new_tokens: int, repeat: int = 1,
           encoded: bool = False):
    """Encode (unless `features` are encoder outputs already), project cross-attention K/V, run the
    prompt through the decoder. Returns what the loop needs: the decoder layers, sliced once
    (`decoding_layers`), cross K/V, the cache and the last prompt position's logits."""
    layers = model.decoder.decoding_layers()
    cross = model.decoder.cross_kv(features if encoded else model.encode(features), layers)
    if repeat > 1:  # one copy per beam, beams of an utterance adjacent
        cross = jax.tree.map(lambda a: jnp.repeat(a, repeat, axis=0), cross)
    rows = features.shape[0] * repeat
    cache = KVCache.zeros(model.cfg, rows, len(rules.prompt) + max_new_tokens)
    prompt = jnp.broadcast_to(jnp.asarray(rules.prompt, jnp.int32), (rows, len(rules.prompt)))
    logits, cache = model.decode(prompt, cross_kv=cross, cache=cache, index=0, layers=layers)
    return layers, cross, cache, logits[:, -1].astype(jnp.float32)


class GreedyState(NamedTuple):
    """Greedy decoding between steps: every field but `step` has the batch as its leading axis."""

    step: jax.Array  # tokens generated so far (the same for every row)
    tokens: jax.Array  # [B, max_new_tokens], end-of-text where not generated yet
    cache: KVCache
    logits: jax.Array  # [B, vocab] scores of the next token
    done: jax.Array  # [B] the row has produced end-of-text (or is batch padding)
    cross: list  # per layer (k, v), head-major [B, heads, frames, head_dim]


def _greedy_start(model: Whisper, features, rules: DecodingRules, max_new_tokens: int, encoded: bool,
                  done=None) -> GreedyState:
    batch = features.shape[0]
    _, cross, cache, logits = _start(model, features, rules, max_new_tokens, encoded=encoded)
    tokens = jnp.full((batch, max_new_tokens), rules.eot, jnp.int32)
    done = jnp.zeros((batch,), bool) if done is None else done
    return GreedyState(jnp.int32(0), tokens, cache, logits, done, cross)


def _greedy_steps(model: Whisper, state: GreedyState, rules: DecodingRules, max_new_tokens: int,
                  max_done: int | None = None) -> GreedyState:
    """Decode until every row is done, the budget is spent, or (with `max_done`) more than
    `max_done` rows are done."""
    prompt_len, layers = len(rules.prompt), model.decoder.decoding_layers()
    max_done = state.done.shape[0] - 1 if max_done is None else max_done

    def cond(s: GreedyState):
        return (s.step < max_new_tokens) & (jnp.sum(s.done) <= max_done)

    def body(s: GreedyState):
        nxt = jnp.argmax(_suppress(s.logits, rules, s.step == 0), axis=-1).astype(jnp.int32)
        nxt = jnp.where(s.done, rules.eot, nxt)
        logits, cache = model.decode(nxt[:, None], cross_kv=s.cross, cache=s.cache, index=prompt_len + s.step,
                                     layers=layers)
        return GreedyState(s.step + 1, s.tokens.at[:, s.step].set(nxt), cache, logits[:, -1].astype(jnp.float32),
                           s.done | (nxt == rules.eot), s.cross)

    return jax.lax.while_loop(cond, body, state)


@nnx.jit(static_argnames=("rules", "max_new_tokens", "encoded"))
def greedy_search(model: Whisper, features: jax.Array, rules: DecodingRules, max_new_tokens: int,
                  encoded: bool = False) -> jax.Array:
    """features [B, n_mels, frames] (or encoder outputs [B, frames/2, d_model] with `encoded`) ->
    generated tokens [B, max_new_tokens], end-of-text padded."""
    state = _greedy_start(model, features, rules, max_new_tokens, encoded)
    return _greedy_steps(model, state, rules, max_new_tokens).tokens


_start_shrinking = nnx.jit(_greedy_start, static_argnames=("rules", "max_new_tokens", "encoded"))
_steps_shrinking = nnx.jit(_greedy_steps, static_argnames=("rules", "max_new_tokens", "max_done"),
                           donate_argnames=("state",))


@jax.jit
def _take_rows(state: GreedyState, rows: jax.Array) -> GreedyState:
    step, *batched = state
    return GreedyState(step, *jax.tree.map(lambda a: jnp.take(a, rows, axis=0), batched))


def greedy_search_shrinking(model: Whisper, features: jax.Array, rules: DecodingRules, max_new_tokens: int,
                            valid: int | None = None, encoded: bool = False) -> np.ndarray:
    """`greedy_search`'s tokens (as a host array), computed on a batch that halves whenever half
    of its rows have ended: the running rows move into a batch of the next power of two, so a
    batch with one long transcript does not decode all its rows to that length (at batch 16, 40%
    fewer row-steps on the benchmark's sentences). Each batch size compiles its loop once; the
    loop stops on the device and the rows move between programs. Rows from `valid` on are padding:
    ended from the start. For one device (the rows leave any sharding)."""
    batch = features.shape[0]
    valid = batch if valid is None else valid
    state = _start_shrinking(model, features, rules, max_new_tokens, encoded, jnp.arange(batch) >= valid)
    out = np.full((batch, max_new_tokens), rules.eot, np.int32)
    rows = np.arange(batch)  # the input row of each row of `state`
    while True:
        size = len(rows)
        state = _steps_shrinking(model, state, rules, max_new_tokens, (size - 1) // 2 if size > 1 else 0)
        done = np.asarray(state.done)
        if done.all() or int(state.step) >= max_new_tokens:
            out[rows] = np.asarray(state.tokens)
            return out
        running, ended = np.flatnonzero(~done), np.flatnonzero(done)
        out[rows[ended]] = np.asarray(state.tokens)[ended]
        smaller = 1 << (len(running) - 1).bit_length()  # fill it up with ended rows (they stay ended)
        keep = np.concatenate([running, ended[: smaller - len(running)]])
        state, rows = _take_rows(state, jnp.asarray(keep)), rows[keep]


@nnx.jit(static_argnames=("rules", "max_new_tokens", "beam_size", "length_penalty"))
def beam_search(
    model: Whisper,
    features: jax.Array,
    rules: DecodingRules,
    max_new_tokens: int,
    beam_size: int,
    length_penalty: float = 1.0,
) -> jax.Array:
    """Beam search as Hugging Face's (early_stopping=False): at each step the top 2K candidates;
    end-of-text candidates ranked within the top K join a pool of K finished hypotheses scored
    sum_logprob / length**length_penalty; the other best K continue. An utterance is done when its
    pool is full and no running beam can beat the pool's worst. Returns [B, max_new_tokens]."""
    batch, k, prompt_len = features.shape[0], beam_size, len(rules.prompt)
    layers, cross, cache, logits = _start(model, features, rules, max_new_tokens, repeat=k)
    vocab = logits.shape[-1]
    rows = jnp.arange(batch)[:, None]

    def normalized(total, length):
        return total / jnp.power(length.astype(jnp.float32), length_penalty)

    state = dict(
        step=jnp.int32(0),
        seqs=jnp.full((batch, k, max_new_tokens), rules.eot, jnp.int32),
        scores=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF), (batch, 1)),  # only beam 0 at start
        cache=cache,
        logits=logits,
        fin_seqs=jnp.full((batch, k, max_new_tokens), rules.eot, jnp.int32),
        fin_scores=jnp.full((batch, k), NEG_INF),
        done=jnp.zeros((batch,), bool),
    )

    def cond(s):
        return (s["step"] < max_new_tokens) & ~s["done"].all()

    def body(s):
        step = s["step"]
        logp = _suppress(jax.nn.log_softmax(s["logits"]), rules, step == 0).reshape(batch, k, vocab)
        cand = (s["scores"][:, :, None] + logp).reshape(batch, k * vocab)
        top_scores, top_idx = jax.lax.top_k(cand, 2 * k)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand_seqs = s["seqs"][rows, parent].at[:, :, step].set(token)  # [B, 2K, T]

        # Finished: end-of-text among the top K candidates, into the pool of the K best.
        ended = (token == rules.eot) & (jnp.arange(2 * k) < k) & jnp.isfinite(top_scores) & ~s["done"][:, None]
        new_fin = jnp.where(ended, normalized(top_scores, step + 1), NEG_INF)
        pool_scores = jnp.concatenate([s["fin_scores"], new_fin], axis=1)
        pool_seqs = jnp.concatenate([s["fin_seqs"], cand_seqs], axis=1)
        fin_scores, pick = jax.lax.top_k(pool_scores, k)
        fin_seqs = pool_seqs[rows, pick]

        # Running: the best K candidates that did not end.
        scores, keep = jax.lax.top_k(jnp.where(token == rules.eot, NEG_INF, top_scores), k)
        seqs = cand_seqs[rows, keep]
        beam_rows = (jnp.arange(batch)[:, None] * k + parent[rows, keep]).reshape(-1)
        cache = s["cache"].take_rows(beam_rows)
        nxt = token[rows, keep].reshape(-1, 1)

        # HF's is_done (early_stopping=False): the best running beam cannot beat the worst kept.
        pool_full = jnp.isfinite(fin_scores).all(axis=1)
        best_possible = normalized(scores[:, 0], step + 1)
        done = s["done"] | (pool_full & (fin_scores[:, -1] >= best_possible))

        logits, cache = model.decode(nxt, cross_kv=cross, cache=cache, index=prompt_len + step, layers=layers)
        return dict(step=step + 1, seqs=seqs, scores=scores, cache=cache,
                    logits=logits[:, -1].astype(jnp.float32), fin_seqs=fin_seqs, fin_scores=fin_scores, done=done)

    s = jax.lax.while_loop(cond, body, state)
    # Utterances that hit the length limit: running beams compete with the pool (HF's finalize).
    running = jnp.where(s["done"][:, None], NEG_INF, normalized(s["scores"], s["step"]))
    all_scores = jnp.concatenate([s["fin_scores"], running], axis=1)
    all_seqs = jnp.concatenate([s["fin_seqs"], s["seqs"]], axis=1)
    best = jnp.argmax(all_scores, axis=1)
    return all_seqs[jnp.arange(batch), best]


@nnx.jit(static_argnames=("sot", "language_tokens"))
def detect_language(model: Whisper, features: jax.Array, sot: int, language_tokens: tuple[int, ...]) -> jax.Array:
    """Most likely language token per utterance from the first decoder step after <|startoftranscript|>."""
    logits, _ = model.decode(jnp.full((features.shape[0], 1), sot, jnp.int32), model.encode(features))
    lang = jnp.asarray(language_tokens)
    return lang[jnp.argmax(logits[:, -1, lang], axis=-1)]
