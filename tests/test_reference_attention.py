import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from engine.models.reference_attention import ReferenceAttnProcessor, ReferenceBank

DIM, HEADS, TOKENS = 16, 2, 16  # 16 tokens: a 4x4 grid


def make_attn(seed=0):
    torch.manual_seed(seed)
    return Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS).eval()


def make_bank(scale=1.0, rows=(True,), figure=None):
    bank = ReferenceBank(scale)
    bank.figure = torch.ones(1, 1, 4, 4) if figure is None else figure
    bank.rows = torch.tensor(rows)
    return bank


def record(bank, attn, ref):
    bank.mode = "write"
    ReferenceAttnProcessor(bank, "a")(attn, ref)
    bank.mode = "read"


def by_hand(attn, x, ref, bias):
    """Multi-head attention of x's queries over [x, ref] with an additive bias on the logits."""
    q, k, v = attn.to_q(x), attn.to_k(torch.cat([x, ref], 1)), attn.to_v(torch.cat([x, ref], 1))
    d = DIM // HEADS
    q, k, v = (t.view(1, -1, HEADS, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(1, -1, DIM)
    return attn.to_out[0](out)


@torch.no_grad()
def test_off_and_a_copy_of_itself_are_plain_self_attention():
    attn = make_attn()
    x = torch.randn(1, TOKENS, DIM)
    plain = AttnProcessor2_0()(attn, x)
    bank = make_bank(scale=3.0)
    torch.testing.assert_close(ReferenceAttnProcessor(bank, "a")(attn, x), plain)  # mode "off"
    # the reference is the panel itself: every key twice, any weight, the same softmax average
    record(bank, attn, x)
    torch.testing.assert_close(ReferenceAttnProcessor(bank, "a")(attn, x), plain, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("scale", [0.5, 1.0, 4.0])
def test_the_sheets_tokens_weigh_scale_times_their_share(scale):
    attn = make_attn()
    x, ref = torch.randn(1, TOKENS, DIM), torch.randn(1, TOKENS, DIM)
    bank = make_bank(scale=scale)
    record(bank, attn, ref)
    got = ReferenceAttnProcessor(bank, "a")(attn, x)
    bias = torch.cat([torch.zeros(TOKENS), torch.full((TOKENS,), math.log(scale))])
    torch.testing.assert_close(got, by_hand(attn, x, ref, bias), atol=1e-5, rtol=1e-5)
    assert (got - AttnProcessor2_0()(attn, x)).abs().max() > 1e-2


@torch.no_grad()
def test_background_tokens_of_the_sheet_and_rows_without_the_sheet_are_left_out():
    attn = make_attn()
    x, ref = torch.randn(1, TOKENS, DIM), torch.randn(1, TOKENS, DIM)
    figure = torch.zeros(1, 1, 4, 4)
    figure[..., 1:3, 1:3] = 1.0  # the figure: the 4 centre tokens
    bank = make_bank(scale=2.0, rows=(False, True), figure=figure)
    record(bank, attn, ref)
    out = ReferenceAttnProcessor(bank, "a")(attn, torch.cat([x, x]))
    # row 0 (a pass without the sheet: CFG's unconditional half) is plain self-attention
    torch.testing.assert_close(out[:1], AttnProcessor2_0()(attn, x), atol=1e-5, rtol=1e-5)
    # row 1 reads only the figure's tokens: the background's may be anything
    changed = ref.clone()
    background = (figure.reshape(-1) == 0).nonzero().squeeze(1)
    changed[:, background] = torch.randn(1, len(background), DIM) * 5
    record(bank, attn, changed)
    torch.testing.assert_close(ReferenceAttnProcessor(bank, "a")(attn, torch.cat([x, x]))[1:], out[1:])
    bias = torch.full((2 * TOKENS,), -math.inf)
    bias[:TOKENS] = 0.0
    bias[TOKENS + figure.reshape(-1).nonzero().squeeze(1)] = math.log(2.0)
    torch.testing.assert_close(out[1:], by_hand(attn, x, ref, bias), atol=1e-5, rtol=1e-5)


def test_a_negative_scale_is_refused():
    with pytest.raises(ValueError, match="reference scale -1 must be >= 0"):
        ReferenceBank(-1)
