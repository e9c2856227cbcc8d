"""Several characters in one panel: regions, the masked adapter, the pipeline and the CLI (tiny models)."""

import numpy as np
import pytest
import torch
from components import make_sheet
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from test_personalize_pipeline import make_pipe, run

from engine.regions import character_regions, column_order


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def test_regions_are_columns_that_sum_to_one_and_follow_positions():
    masks = character_regions([None, None], 8, 40)
    assert masks.shape == (2, 8, 40)
    np.testing.assert_allclose(masks.sum(0), 1.0, atol=1e-6)
    assert masks[0, :, :15].min() == 1 and masks[0, :, 25:].max() == 0  # first written: left
    assert column_order(["right", None]) == [1, 0] and column_order([None, "centre", None]) == [0, 1, 2]
    assert column_order([None, None, "left"]) == [1, 2, 0]
    assert column_order(["centre", None]) == [0, 1]  # two characters: centre is no preference
    swapped = character_regions(["right", None], 8, 40)
    np.testing.assert_array_equal(swapped[0], masks[1])
    with pytest.raises(ValueError, match="both stand left"):
        column_order(["left", "left"])
    with pytest.raises(ValueError, match="1 to 3"):
        column_order([None] * 4)


def _processor_output(masks, second_embeds):
    """One SDXL-style cross-attention layer with two characters' adapter tokens and region masks."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    proc = IPAdapterAttnProcessor2_0(hidden_size=16, cross_attention_dim=8, num_tokens=(4,), scale=1.0)
    attn.set_processor(proc)
    hidden = torch.randn(1, 8 * 6, 16)  # an 8 x 6 (h x w) latent grid
    text = torch.randn(1, 5, 8)
    first = torch.randn(1, 1, 4, 8)
    images = torch.cat([first, second_embeds], dim=1)  # [batch, characters, tokens, dim]
    with torch.no_grad():
        return attn(hidden, encoder_hidden_states=(text, [images]), ip_adapter_masks=[masks]).reshape(8, 6, 16)


def test_outside_its_region_a_characters_adapter_changes_nothing():
    masks = torch.from_numpy(character_regions([None, None], 8, 6))[None]  # [1, 2, 8, 6]
    torch.manual_seed(1)
    a = _processor_output(masks, torch.randn(1, 1, 4, 8))
    b = _processor_output(masks, torch.randn(1, 1, 4, 8) * 3)  # another second character
    changed = (a - b).abs().amax(-1) > 1e-6
    outside = masks[0, 1] == 0
    assert changed.any()  # the second character's tokens matter inside its region
    assert not changed[outside].any()  # and nowhere outside it
    assert changed[masks[0, 1] == 1].all()


def test_group_panel_is_deterministic_and_reads_each_sheet(pipe):
    red, blue, green = make_sheet((200, 40, 40)), make_sheet((40, 40, 200), seed=1), make_sheet((40, 180, 40), seed=2)
    a = run(pipe, "two friends talking", sheet=[[red, blue]], seeds=3).images
    again = run(pipe, "two friends talking", sheet=[[red, blue]], seeds=3).images
    np.testing.assert_array_equal(a, again)
    other = run(pipe, "two friends talking", sheet=[[red, green]], seeds=3).images
    assert np.abs(a - other).max() > 1e-3  # the second character's sheet counts
    swapped = run(pipe, "two friends talking", sheet=[[red, blue]], regions=[["right", None]], seeds=3).images
    assert np.abs(a - swapped).max() > 1e-3  # and where they stand
    three = run(pipe, "three friends", sheet=[[red, blue, green]], seeds=3).images
    assert three.shape == a.shape


def test_group_panel_takes_image_guidance(pipe):
    red, blue = make_sheet((200, 40, 40)), make_sheet((40, 40, 200), seed=1)
    two_pass = run(pipe, "two friends talking", sheet=[[red, blue]], seeds=3).images
    same = run(pipe, "two friends talking", sheet=[[red, blue]], seeds=3, image_guidance_scale=5.0).images
    np.testing.assert_allclose(same, two_pass, atol=2e-4)  # each character's masks follow it into the third pass
    stronger = run(pipe, "two friends talking", sheet=[[red, blue]], seeds=3, image_guidance_scale=9.0).images
    assert np.abs(stronger - two_pass).max() > 1e-3


def test_group_panels_batch_like_single_panels(pipe):
    red, blue = make_sheet((200, 40, 40)), make_sheet((40, 40, 200), seed=1)
    sheets = [[red, blue], red, None, [blue, red]]
    prompts = ["two friends", "one girl", "an empty street", "two friends again"]
    batch = run(pipe, prompts, sheet=sheets, seeds=[1, 2, 3, 4])
    for i in range(4):
        single = run(pipe, prompts[i], sheet=[sheets[i]], seeds=i + 1).images[0]
        np.testing.assert_allclose(batch.images[i], single, atol=2e-4)
    # a one-sheet list is a single-character panel
    np.testing.assert_array_equal(run(pipe, "one girl", sheet=[[red]], seeds=2).images,
                                  run(pipe, "one girl", sheet=red, seeds=2).images)


def test_masks_given_as_arrays_equal_the_same_positions(pipe):
    red, blue = make_sheet((200, 40, 40)), make_sheet((40, 40, 200), seed=1)
    masks = character_regions([None, None], 64, 64)  # full resolution, resized to the latents
    auto = run(pipe, "two friends", sheet=[[red, blue]], seeds=3).images
    given = run(pipe, "two friends", sheet=[[red, blue]], regions=[masks], seeds=3).images
    np.testing.assert_allclose(auto, given, atol=2e-3)


@pytest.mark.parametrize("kwargs, message", [
    ({"sheet": [[make_sheet()] * 4]}, "holds 4 characters"),
    ({"sheet": [[make_sheet()] * 2], "regions": [["left", "left"]]}, "both stand left"),
    ({"sheet": [[make_sheet()] * 2], "regions": [["left"]]}, "1 positions for 2 characters"),
    ({"sheet": [[make_sheet()] * 2], "regions": [np.zeros((3, 8, 8))]}, r"shaped \[2, H, W\]"),
    ({"sheet": [[make_sheet()] * 2], "regions": [np.full((2, 8, 8), 2.0)]}, r"in \[0, 1\]"),
    ({"sheet": [[make_sheet()] * 2], "regions": "left"}, "one entry"),
])
def test_bad_group_inputs_raise_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, "two friends", **kwargs)


def test_group_prompts_say_how_many_people_unless_they_do():
    from engine.regions import describe_group

    assert describe_group("talking on a bench", 2) == "two people, talking on a bench"
    assert describe_group("three friends at a table", 3) == "three friends at a table"
    assert describe_group("a couple dancing", 2) == "a couple dancing"
    assert describe_group("three trees behind them", 2) == "two people, three trees behind them"
    assert describe_group("waving", 1) == "waving" and describe_group("a street", 0) == "a street"
