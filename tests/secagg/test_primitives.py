"""SecAgg+ building blocks: the neighbour graph, sealed shares, Shamir with checks, masking."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from scipy import stats

from fedtune.secagg import graph, keys, masking

SESSION = keys.new_session()


# --- graph ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "k"), [(10, 4), (101, 16), (1000, 16)])
def test_the_neighbour_graph_is_k_regular_symmetric_and_public(n, k):
    nodes = [1000 + 7 * i for i in range(n)]
    first = graph.neighbours(nodes, k, seed=42)
    assert all(len(peers) == k and node not in peers for node, peers in first.items())
    assert all(node in first[peer] for node, peers in first.items() for peer in peers)
    assert graph.neighbours(reversed(nodes), k, seed=42) == first  # any order, same graph
    assert graph.neighbours(nodes, k, seed=43) != first  # the seed draws the ring


def test_small_cohorts_get_the_complete_graph_and_odd_degrees_are_refused():
    complete = graph.neighbours(range(5), 16, seed=0)
    assert all(peers == frozenset(range(5)) - {node} for node, peers in complete.items())
    assert graph.neighbours(range(5), 0, seed=0) == complete
    with pytest.raises(ValueError, match="even degree"):
        graph.neighbours(range(10), 3, seed=0)


def test_thresholds_are_more_than_half_of_the_neighbours():
    assert graph.share_threshold(9, 0.6) == 6
    assert graph.share_threshold(16, 0.6) == 10
    assert graph.share_threshold(2, 0.6) == 2
    assert graph.share_threshold(9, 2 / 3) == 6  # 2/3 * 9 is 5.999...: no spurious 7
    assert graph.min_survivors(10, 9, 0.6) == 7  # 6 alive neighbours + the client itself
    assert graph.min_survivors(1000, 16, 0.6) == 600


# --- sealed shares and Shamir ------------------------------------------------------------------

def _keys_of_two():
    private_a, public_a = keys.new_seal_key()
    private_b, public_b = keys.new_seal_key()
    return keys.seal_keys(private_a, [public_b])[0], keys.seal_keys(private_b, [public_a])[0]


def test_a_sealed_share_opens_only_for_its_destination_and_session():
    key_ab, key_ba = _keys_of_two()
    assert key_ab == key_ba  # ECDH: both ends agree
    sealed = keys.seal(key_ab, SESSION, 11, 22, b"seed-share", b"key-share")
    assert keys.open_sealed(key_ba, sealed, SESSION, 11, 22) == (b"seed-share", b"key-share")
    with pytest.raises(keys.ShareRejected, match="another session"):
        keys.open_sealed(key_ba, sealed, keys.new_session(), 11, 22)
    with pytest.raises(keys.ShareRejected, match="sealed as 11 -> 22"):
        keys.open_sealed(key_ba, sealed, SESSION, 11, 33)
    tampered = bytearray(sealed)
    tampered[60] ^= 1
    with pytest.raises(keys.ShareRejected, match="does not open"):
        keys.open_sealed(key_ba, bytes(tampered), SESSION, 11, 22)
    other_key, _ = _keys_of_two()
    with pytest.raises(keys.ShareRejected, match="does not open"):
        keys.open_sealed(other_key, sealed, SESSION, 11, 22)


def test_the_mask_key_is_a_function_of_its_seed():
    seed = keys.new_seed()
    public = keys.public_bytes(keys.mask_private_key(seed))
    assert keys.public_bytes(keys.mask_private_key(seed)) == public
    assert keys.key_check(public)(seed)
    assert not keys.key_check(public)(keys.new_seed())
    # two neighbours agree the same pairwise seed
    other = keys.mask_private_key(keys.new_seed())
    assert (keys.pairwise_seed(keys.mask_private_key(seed), keys.public_bytes(other))
            == keys.pairwise_seed(other, public))


def test_recovery_finds_and_leaves_out_a_tampered_share():
    seed = keys.new_seed()
    check = keys.seed_check(SESSION, 5, keys.commitment(SESSION, 5, seed))
    shares = dict(zip(range(100, 108), keys.split(seed, 5, 8), strict=True))
    assert keys.recover(shares, 5, check) == (seed, [])
    bad = bytearray(shares[101])
    bad[10] ^= 0xFF
    shares[101] = bytes(bad)
    assert keys.recover(shares, 5, check) == (seed, [101])
    with pytest.raises(keys.RecoveryFailed, match="4 shares, 5 needed"):
        keys.recover({h: shares[h] for h in (100, 102, 103, 104)}, 5, check)
    with pytest.raises(keys.RecoveryFailed, match="passes its check"):
        keys.recover({h: shares[h] for h in (100, 101, 102, 103, 104)}, 5, check)


def test_one_tampering_holder_with_the_lowest_id_cannot_make_a_secret_unrecoverable():
    """k = 16 holders, t = 10 (the default degree): every one of the first 5,005 subsets in
    order holds the lowest holder's share, so trying 256 of them in order failed and the
    round failed, blaming the secret's owner; random subsets get past it."""
    seed = keys.new_seed()
    check = keys.seed_check(SESSION, 5, keys.commitment(SESSION, 5, seed))
    shares = dict(zip(range(100, 116), keys.split(seed, 10, 16), strict=True))
    bad = bytearray(shares[100])
    bad[10] ^= 0xFF
    shares[100] = bytes(bad)
    assert keys.recover(shares, 10, check) == (seed, [100])


