"""The KV cache: cached decoding equals the full forward, padding, policies, skipped iterations, bad input."""

import pytest
import torch

from parcae import Parcae
from parcae.model.cache import KVCache, KVPolicy
from parcae.model.exit import ExitCriterion
from test_model import ids, randomise, small

VARIANTS = {
    "diagonal": dict(),
    "linear-swiglu-gqa": dict(injection="linear", prelude_norm=False, mlp="swiglu", n_heads=4, n_kv_heads=2),
    "wide-state": dict(d_state=128),
    "transformer": dict(n_core=0, n_prelude=2, n_coda=1),
}


def model_for(**overrides) -> Parcae:
    torch.manual_seed(0)
    return randomise(Parcae(small(**overrides))).eval()


def decode(model: Parcae, x: torch.Tensor, chunks: list[int], steps: int, policy: str = "full", capacity=None):
    """Cached forwards over consecutive chunks of x; returns (logits [B, L, V], cache)."""
    cache = model.new_cache(x.shape[0], capacity or x.shape[1], kv_policy=policy, max_steps=steps)
    outs, start = [], 0
    for size in chunks:
        outs.append(model.forward_cached(x[:, start : start + size], cache, num_steps=steps).logits)
        start += size
    return torch.cat(outs, 1), cache


CASES = [("diagonal", 1), ("diagonal", 3), ("diagonal", 6), *((name, 3) for name in list(VARIANTS)[1:])]


@pytest.mark.parametrize(("variant", "steps"), CASES, ids=[f"{name}-T{steps}" for name, steps in CASES])
def test_full_cache_reproduces_the_forward_at_every_position(variant: str, steps: int) -> None:
    model = model_for(**VARIANTS[variant])
    x = ids(2, 20)
    expected = model(x, num_steps=steps if model.config.is_looped else None).logits
    one_by_one, _ = decode(model, x, [5] + [1] * 15, steps)  # prefill, then one token per forward
    torch.testing.assert_close(one_by_one, expected, atol=1e-5, rtol=0)
    chunked, _ = decode(model, x, [7, 6, 7], steps)  # chunks after cached columns need the offset causal mask
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=0)


def test_seeded_initial_state_depends_only_on_position() -> None:
    model = model_for()
    short = model.initial_state(torch.empty(3, 10, 64), 5, None)
    long = model.initial_state(torch.empty(2, 20, 64), 5, None)
    torch.testing.assert_close(short[:2], long[:, :10], atol=0, rtol=0)
    torch.testing.assert_close(short[0], short[2], atol=0, rtol=0)  # the same in every row
    shifted = model.initial_state(torch.empty(2, 4, 64), 5, None, positions=6)
    torch.testing.assert_close(shifted, long[:, 6:10], atol=0, rtol=0)
    assert not torch.equal(short, model.initial_state(torch.empty(3, 10, 64), 6, None))
    model.train()  # training draws per-row states from (seed, step, rank)
    drawn = model.initial_state(torch.empty(2, 10, 64), None, 3)
    torch.testing.assert_close(drawn, model.initial_state(torch.empty(2, 10, 64), None, 3), atol=0, rtol=0)
    assert not torch.equal(drawn[0], drawn[1])


def test_left_padded_batch_equals_each_row_alone() -> None:
    model = model_for()
    rows = [ids(1, n)[0].tolist() for n in (3, 9, 1)]
    width = 9
    padded = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    follow = ids(3, 4)
    cache = model.new_cache(3, width + 4)
    batched = [model.forward_cached(padded, cache, attention_mask=mask).logits]
    batched += [model.forward_cached(follow[:, t : t + 1], cache).logits for t in range(4)]
    for i, row in enumerate(rows):
        alone = torch.tensor([row + follow[i].tolist()])
        expected = model(alone).logits[0]
        got = torch.cat([batched[0][i, width - len(row) :], *(b[i] for b in batched[1:])])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def past_slot_rule(policy: str, steps: int):
    """Iteration whose K/V an earlier token serves at iteration i (cache module docstring's table)."""
    slots = KVPolicy.parse(policy).num_slots(steps)
    return lambda i: max(j for j in range(steps) if j % slots == i % slots)


@pytest.mark.parametrize("policy", ["budget:2", "budget:3", "last"])
def test_sharing_policies_attend_to_the_documented_iterations(policy: str) -> None:
    """Decoding with a sharing policy equals decoding with a `full` cache whose past columns were rewritten by
    the policy's rule, and differs from plain `full` decoding."""
    model, steps = model_for(), 5
    x = ids(2, 9)
    _, full = decode(model, x[:, :8], [8], steps, capacity=9)
    rewritten = full.core.clone()
    for i in range(steps):
        rewritten[i] = full.core[past_slot_rule(policy, steps)(i)]
    full_next = model.forward_cached(x[:, 8:], full, num_steps=steps).logits
    full.core.copy_(rewritten)
    full.length = 8
    expected = model.forward_cached(x[:, 8:], full, num_steps=steps).logits
    got, shared = decode(model, x, [8, 1], steps, policy)
    torch.testing.assert_close(got[:, 8:], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got[:, 8:], full_next, atol=1e-4)
    assert shared.core.shape[0] == KVPolicy.parse(policy).num_slots(steps)


