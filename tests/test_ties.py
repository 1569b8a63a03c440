"""The tie state, Eq. 1 and the tie manager on real GPT-2, BERT and timm ViT models (docs/method.md)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from dyntie_cli.core.memory import gradient_bytes, optimizer_bytes, parameter_bytes, trainable_parameters
from dyntie_cli.core.ties import (
    TieManager,
    all_independent,
    all_tied,
    canonicalize,
    independent_count,
    is_canonical,
    permute_state,
    roots,
    transition,
)
from dyntie_cli.errors import DyntieError

# --------------------------------------------------------------------------------------------------
# Eq. 1 by hand
# --------------------------------------------------------------------------------------------------


def test_transition_hand_worked():
    s = [0, 0, 0, 0]
    assert transition(s, [0, 1, 2, 3]) == [0, 1, 2, 3]  # all independent
    assert transition(s, [0, 0, 0, 0]) == [0, 0, 0, 0]  # all tied
    assert transition(s, [0, 1, 1, 3]) == [0, 1, 1, 3]
    assert transition(s, [0, 1, 0, 2]) == [0, 1, 0, 0]  # 3 -> 2 while 2 is tied to 0: ends on the root 0


def test_transition_chain_resolves_to_final_root():
    # block 2 follows 1, which is itself being tied to 0 in the same step; 3 follows 2 -> both end on 0
    assert transition([0, 1, 2, 3], [0, 0, 1, 2]) == [0, 0, 0, 0]
    # a longer chain with an independent block in the middle
    assert transition([0, 1, 2, 3, 4], [0, 1, 1, 2, 3]) == [0, 1, 1, 1, 1]
    assert transition([0, 0, 0, 0, 0], [0, 0, 2, 2, 3]) == [0, 0, 2, 2, 2]


def test_transition_depends_on_action_only_and_is_canonical():
    rng = random.Random(0)
    for _ in range(500):
        L = rng.randint(1, 9)
        a = [rng.randint(0, i) for i in range(L)]
        s = canonicalize([rng.randint(0, i) for i in range(L)])
        new = transition(s, a)
        assert is_canonical(new)
        assert independent_count(new) == sum(1 for i, x in enumerate(a) if x == i)
        assert new == transition(all_tied(L), a)


@pytest.mark.parametrize("bad", [[1, 0, 0], [0, 2, 0], [0, 0, 3], [0, -1, 0], [0, 0]])
def test_invalid_actions_rejected(bad):
    with pytest.raises(DyntieError, match="block|entries"):
        transition([0, 0, 0], bad)


def test_state_helpers():
    s = [0, 1, 1, 3, 0]
    assert roots(s) == [0, 1, 3] and independent_count(s) == 3
    assert is_canonical([0, 1, 2, 1, 2])  # every tied block points at an independent one
    assert not is_canonical([0, 0, 1])  # 2 points at a tied block: not resolved
    assert canonicalize([0, 0, 1]) == [0, 0, 0]
    assert all_independent(3) == [0, 1, 2]


def test_permute_state_keeps_group_sizes():
    s = [0, 1, 1, 3, 0, 3]
    p = permute_state(s, [5, 4, 3, 2, 1, 0])
    assert is_canonical(p) and independent_count(p) == independent_count(s)
    assert sorted(map(len, _groups(p))) == sorted(map(len, _groups(s)))


def _groups(s):
    g: dict[int, list[int]] = {}
    for i, r in enumerate(s):
        g.setdefault(r, []).append(i)
    return list(g.values())


# --------------------------------------------------------------------------------------------------
# Real models
# --------------------------------------------------------------------------------------------------


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=5, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    x = torch.randint(0, 64, (2, 12))
    return model, lambda m: list(m.transformer.h), lambda m: m(input_ids=x, use_cache=False).logits


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=5, num_attention_heads=2,
                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(cfg)
    x = torch.randint(0, 64, (2, 12))
    return model, lambda m: list(m.bert.encoder.layer), lambda m: m(input_ids=x).logits


def _vit():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=5,
                              num_heads=2)
    x = torch.randn(2, 1, 8, 8)
    return model, lambda m: list(m.blocks), lambda m: m(x)


MODELS = {"gpt2": _gpt2, "bert": _bert, "vit": _vit}


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _setup(kind, tied_grad="follow", initial=None):
    torch.manual_seed(0)
    model, blocks_of, forward = MODELS[kind]()
    model.eval()  # no dropout: outputs are compared exactly
    ties = TieManager(blocks_of(model), initial, tied_grad=tied_grad)
    opt = _optimizer(model)
    ties.attach_optimizer(opt)
    return model, blocks_of, forward, ties, opt


def _plain_copy(model, blocks_of, ties):
    """A plainly built model (no tie manager) whose block i holds block i's current weights as its own."""
    plain = copy.deepcopy(model)
    for b in blocks_of(plain):
        b._forward_pre_hooks.clear()
        b._forward_hooks.clear()
    for i, b in enumerate(blocks_of(plain)):
        for pname, t in zip(ties.names, ties.block_tensors(i)):
            path, _, leaf = pname.rpartition(".")
            m = b.get_submodule(path) if path else b
            m.__dict__.pop(leaf, None)
            m._parameters[leaf] = nn.Parameter(t.detach().clone())
    return plain