def test_any_one_holder_is_left_out_by_a_subset_tried_where_not_all_are():
    """300 shares, t = 299: 300 subsets, more than are tried at random; the first t + 1 tried
    each leave out another holder, so one bad share anywhere never makes a secret
    unrecoverable (and never gets its dealer blamed: ``SecAggPlus`` names a dealer only then).
    Random subsets alone would leave out a given holder with probability 1/300 per try."""
    holders = list(range(300))
    tried = list(islice(keys._subsets(holders, 299), 300))
    assert all(len(subset) == 299 for subset in tried)
    assert {next(iter(set(holders) - set(subset))) for subset in tried} == set(holders)
    assert tried[0] == tuple(range(299))  # the first t holders first, as before


# --- masking -------------------------------------------------------------------------------------

def test_the_prg_is_deterministic_and_uniform():
    seed = keys.new_seed()
    stream = masking.prg(seed, 20_000, np.dtype(np.uint32))
    assert np.array_equal(stream, masking.prg(seed, 20_000, np.dtype(np.uint32)))
    assert not np.array_equal(stream, masking.prg(keys.new_seed(), 20_000, np.dtype(np.uint32)))
    assert stats.kstest(stream / 2**32, "uniform").pvalue > 1e-4


@pytest.mark.parametrize(("ring_bits", "bits"), [(32, 16), (64, 24), (64, 12)])
def test_masks_cancel_and_the_weighted_mean_is_within_the_rounding_bound(ring_bits, bits):
    rng = np.random.default_rng(0)
    dtype = masking.ring_dtype(ring_bits)
    values = [rng.normal(0, 0.3, 500) for _ in range(4)]
    weights = [3, 50, 7, 1]
    private = [keys.mask_private_key(keys.new_seed()) for _ in range(4)]
    public = [keys.public_bytes(p) for p in private]
    self_seeds = [keys.new_seed() for _ in range(4)]
    total = np.zeros(501, dtype=dtype)
    dithers = [masking.dither(masking.dither_seed(11, u), 500) for u in range(4)]
    for u in range(4):
        vector = masking.encode(values[u], weights[u], 1.0, bits, dtype, dithers[u])
        masking.add_mask(vector, self_seeds[u], 1)
        for v in range(4):
            if v != u:
                masking.add_mask(vector, keys.pairwise_seed(private[u], public[v]),
                                 masking.pair_sign(u, v))
        total += vector
    for seed in self_seeds:
        masking.add_mask(total, seed, -1)
    dither_sum = sum(w * d for w, d in zip(weights, dithers, strict=True))
    mean, clipped = masking.decode_mean(total, sum(weights), 1.0, bits, dither_sum)
    exact = np.average(np.clip(values, -1, 1), axis=0, weights=weights)
    bound = masking.rounding_bound(1.0, bits)
    assert np.abs(mean - exact).max() <= bound
    assert np.abs(mean - exact).max() > bound / 1000  # it did quantise
    assert clipped == sum(int(np.count_nonzero(np.abs(v) > 1.0)) for v in values) > 0


def test_the_dither_is_public_uniform_and_leaves_numpy_as_it_was():
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    offsets = masking.dither(masking.dither_seed(5, 1001), 20_000)
    assert np.array_equal(offsets, masking.dither(masking.dither_seed(5, 1001), 20_000))
    assert not np.array_equal(offsets, masking.dither(masking.dither_seed(5, 1002), 20_000))
    assert offsets.min() >= -0.5 and offsets.max() < 0.5
    assert stats.kstest(offsets + 0.5, "uniform").pvalue > 1e-4
    assert np.array_equal(np.random.get_state()[1], before)


