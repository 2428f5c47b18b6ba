"""Train a tiny decoder-only transformer built from attnax.MultiHeadAttention, then generate.

The data is generated on the fly (no downloads): packed documents, each an
arithmetic sequence ``BOS, a, a+s, a+2s, ...`` modulo 31. Every layer is
causal; a per-call ``document_mask_mod`` keeps packed documents apart. After
training, greedy generation runs in decode mode (a KV cache per layer, one
``nnx.jit``-ted step per token) and is checked two ways: against the rule
that generated the data, and against the full causal forward pass.

    python examples/train_lm.py                 # 300 steps, about half a minute on a laptop CPU
    python examples/train_lm.py --steps 20      # what `make demo` runs (through attnax.demo)

The model, the data and the training loop live in ``attnax/_tiny_lm.py``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnax._tiny_lm import BOS, TinyLM, generate, train


def expected_continuation(prompt, num_tokens: int, vocab_size: int) -> np.ndarray:
    """The tokens the data rule gives after ``BOS, a, a+s`` prompts."""
    mod = vocab_size - 1
    a, b = prompt[:, 1] - 1, prompt[:, 2] - 1
    s = (b - a) % mod
    k = np.arange(2, 2 + num_tokens)
    return 1 + (a[:, None] + k[None, :] * s[:, None]) % mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per packed row")
    parser.add_argument("--num-tokens", type=int, default=12, help="tokens to generate per prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = TinyLM(rngs=nnx.Rngs(args.seed))
    vocab_size = model.embed.num_embeddings
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"TinyLM: {len(model.blocks)} layers, {n_params:,} parameters; training {args.steps} steps")
    t0 = time.perf_counter()
    losses = train(model, args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.perf_counter() - t0:.1f} s")

    # Prompts: BOS, a, a + s for a few starts and strides (the model must infer s).
    rng = np.random.default_rng(args.seed + 1)
    a = rng.integers(vocab_size - 1, size=4)
    s = rng.integers(1, 4, size=4)
    prompt = np.stack([np.full(4, BOS), 1 + a, 1 + (a + s) % (vocab_size - 1)], axis=1).astype(np.int32)
    out = generate(model, prompt, args.num_tokens)
    want = expected_continuation(prompt, args.num_tokens, vocab_size)
    for p, o in zip(prompt, out):
        print(f"prompt {p.tolist()} -> {o.tolist()}")
    print(f"generated tokens that follow the rule: {np.mean(out == want):.0%}")

    # Decode mode reproduces the full causal forward: same greedy tokens without a cache.
    full = np.concatenate([prompt, out], axis=1)
    logits = model(jnp.asarray(full[:, :-1]))
    greedy = np.asarray(jnp.argmax(logits[:, prompt.shape[1] - 1 :], axis=-1))
    print(f"decode mode agrees with the full forward: {bool(np.all(greedy == out))}")


if __name__ == "__main__":
    main()
