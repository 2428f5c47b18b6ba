"""A tiny decoder-only transformer on packed synthetic documents (the demo's and the example's model).

The data is generated, never downloaded. Each document is an arithmetic
sequence modulo ``vocab_size - 1``: ``BOS, a, a+s, a+2s, ...`` with a random
start ``a`` and stride ``s``. Documents of random lengths are packed into
fixed-length rows; :func:`attnax.score_mods.document_mask_mod` composed with
the layers' :func:`~attnax.score_mods.causal_mod` keeps them from seeing each
other. The first two tokens of a document are unpredictable, every later one
is determined by the two before it, so the loss falls quickly towards a
floor of about ``(log(V - 1) + log(num_strides)) / mean_doc_length``.

Generation runs the same model in decode mode: a KV cache per layer, a
prefill of the prompt, then one ``nnx.jit``-ted step per token.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnax.nn import MultiHeadAttention, RoPE
from attnax.score_mods import causal_mod, document_mask_mod

__all__ = ["BOS", "Block", "TinyLM", "generate", "make_batch", "train", "train_tiny_lm"]

#: The beginning-of-document token.
BOS = 0


def make_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int,
    *,
    vocab_size: int = 32,
    doc_length: tuple[int, int] = (6, 20),
    num_strides: int = 3,
) -> dict[str, np.ndarray]:
    """Packs random arithmetic-sequence documents into ``[batch_size, seq_len]`` rows.

    Args:
        rng: a NumPy generator (the data is a pure function of its state).
        batch_size: rows.
        seq_len: tokens per row.
        vocab_size: ``V``; token 0 is ``BOS``, values are ``1 .. V-1``.
        doc_length: inclusive range of document lengths (``BOS`` included).
        num_strides: strides are drawn from ``1 .. num_strides``.

    Returns:
        ``inputs``, ``targets`` (the next token), ``segment_ids`` (the
        document of each position), all int32 ``[batch_size, seq_len]``, and
        float32 ``weights``: 0 where the target starts the next document.

    Example:
        >>> import numpy as np
        >>> from attnax._tiny_lm import make_batch
        >>> b = make_batch(np.random.default_rng(0), 2, 16)
        >>> b["inputs"].shape, int(b["inputs"][0, 0])  # every row starts with BOS
        ((2, 16), 0)
        >>> bool(np.all(b["inputs"][:, 1:] == b["targets"][:, :-1]))
        True
    """
    mod = vocab_size - 1
    rows, segs = [], []
    for _ in range(batch_size):
        tokens, seg, doc = [], [], 0
        while len(tokens) < seq_len + 1:
            length = int(rng.integers(doc_length[0], doc_length[1] + 1))
            a, s = int(rng.integers(mod)), int(rng.integers(1, num_strides + 1))
            tokens += [BOS] + [1 + (a + k * s) % mod for k in range(length - 1)]
            seg += [doc] * length
            doc += 1
        rows.append(tokens[: seq_len + 1])
        segs.append(seg[: seq_len + 1])
    rows, segs = np.asarray(rows, np.int32), np.asarray(segs, np.int32)
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "segment_ids": segs[:, :-1],
        "weights": (segs[:, 1:] == segs[:, :-1]).astype(np.float32),
    }


class Block(nnx.Module):
    """Pre-norm transformer block: causal attention (RoPE, GQA), then a GELU MLP.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from attnax._tiny_lm import Block
        >>> Block(16, 2, 1, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 16))).shape
        (1, 4, 16)
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *, rngs: nnx.Rngs, attention_fn=None):
        self.norm1 = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = MultiHeadAttention(
            rngs,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            in_features=d_model,
            score_mod=causal_mod(),  # every layer is causal; documents come per call
            rope=RoPE(),
            use_bias=False,
            attention_fn=attention_fn,
        )
        self.norm2 = nnx.RMSNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x, *, score_mod=None, decode: bool = False):
        x = x + self.attn(self.norm1(x), score_mod=score_mod, decode=decode)
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    """A decoder-only transformer built from :class:`attnax.MultiHeadAttention`.

    Args:
        vocab_size: tokens.
        d_model: width.
        num_heads: query heads per layer.
        num_kv_heads: key/value heads per layer (GQA).
        num_layers: blocks.
        rngs: parameter randomness.
        attention_fn: the kernel of every layer (default
            :func:`attnax.flash_attention`).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from attnax._tiny_lm import TinyLM
        >>> model = TinyLM(vocab_size=8, d_model=16, num_heads=2, num_kv_heads=1, num_layers=1, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 5), jnp.int32)).shape
        (2, 5, 8)
    """

    def __init__(
        self,
        vocab_size: int = 32,
        d_model: int = 64,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        num_layers: int = 2,
        *,
        rngs: nnx.Rngs,
        attention_fn=None,
    ):
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.blocks = nnx.List(
            [Block(d_model, num_heads, num_kv_heads, rngs=rngs, attention_fn=attention_fn) for _ in range(num_layers)]
        )
        self.norm = nnx.RMSNorm(d_model, rngs=rngs)

    def __call__(self, tokens, *, segment_ids=None, decode: bool = False):
        """Logits ``[B, T, vocab_size]`` for int tokens ``[B, T]``; ``segment_ids`` ``[B, T]`` packs documents."""
        mod = None if segment_ids is None else document_mask_mod(segment_ids)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, score_mod=mod, decode=decode)
        return self.embed.attend(self.norm(x))

    def init_cache(self, batch_size: int, max_length: int) -> None:
        """Gives every attention layer an empty KV cache for decode mode."""
        for block in self.blocks:
            block.attn.init_cache(batch_size, max_length)