def _rounding_errors(value: float, bits: int, draws: int) -> np.ndarray:
    """What the decoder makes of ``value`` minus ``value``, over ``draws`` dithers (in steps)."""
    errors = np.empty(draws)
    step = 2.0 / masking.levels(bits)
    for i in range(draws):
        offsets = masking.dither(masking.dither_seed(i, 3), 1)
        encoded = masking.encode(np.array([value]), 1, 1.0, bits, np.dtype(np.uint64), offsets)
        mean, _ = masking.decode_mean(encoded, 1, 1.0, bits, offsets)
        errors[i] = (mean[0] - value) / step
    return errors


def test_the_rounding_error_does_not_depend_on_the_value_rounded():
    """Subtractive dither: the decoder's error is uniform on [-1/2, 1/2) step whatever the value
    (on a level, between two, anywhere), which makes the quantised secure sum the real sum plus
    noise independent of the data. Stochastic rounding (Flower's quantiser) fails this: a value
    on a level is never moved, one halfway is always moved by half a step."""
    step = 2.0 / masking.levels(8)
    on_level, halfway = -1.0 + 100 * step, -1.0 + 100.5 * step
    first, second = _rounding_errors(on_level, 8, 3000), _rounding_errors(halfway, 8, 3000)
    assert np.abs(first).max() <= 0.5 + 1e-9 and np.abs(second).max() <= 0.5 + 1e-9
    assert stats.ks_2samp(first, second).pvalue > 1e-3
    assert stats.kstest(first + 0.5, "uniform").pvalue > 1e-3


def test_flatten_and_unflatten_cover_float_tensors_relative_or_as_they_are():
    sent = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.ones((2, 3), np.float32)),
                               "steps": Array(np.array([5], np.int64))}),
        "control": ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))})})
    summed = masking.summed_records(["arrays", "control"], {"control-delta": "control"})
    assert summed == [masking.SummedRecord("arrays", "arrays", True),
                      masking.SummedRecord("control-delta", "control", False)]
    reply = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.full((2, 3), 1.5, np.float32)),
                               "steps": Array(np.array([9], np.int64))}),
        "control-delta": ArrayRecord({"w": Array(np.full((2, 3), -2.0, np.float32))})})
    flat = masking.flatten(reply, sent, summed)
    assert masking.vector_length(sent, summed) == flat.size == 12
    assert np.array_equal(flat, [0.5] * 6 + [-2.0] * 6)
    back = masking.unflatten(flat, sent, summed)
    assert np.array_equal(back["arrays"]["w"].numpy(), reply["arrays"]["w"].numpy())
    assert np.array_equal(back["arrays"]["steps"].numpy(), [5])  # the server's integer buffer
    assert back["control-delta"]["w"].numpy().dtype == np.float32
    wrong = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones((3, 2), np.float32))}),
                        "control-delta": reply["control-delta"]})
    with pytest.raises(ValueError, match="shape"):
        masking.flatten(wrong, sent, summed)


def test_a_personal_part_never_enters_the_masked_vector():
    """FedPer's head (``kept``) is left out of the vector a client masks, whatever its reply
    holds there, and the unmasked aggregate keeps the sent head bit for bit."""
    head = np.array([0.1, 0.2, 0.3], np.float32)
    sent = RecordDict({"arrays": ArrayRecord({"body": Array(np.ones(4, np.float32)),
                                              "head": Array(head)})})
    summed = masking.summed_records(["arrays"], {}, kept=["head"])
    assert summed == [masking.SummedRecord("arrays", "arrays", True, ("head",))]
    reply = RecordDict({"arrays": ArrayRecord({"body": Array(np.full(4, 3.0, np.float32)),
                                               "head": Array(head + np.float32(7))})})
    flat = masking.flatten(reply, sent, summed)
    assert masking.vector_length(sent, summed) == flat.size == 4
    assert np.array_equal(flat, [2.0] * 4)
    back = masking.unflatten(flat, sent, summed)["arrays"]
    assert np.array_equal(back["head"].numpy(), head)
    assert np.array_equal(back["body"].numpy(), [3.0] * 4)


def test_client_weights():
    metrics = {"num-examples": 40, "fednova-a": 8.0}
    assert masking.integer_weight("1", metrics) == 1
    assert masking.integer_weight("num-examples", metrics) == 40
    assert masking.integer_weight("num-examples/fednova-a", metrics) == 5 * masking.RATIO_SCALE
    with pytest.raises(ValueError, match="whole number"):
        masking.integer_weight("num-examples", {"num-examples": 2.5})
