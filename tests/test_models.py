"""The thesis' generator and critic (chapter 3.1): parameter counts, receptive field, any-size inputs."""
import pytest
import torch

from vstain.models import (Critic, CriticConfig, Generator, GeneratorConfig, num_params, pad_to_multiple,

    receptive_field, summarize)


def test_thesis_parameter_counts_and_receptive_field():
    gen, critic = Generator(), Critic()
    assert num_params(gen) == 23_092_678  # thesis 3.1.1: "23.1 M"
    assert round(num_params(gen) / 1e6, 2) == 23.09
    assert num_params(critic) == 6_203_841  # thesis 3.1.2: "6.2 M"
    assert round(num_params(critic) / 1e6, 1) == 6.2
    assert critic.receptive_field() == 54  # thesis 3.1.2
    assert receptive_field(Critic(CriticConfig(base_width=4))) == 54  # width does not change it


def test_no_batch_norm_and_instance_norm_placement():
    critic = Critic()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    norms = [name for name, m in critic.named_modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms == ["block2.1", "block3.1", "block4.1"]  # every block but the first (and the score)
    gen_norms = [m for m in Generator(GeneratorConfig(4)).modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert len(gen_norms) == 14  # 7 blocks x 2 sub-blocks
    assert all(m.negative_slope == 0.05 for m in critic.modules() if isinstance(m, torch.nn.LeakyReLU))


@pytest.mark.parametrize("shape", [(2, 1, 9, 37, 50), (1, 1, 8, 8, 8), (1, 1, 17, 8, 23), (3, 1, 16, 24, 40), (1, 1, 33, 34, 35)])
def test_generator_output_shape_equals_input_shape(shape):
    gen = Generator(GeneratorConfig(base_width=2))
    out = gen(torch.randn(shape))
    assert out.shape == (shape[0], 6, *shape[2:])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 1, 7, 32, 32), (1, 1, 16, 5, 16), (1, 1, 9, 9, 1)])
def test_generator_rejects_axes_below_8(shape):
    with pytest.raises(ValueError, match=r"at least 8"):
        Generator(GeneratorConfig(base_width=2))(torch.randn(shape))


def test_generator_rejects_wrong_rank():
    with pytest.raises(ValueError, match="5D"):
        Generator(GeneratorConfig(base_width=2))(torch.randn(1, 16, 16, 16))


@pytest.mark.parametrize("zyx,out", [((9, 37, 50), (1, 4, 6)), ((8, 8, 8), (1, 1, 1)), ((32, 64, 48), (4, 8, 6))])
def test_critic_outputs_a_score_map(zyx, out):
    critic = Critic(CriticConfig(base_width=2))
    scores = critic(torch.randn(2, 1, *zyx), torch.randn(2, 6, *zyx))
    assert scores.shape == (2, 1, *out)


def test_critic_rejects_mismatched_pair_and_small_input():
    critic = Critic(CriticConfig(base_width=2))
    with pytest.raises(ValueError, match="differ"):
        critic(torch.randn(1, 1, 8, 16, 16), torch.randn(1, 6, 8, 16, 17))
    with pytest.raises(ValueError, match="at least 8"):
        critic(torch.randn(1, 1, 6, 16, 16), torch.randn(1, 6, 6, 16, 16))


def test_reflect_padding_is_cropped_back_exactly():
    x = torch.arange(9 * 10 * 17, dtype=torch.float32).reshape(1, 1, 9, 10, 17)
    padded, crop = pad_to_multiple(x, 8)
    assert padded.shape[2:] == (16, 16, 24)
    assert torch.equal(padded[crop], x)


def test_summary_rows_match_the_model():
    gen = Generator(GeneratorConfig(base_width=8))
    rows = summarize(gen, (9, 37, 50))
    assert [r["name"] for r in rows] == ["enc1", "down1", "enc2", "down2", "enc3", "down3", "bottleneck",
                                          "up3", "up2", "up1", "head"]
    assert sum(r["params"] for r in rows) == num_params(gen)
    assert rows[0]["out_shape"] == (8, 16, 40, 56)  # padded to multiples of 8
    assert rows[6]["out_shape"] == (64, 2, 5, 7)
    crows = summarize(Critic(), (32, 384, 384))  # thesis scale, meta device: no memory
    assert crows[0]["in_shape"] == (7, 32, 384, 384)
    assert crows[-1]["out_shape"] == (1, 4, 48, 48)
    assert sum(r["params"] for r in crows) == 6_203_841


@pytest.mark.parametrize("bad", [dict(base_width=0), dict(negative_slope=1.0), dict(base_width=2.5)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        GeneratorConfig(**bad)