def loss_fn(model: TinyLM, batch) -> jax.Array:
    """Mean next-token cross-entropy over the positions whose target is in the same document."""
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    w = batch["weights"]
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


@nnx.jit
def _train_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss


def train(
    model: TinyLM,
    steps: int,
    *,
    log: Callable[[str], None] | None = print,
    log_every: int | None = None,
    batch_size: int = 16,
    seq_len: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Trains ``model`` in place with AdamW on fresh synthetic batches; returns the per-step losses.

    Example:
        >>> from flax import nnx
        >>> from attnax._tiny_lm import TinyLM, train
        >>> model = TinyLM(d_model=16, num_heads=2, num_kv_heads=1, num_layers=1, rngs=nnx.Rngs(0))
        >>> len(train(model, 2, log=None, batch_size=2, seq_len=16))
        2
    """
    vocab_size = model.embed.num_embeddings
    rng = np.random.default_rng(seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), max(steps, 2))
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
    log_every = log_every or max(1, steps // 10)
    losses = []
    for step in range(steps):
        batch = make_batch(rng, batch_size, seq_len, vocab_size=vocab_size)
        losses.append(float(_train_step(model, optimizer, batch)))
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {losses[-1]:.4f}")
    return losses


@nnx.jit
def _decode_step(model, tokens):
    return jnp.argmax(model(tokens, decode=True)[:, -1], axis=-1).astype(jnp.int32)


def generate(model: TinyLM, prompt, num_tokens: int) -> np.ndarray:
    """Greedy generation in decode mode: one prefill of ``prompt`` ``[B, P]``, then one jitted step per token.

    Returns:
        int32 ``[B, num_tokens]``: the generated tokens.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from attnax._tiny_lm import TinyLM, generate
        >>> model = TinyLM(d_model=16, num_heads=2, num_kv_heads=1, num_layers=1, rngs=nnx.Rngs(0))
        >>> generate(model, np.array([[0, 3, 5]]), 4).shape
        (1, 4)
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    model.init_cache(prompt.shape[0], prompt.shape[1] + num_tokens)
    token = _decode_step(model, prompt)
    out = [token]
    for _ in range(num_tokens - 1):
        token = _decode_step(model, token[:, None])
        out.append(token)
    return np.asarray(jnp.stack(out, axis=1))


def train_tiny_lm(steps: int = 20, log: Callable[[str], None] | None = print, *, seed: int = 0) -> list[float]:
    """Builds the tiny LM and trains it for ``steps`` steps; returns the per-step losses.

    Args:
        steps: optimizer steps (each on a fresh batch of 16 packed rows of 64
            tokens).
        log: called with a progress line every ``max(1, steps // 10)`` steps
            and at the last one; None for silence.
        seed: seeds the parameters and the data.

    Example:
        >>> from attnax._tiny_lm import train_tiny_lm
        >>> losses = train_tiny_lm(steps=3, log=None)
        >>> len(losses), all(l > 0 for l in losses)
        (3, True)
    """
    model = TinyLM(rngs=nnx.Rngs(seed))
    return train(model, steps, log=log, seed=seed)
