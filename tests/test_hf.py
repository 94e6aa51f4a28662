"""``attn_implementation="workbench"`` in tiny, randomly initialised transformers models (no
downloads): with the full or causal pattern it computes what transformers' own ``sdpa``
computes, forward and backward, with padding and with a KV cache; other patterns equal SDPA
under the equivalent dense mask."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import workbench as wb  # noqa: E402
from workbench.integrations import hf  # noqa: E402

P = wb.patterns
BLOCK = 8


def _llama(seed=0, **overrides):
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.3, attn_implementation="sdpa", **overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def _gemma2(seed=0, **overrides):
    """Gemma 2 soft-caps its attention logits (eager attention in transformers); its sliding
    window is longer than the tests' sequences, so every mask is causal."""
    cfg = transformers.Gemma2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        sliding_window=256, attn_logit_softcapping=2.0, final_logit_softcapping=None,
        initializer_range=0.3, attn_implementation="eager", **overrides)
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(cfg).double().eval()


def _bert(seed=0, **overrides):
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, initializer_range=0.3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa",
        **overrides)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg, add_pooling_layer=False).double().eval()


def _with_pattern(model, pattern, **kw):
    return hf.use_pattern(copy.deepcopy(model), pattern, block_size=BLOCK, **kw)


def _batch(lengths, seq, left):
    """Token ids and a 2-D attention mask of ``lengths`` real tokens, padded on the left (as a
    decoder generates) or on the right."""
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(1, 100, (len(lengths), seq), generator=g)
    pos = torch.arange(seq)
    n = torch.tensor(lengths)[:, None]
    return ids, (pos >= seq - n if left else pos < n).long()


# A dense reference registered beside "workbench": PyTorch's SDPA under transformers' mask
# intersected with the layer's token mask, queries at the last Sq of the Sk key positions.
REF = "workbench_dense_reference"
REF_PATTERNS: dict[int, object] = {}


def _dense_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    b, h, sq, _ = query.shape
    sk = key.shape[2]
    g = h // key.shape[1]
    key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    qpos = torch.arange(sq)[:, None] + sk - sq
    if attention_mask is None:
        allowed = torch.arange(sk)[None] <= qpos if module.is_causal else torch.ones(sq, sk)
        allowed = allowed.bool()[None, None]
    else:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    pattern = REF_PATTERNS.get(module.layer_idx, P.full())
    heads = torch.arange(h)[:, None, None] * (pattern.num_heads > 1)
    token = pattern.allowed(heads, qpos[None], torch.arange(sk)[None, None])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed & token[None],
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


transformers.AttentionInterface.register(REF, _dense_reference)
transformers.masking_utils.AttentionMaskInterface.register(
    REF, transformers.masking_utils.sdpa_mask)


def _reference(model, patterns):
    ref = copy.deepcopy(model)
    REF_PATTERNS.clear()
    REF_PATTERNS.update(patterns)
    ref.set_attn_implementation(REF)
    return ref


def _param_grads(model, loss_of):
    model.zero_grad()
    loss_of(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b, tol=1e-9):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("padded", [False, True])
def test_encoder_with_the_full_pattern_equals_sdpa_forward_and_backward(padded):
    ref = _bert()
    mine = _with_pattern(ref, P.full())
    ids, mask = _batch([37, 30, 21] if padded else [37, 37, 37], 37, left=False)
    outs = [m(ids, attention_mask=mask).last_hidden_state for m in (ref, mine)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-10, rtol=1e-10)
    w = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64) * mask[..., None]

    def loss(m):
        return (m(ids, attention_mask=mask).last_hidden_state * w).sum()

    _assert_grads_close(_param_grads(mine, loss), _param_grads(ref, loss))


@pytest.mark.parametrize("model_of, tol, padded", [
    (_llama, 1e-10, False), (_llama, 1e-10, True), (_gemma2, 1e-5, False)])