def _check_invariants(model, blocks_of, forward, ties, opt):
    s = ties.state
    ptr = [[t.untyped_storage().data_ptr() for t in ties.block_tensors(i)] for i in range(ties.num_blocks)]
    for i, r in enumerate(s):
        if r != i:  # tied: the same tensors (storage) as the root, and no parameter of its own
            assert ptr[i] == ptr[r]
            assert not list(ties.blocks[i].parameters())
    indep = [i for i in range(len(s)) if s[i] == i]
    flat = [p for i in indep for p in ptr[i]]
    assert len(set(flat)) == len(flat), "independent blocks must not share any storage"
    assert ties.distinct_block_weights() == independent_count(s)
    block_ids = {id(p) for b in ties.blocks for p in b.parameters()}
    always = {id(p) for p in model.parameters() if id(p) not in block_ids}
    expected = always | {id(p) for i in indep for p in ties.blocks[i].parameters()}
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(set(held)) and set(held) == expected
    assert set(map(id, opt.state)) <= expected, "no optimizer state for released parameters"
    n_always = sum(p.numel() for p in model.parameters() if id(p) in always)
    assert trainable_parameters(model) == n_always + ties.block_numel() * len(indep)


@pytest.mark.parametrize("kind", list(MODELS))
def test_200_random_actions_keep_every_invariant(kind):
    model, blocks_of, forward, ties, opt = _setup(kind)
    rng = random.Random(1)
    x_state = ties.state
    _check_invariants(model, blocks_of, forward, ties, opt)
    for step in range(200):
        a = [rng.randint(0, i) for i in range(ties.num_blocks)]
        if step % 7 == 0:  # visit the extremes too
            a = all_independent(ties.num_blocks) if step % 14 == 0 else all_tied(ties.num_blocks)
        x_state = transition(x_state, a)
        ties.apply(x_state)
        assert ties.state == x_state
        _check_invariants(model, blocks_of, forward, ties, opt)
        if step % 5 == 0:  # a real training step now and then, so there is optimizer state to release
            model.train()
            out = forward(model)
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.eval()
        with torch.no_grad():
            plain = _plain_copy(model, blocks_of, ties)
            torch.testing.assert_close(forward(model), forward(plain), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_initial_state_is_genuinely_block_zero(kind):
    model, blocks_of, forward, ties, opt = _setup(kind)
    assert ties.state == all_tied(ties.num_blocks)
    zero = ties.block_tensors(0)
    for i in range(1, ties.num_blocks):
        for a, b in zip(ties.block_tensors(i), zero):
            assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert ties.distinct_block_weights() == 1
    assert trainable_parameters(model) == sum(p.numel() for p in model.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_follow_step_changes_only_independent_blocks_and_root_gets_only_its_own_gradient():
    model, blocks_of, forward, ties, opt = _setup("gpt2", "follow")
    ties.apply([0, 1, 1, 3, 0])
    before = {id(p): p.detach().clone() for p in model.parameters()}
    owners = {id(p): i for i, b in enumerate(ties.blocks) for p in b.parameters()}
    # reference gradient: a plain model where tied blocks hold frozen copies of their root's weights
    plain = _plain_copy(model, blocks_of, ties)
    for i, b in enumerate(blocks_of(plain)):
        if ties.state[i] != i:
            b.requires_grad_(False)
    forward(plain).pow(2).mean().backward()
    forward(model).pow(2).mean().backward()
    for i in roots(ties.state):
        for p, q in zip(ties.blocks[i].parameters(), blocks_of(plain)[i].parameters()):
            torch.testing.assert_close(p.grad, q.grad)
    opt.step()
    changed = {owners.get(id(p), -1) for p in model.parameters() if not torch.equal(before[id(p)], p)}
    assert changed - {-1} == set(roots(ties.state))


def test_sum_mode_accumulates_gradients_of_every_position_into_the_root():
    model, blocks_of, forward, ties, opt = _setup("gpt2", "sum")
    ties.apply([0, 1, 1, 3, 0])
    plain = _plain_copy(model, blocks_of, ties)
    forward(plain).pow(2).mean().backward()
    forward(model).pow(2).mean().backward()
    pb = blocks_of(plain)
    for r in roots(ties.state):
        members = [i for i, x in enumerate(ties.state) if x == r]
        for k, p in enumerate(ties.blocks[r].parameters()):
            expected = sum(list(pb[i].parameters())[k].grad for i in members)
            torch.testing.assert_close(p.grad, expected)


def test_collapse_scenario_of_the_reference_code_cannot_happen():
    # tie 1 -> 0, untie 1, train: block 1 must end with its own storage and its own, diverging weights
    model, blocks_of, forward, ties, opt = _setup("gpt2", initial=all_independent(5))
    ties.apply([0, 0, 2, 3, 4])
    ties.apply([0, 1, 2, 3, 4])
    p0, p1 = ties.block_tensors(0), ties.block_tensors(1)
    assert all(a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() for a, b in zip(p0, p1))
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))  # a copy of what it was using
    for _ in range(3):
        forward(model).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert ties.distinct_block_weights() == 5
    assert not all(torch.equal(a, b) for a, b in zip(ties.block_tensors(0), ties.block_tensors(1)))