def test_cache_memory_per_policy() -> None:
    cfg = small()  # 1 prelude, 2 core, 1 coda layer; 2 kv heads of 32 channels
    per_layer = 2 * cfg.n_kv_heads * cfg.head_dim * 4  # K and V, fp32, per token
    for policy, slots in (("full", 8), ("budget:2", 2), ("budget:20", 8), ("last", 1)):
        cache = KVCache(cfg, 3, 10, policy=policy, max_steps=8)
        assert cache.nbytes() == 3 * 10 * per_layer * (2 + 2 * slots)
        assert cache.bytes_per_token() == per_layer * (2 + 2 * slots)


def test_an_exited_token_serves_its_last_iteration_to_every_later_one() -> None:
    model, steps = model_for(), 6
    x = ids(2, 12)
    criterion = ExitCriterion("latent", 0.15)  # stops these tokens after 3 or 4 of 6 iterations
    cache = model.new_cache(2, 12, max_steps=steps)
    out = model.forward_cached(x, cache, num_steps=steps, exit=criterion)
    used = out.iterations
    assert used.min() >= 1 and used.max() <= steps and len(set(used.flatten().tolist())) > 1
    for b in range(2):
        for t in range(12):
            depth = int(used[b, t])
            for i in range(steps):
                stored = cache.core[i, :, :, b, :, t]
                torch.testing.assert_close(stored, cache.core[min(i, depth - 1), :, :, b, :, t], atol=0, rtol=0)


@pytest.mark.parametrize("spec", ["latent:0.15", "kl:0.01", "argmax:2"])
def test_an_exited_token_has_the_logits_of_a_forward_at_its_depth(spec: str) -> None:
    """A lone token that stops after d iterations predicts exactly what the forward at depth d predicts."""
    model, steps = model_for(), 8
    x = ids(5, 1)
    for row in range(5):
        cache = model.new_cache(1, 1, max_steps=steps)
        out = model.forward_cached(x[row : row + 1], cache, num_steps=steps, exit=ExitCriterion.parse(spec))
        depth = int(out.iterations)
        torch.testing.assert_close(out.logits, model(x[row : row + 1], num_steps=depth).logits, atol=1e-5, rtol=0)


def test_probes_run_only_as_often_as_the_criterion_needs() -> None:
    model, steps = model_for(), 6
    x = ids(1, 4)
    for spec, probes in (("latent:1e-9", 1), ("kl:1e-12,min=3", steps - 3 + 2), ("argmax:99", steps)):
        cache = model.new_cache(1, 4, max_steps=steps)
        out = model.forward_cached(x, cache, num_steps=steps, exit=ExitCriterion.parse(spec))
        assert out.coda_passes == probes, spec
        assert bool((out.iterations == steps).all())


RIGHT_PADDED = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: KVPolicy.parse("budget:0"), "positive slot count"),
        (lambda m: KVPolicy.parse("sliding"), "unknown KV policy"),
        (lambda m: ExitCriterion.parse("kl:abc"), "not a number"),
        (lambda m: ExitCriterion.parse("entropy:0.1"), "unknown exit spec"),
        (lambda m: ExitCriterion.parse("argmax:1.5"), "positive integer"),
        (lambda m: ExitCriterion.parse("latent:0.1,min=0"), "min_steps"),
        (lambda m: ExitCriterion.parse("latent:0.1,max=2,min=3"), "max_steps"),
        (lambda m: ExitCriterion.parse("latent:0.1,patience=3"), "options are"),
        (lambda m: m.new_cache(1, 33), "max_seq_len"),
        (lambda m: m.forward_cached(ids(1, 5), m.new_cache(1, 4)), "do not fit"),
        (lambda m: m.forward_cached(ids(2, 3), m.new_cache(1, 4)), "made for 1 rows"),
        (lambda m: m.forward_cached(ids(1, 3), m.new_cache(1, 4, max_steps=2), num_steps=3), "max_steps 2"),
        (lambda m: m.forward_cached(ids(2, 3), m.new_cache(2, 4), attention_mask=RIGHT_PADDED), "left padding"),
    ],
)
def test_bad_input_is_one_clear_error(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(model_for())


@pytest.mark.parametrize("exit_spec", [None, "latent:0.15"])
def test_last_logits_only_returns_the_last_position_and_caches_every_one(exit_spec: str | None) -> None:
    model = model_for()
    x = ids(2, 12)
    criterion = ExitCriterion.parse(f"{exit_spec},max=4") if exit_spec else None
    outputs = []
    for last_only in (False, True):
        cache = model.new_cache(2, 12, max_steps=4)
        prefill = model.forward_cached(x[:, :9], cache, exit=criterion, num_steps=4, last_logits_only=last_only)
        after = model.forward_cached(x[:, 9:], cache, exit=criterion, num_steps=4)
        outputs.append((prefill.logits, after.logits))
    (full_prefill, full_after), (last_prefill, last_after) = outputs
    assert last_prefill.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last_prefill, full_prefill[:, -1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(last_after, full_after, atol=1e-6, rtol=0)  # the cache holds every position