def test_decoder_with_the_causal_pattern_equals_transformers_forward_and_backward(model_of, tol,
                                                                                 padded):
    """Llama against its sdpa; Gemma 2, whose attention logits are soft-capped, against its
    eager attention. That one's softmax runs in float32 (hence the looser tolerance), and turns
    a padding query's row into NaNs that reach the real tokens in float64: it runs unpadded."""
    ref = model_of()
    mine = _with_pattern(ref, P.causal())
    ids, mask = _batch([40, 33, 12] if padded else [40, 40, 40], 40, left=True)
    real = mask.bool()
    logits = [m(ids, attention_mask=mask).logits for m in (ref, mine)]
    torch.testing.assert_close(logits[1][real], logits[0][real], atol=tol, rtol=tol)
    w = torch.randn(logits[0].shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64) * mask[..., None]

    def loss(m):
        return (m(ids, attention_mask=mask).logits * w).sum()

    _assert_grads_close(_param_grads(mine, loss), _param_grads(ref, loss), tol)


def _generate(model, ids, mask, steps=4):
    return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)


@pytest.mark.parametrize("pattern, reference", [
    (P.causal(), "sdpa"),
    (P.local_window(6, causal=True) | P.global_tokens(2), REF),
    (P.dilated([8, 16], [1, 2], 4, causal=True), REF),
])
def test_cached_decoding_matches_step_by_step(pattern, reference):
    """Prefill of a left-padded batch, then tokens decoded one at a time from the KV cache:
    every step's logits equal the reference's (transformers' sdpa for the causal pattern, the
    dense-mask reference for the others)."""
    base = _llama()
    ref = base if reference == "sdpa" else _reference(base, {0: pattern, 1: pattern})
    mine = _with_pattern(base, pattern)
    ids, mask = _batch([27, 19], 27, left=True)
    want, got = _generate(ref, ids, mask), _generate(mine, ids, mask)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == 4
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_a_prefill_in_chunks_at_an_unaligned_offset_matches_sdpa():
    """A 21-token prefill, then a 9-token chunk against the cache (queries at 21..29, not a
    multiple of the block), then one decoded token."""
    ref = _llama()
    mine = _with_pattern(ref, P.causal() & P.local_window(40))
    ids, _ = _batch([31], 31, left=True)
    results = []
    for model in (ref, mine):
        cache = transformers.DynamicCache(config=model.config)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else (
            "past_key_values")
        steps = []
        for chunk in (ids[:, :21], ids[:, 21:30], ids[:, 30:]):
            steps.append(model(chunk, use_cache=True, **{name: cache}).logits)
        results.append(steps)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("model_of, left", [(_llama, True), (_bert, False)])
def test_a_sparse_pattern_changes_the_output_and_equals_a_dense_mask(model_of, left):
    """A local window with global tokens: the output moves away from dense (or causal)
    attention and equals the model run by SDPA with the explicit 4-D mask of (model mask and
    pattern), padding included."""
    base = model_of()
    causal = model_of is _llama
    pattern = P.local_window(5) | P.global_tokens(2)
    mine = _with_pattern(base, pattern)
    ids, mask = _batch([40, 29], 40, left=left)
    allowed = pattern.token_mask(40)[0]
    if causal:
        allowed = allowed & torch.ones(40, 40, dtype=torch.bool).tril()
    dense = allowed[None, None] & mask.bool()[:, None, None, :]
    real = mask.bool()

    def out(m, attention_mask):
        res = m(ids, attention_mask=attention_mask)
        return res.logits if causal else res.last_hidden_state

    got, want, plain = out(mine, mask), out(base, dense), out(base, mask)
    torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=1e-10)
    assert (got[real] - plain[real]).abs().max() > 1e-3


def test_patterns_per_layer_by_dict_and_by_function():
    base = _llama()
    local = P.local_window(4, causal=True)
    ids, mask = _batch([30, 24], 30, left=True)
    real = mask.bool()
    want = _reference(base, {1: local})(ids, attention_mask=mask).logits
    by_dict = _with_pattern(base, {1: local})(ids, attention_mask=mask).logits
    by_function = _with_pattern(base, lambda i: local if i == 1 else None)(
        ids, attention_mask=mask).logits
    everywhere = _with_pattern(base, local)(ids, attention_mask=mask).logits
    for got in (by_dict, by_function):
        torch.testing.assert_close(got[real], want[real], atol=1e-10, rtol=1e-10)
    assert (everywhere[real] - want[real]).abs().max() > 1e-3