def test_untie_starts_with_fresh_or_copied_optimizer_state():
    for mode in ("fresh", "copy"):
        torch.manual_seed(0)
        model, blocks_of, forward = MODELS["gpt2"]()
        ties = TieManager(list(model.transformer.h), untie_optim=mode)
        opt = _optimizer(model)
        ties.attach_optimizer(opt)
        forward(model).pow(2).mean().backward()
        opt.step()
        ties.apply([0, 1, 0, 0, 0])
        new = list(ties.blocks[1].parameters())
        if mode == "fresh":
            assert all(p not in opt.state for p in new)
        else:
            root = list(ties.blocks[0].parameters())
            for p, r in zip(new, root):
                assert torch.equal(opt.state[p]["exp_avg"], opt.state[r]["exp_avg"])
                assert opt.state[p]["exp_avg"].data_ptr() != opt.state[r]["exp_avg"].data_ptr()


def test_accounted_bytes_fall_when_blocks_are_tied():
    model, blocks_of, forward, ties, opt = _setup("gpt2", initial=all_independent(5))
    forward(model).pow(2).mean().backward()
    opt.step()
    full = (parameter_bytes(model), gradient_bytes(model), optimizer_bytes(opt))
    ties.apply([0, 1, 1, 1, 1])
    tied = (parameter_bytes(model), gradient_bytes(model), optimizer_bytes(opt))
    block = ties.block_numel() * 4
    assert full[0] - tied[0] == 3 * block
    assert full[1] - tied[1] == 3 * block
    steps = 3 * len(ties.names) * 4  # one float32 step counter per parameter
    assert full[2] - tied[2] == 3 * 2 * block + steps  # Adam's two moments and the step counters


def test_ties_survive_dtype_and_device_moves():
    model, blocks_of, forward, ties, opt = _setup("gpt2")
    ties.apply([0, 1, 1, 3, 3])
    model.double()
    out = forward(model)
    assert out.dtype == torch.float64
    assert ties.distinct_block_weights() == 3
    assert all(t.dtype == torch.float64 for i in range(5) for t in ties.block_tensors(i))


def test_gpt2_generation_with_kv_cache_matches_plain_model():
    model, blocks_of, forward, ties, opt = _setup("gpt2")
    ties.apply([0, 1, 1, 0, 1])
    plain = _plain_copy(model, blocks_of, ties)
    x = torch.randint(0, 64, (1, 4))
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(model.generate(x, **kw), plain.generate(x, **kw))


def test_follow_mode_saves_fewer_activations_for_tied_blocks():
    def saved(model, forward):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(model).pow(2).mean()
        return total[0]

    a = _setup("gpt2", "follow", initial=all_independent(5))
    b = _setup("gpt2", "follow")
    assert saved(b[0], b[2]) < saved(a[0], a[2])


@pytest.mark.parametrize("kind", list(MODELS))
def test_tied_positions_share_one_half_precision_cast_under_autocast(kind):
    """Under bf16 autocast the four positions tied to block 0 save one bf16 copy of its matrices between
    them (not one each), and the outputs, before and after an optimizer step, are exactly those of casting
    at every position."""
    def run(share):
        torch.manual_seed(0)
        model, blocks_of, forward = MODELS[kind]()
        model.eval()
        ties = TieManager(blocks_of(model), all_tied(5), share_casts=share)
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t  # kept alive, so no address is reused
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(model)
        nbytes = sum(t.untyped_storage().nbytes() for t in saved.values())
        opt = _optimizer(model)
        ties.attach_optimizer(opt)
        out.float().pow(2).mean().backward()
        opt.step()  # the shared cast must follow the update, not keep the old weights
        with torch.autocast("cpu", dtype=torch.bfloat16):
            after = forward(model)
        return (out, after), nbytes, ties

    plain, plain_bytes, _ = run(False)
    shared, shared_bytes, ties = run(True)
    assert torch.equal(plain[0], shared[0]) and torch.equal(plain[1], shared[1])
    assert not torch.equal(shared[0], shared[1])
    # the weight matrices' bf16 copies are what the input gradient needs (a bias needs nothing saved)
    matrices = sum(p.numel() for p, mm in zip(ties._own[0], ties._feeds_matmul) if mm and p.dim() == 2) * 2
    assert matrices > 0
    assert plain_bytes - shared_bytes >= 3 * matrices  # 4 tied positions: 4 copies -> 1
    # outside the forward a tied block computes with its root's float32 tensors again
    assert all(t.dtype == torch.float32 for t in ties.block_tensors(3))
    assert ties.distinct_block_weights() == 1