def test_the_implementation_alone_is_full_attention():
    """``attn_implementation="workbench"`` without use_pattern: what sdpa computes."""
    ref = _llama()
    mine = copy.deepcopy(ref)
    mine.set_attn_implementation(hf.NAME)
    ids, mask = _batch([25, 17], 25, left=True)
    a, b = (m(ids, attention_mask=mask).logits for m in (ref, mine))
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=1e-10, rtol=1e-10)


def test_attention_dropout_is_seeded_and_only_in_training():
    base = _llama(attention_dropout=0.3)
    mine = _with_pattern(base, P.causal())
    ids, mask = _batch([30, 22], 30, left=True)
    real = mask.bool()
    evaluated = mine(ids, attention_mask=mask).logits
    mine.train()
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(mine(ids, attention_mask=mask).logits)
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    assert (runs[0][real] - evaluated[real]).abs().max() > 1e-3
    assert (runs[0][real] - runs[2][real]).abs().max() > 1e-3
    mine.eval()
    torch.testing.assert_close(mine(ids, attention_mask=mask).logits, evaluated)


def test_mask_structure_reads_offsets_and_padding_from_transformers_masks():
    from transformers.masking_utils import causal_mask_function, eager_mask, sdpa_mask

    keys = torch.ones(2, 30, dtype=torch.bool)
    keys[1, :6] = False
    for build in (sdpa_mask, eager_mask):  # boolean, and additive float
        m = build(2, 9, 30, q_offset=21, attention_mask=keys, mask_function=causal_mask_function,
                  allow_is_causal_skip=False)
        st = hf.mask_structure(m, True, 2, 4, 9, 30)
        assert (st.causal, st.q_offset) == (True, 21) and torch.equal(st.keys, keys)
    none = hf.mask_structure(None, True, 2, 4, 1, 30)
    assert (none.causal, none.q_offset, none.keys) == (True, 29, None)
    window = sdpa_mask(1, 9, 30, q_offset=21, allow_is_causal_skip=False,
                       mask_function=transformers.masking_utils.sliding_window_causal_mask_function(4))
    with pytest.raises(ValueError, match="neither causal nor bidirectional"):
        hf.mask_structure(window, True, 1, 4, 9, 30)
    bias = torch.zeros(1, 1, 9, 30, dtype=torch.float64)
    bias[..., 3] = -1.5
    with pytest.raises(ValueError, match="biases"):
        hf.mask_structure(bias, True, 1, 4, 9, 30)


def test_bad_settings_raise_naming_the_argument():
    model = _llama()
    with pytest.raises(TypeError, match="pattern"):
        hf.use_pattern(copy.deepcopy(model), "causal")
    with pytest.raises(TypeError, match="layer indices"):
        hf.use_pattern(copy.deepcopy(model), {"0": P.causal()})
    with pytest.raises(TypeError, match="pattern of layer 1"):
        hf.use_pattern(copy.deepcopy(model), {1: "causal"})
    with pytest.raises(ValueError, match="block_size"):
        hf.use_pattern(copy.deepcopy(model), P.causal(), block_size=0)
    with pytest.raises(ValueError, match="backend"):
        hf.use_pattern(copy.deepcopy(model), P.causal(), backend="fast")
    ids, _ = _batch([12], 12, left=True)
    with pytest.raises(ValueError, match="3 heads"):
        _with_pattern(model, P.dilated([4, 8, 12], [1, 2, 4], 3))(ids)
    with pytest.raises(TypeError, match="layer 0"):
        _with_pattern(model, lambda i: "causal")(ids)
    layer = _with_pattern(model, P.causal()).model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    for modifier in ("position_bias", "sinks"):
        with pytest.raises(ValueError, match=modifier):
            hf.attention_forward(layer, q, q, q, None, **{modifier: torch.zeros(1)})
    hf.attention_forward(layer, q, q, q, None, softcap=1.0)  # kept: True must not reuse it
    for cap in (-1.0, True, [1.0]):
        with pytest.raises(ValueError, match="cap must be a positive finite number"):
            hf.attention_forward(layer, q, q, q, None, softcap=cap)
