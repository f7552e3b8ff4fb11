"""Test-time refinement (issue 29): instance optimisation of the network's field, score-weighted or plain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from conftest import BUNDLE
from scripts.losses import GradientL2Loss
from scripts.metrics import end_point_error, folding_percentage
from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet, ZeroDisplacement
from scripts.phantom import cardiac_phantom_pair
from scripts.registration_io import minmax_resize
from scripts.refinement import InstanceRefiner

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    pairs = [cardiac_phantom_pair(100000 + i, size=64) for i in range(3)]  # validation indices, cine mode

    def stack(key):
        return torch.as_tensor(np.stack([p[key] for p in pairs])).float()

    image = torch.cat([minmax_resize(stack("moving"), (64, 64)), minmax_resize(stack("fixed"), (64, 64))], 1)
    return {"image": image, "true": stack("true_ddf")}


@pytest.fixture(scope="module")
def networks() -> tuple[DiffeomorphicVoxelMorph, ScoringNet]:
    net, scoring = DiffeomorphicVoxelMorph(), ScoringNet()
    net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", weights_only=True))
    scoring.load_state_dict(torch.load(BUNDLE / "models" / "scoring_model.pt", weights_only=True))
    return net.eval(), scoring.eval()


def mse(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    return ((Warp()(image[:, :1], ddf) - image[:, 1:2]) ** 2).flatten(1).mean(1)


def test_zero_steps_is_the_network_bit_for_bit(batch, networks):
    net, scoring = networks
    with torch.no_grad():
        expected = net(batch["image"])
    out = InstanceRefiner(steps=0, scoring_network=scoring)(net, batch["image"])
    assert torch.equal(out.ddf, expected) and out.steps == [0, 0, 0]


@pytest.mark.parametrize("weighted", [True, False], ids=["score_weighted", "plain"])
def test_refinement_lowers_the_residual_and_the_end_point_error(batch, networks, weighted):
    net, scoring = networks
    image, true = batch["image"], batch["true"]
    with torch.no_grad():
        start = net(image)
    out = InstanceRefiner(steps=30, learning_rate=0.1, score_weighted=weighted, scoring_network=scoring)(net, image)
    assert (mse(image, out.ddf) < mse(image, start)).all()
    assert end_point_error(out.ddf, true).mean() < end_point_error(start, true).mean()
    assert out.steps == [30, 30, 30] and max(out.folding_pct) <= 0.5
    assert torch.allclose(folding_percentage(out.ddf).flatten(), torch.tensor(out.folding_pct))


def test_weighted_and_plain_refinement_differ(batch, networks):
    net, scoring = networks
    weighted = InstanceRefiner(steps=5, learning_rate=0.1, scoring_network=scoring)(net, batch["image"]).ddf
    plain = InstanceRefiner(steps=5, learning_rate=0.1, score_weighted=False)(net, batch["image"]).ddf
    assert not torch.allclose(weighted, plain, atol=1e-4)


def test_pairs_are_independent_of_their_batch(batch, networks):
    net, scoring = networks
    refiner = InstanceRefiner(steps=8, learning_rate=0.1, scoring_network=scoring)
    together = refiner(net, batch["image"]).ddf
    alone = torch.cat([refiner(net, batch["image"][i:i + 1]).ddf for i in range(3)])
    # equal up to float noise: batched convolutions differ by ~1e-6, which Adam's normalisation can lift to ~1e-3 px
    # where a gradient is almost zero (measured: max 1.1e-3, mean 1.4e-6 px after 8 steps)
    assert torch.allclose(together, alone, atol=5e-3) and (together - alone).abs().mean() < 1e-4


def test_the_velocity_is_refined_so_the_field_stays_diffeomorphic(batch, networks):
    net, _ = networks
    out = InstanceRefiner(steps=20, learning_rate=0.5, score_weighted=False, max_folding_pct=100.0)(net, batch["image"])
    assert max(out.folding_pct) == 0.0  # a large step size, yet scaling and squaring keeps det J > 0


def test_folding_limit_stops_a_pair_at_its_last_good_step(batch):
    """A one-way network's displacement, optimised with a huge step, folds; the limit stops it (and says so)."""
    refiner = InstanceRefiner(steps=10, learning_rate=5.0, score_weighted=False, max_folding_pct=0.0)
    out = refiner(ZeroDisplacement(), batch["image"])
    assert all(f == 0.0 for f in out.folding_pct) and all(s < 10 for s in out.steps)
    assert all(note.startswith("refinement stopped after") for note in out.notes)
    free = InstanceRefiner(steps=10, learning_rate=5.0, score_weighted=False, max_folding_pct=100.0)
    assert max(free(ZeroDisplacement(), batch["image"]).folding_pct) > 0.0  # without the limit it does fold


def test_one_way_network_and_local_ncc(batch):
    image = batch["image"]
    out = InstanceRefiner(steps=40, learning_rate=0.2, score_weighted=False, similarity="lncc")(ZeroDisplacement(), image)
    refiner = InstanceRefiner(similarity="lncc")
    before = refiner._dissimilarity(image[:, :1], image[:, 1:2]).mean()
    after = refiner._dissimilarity(Warp()(image[:, :1], out.ddf), image[:, 1:2]).mean()
    assert after < before


def test_the_weighted_loss_matches_a_hand_computation():
    moving = torch.tensor([[[[0.0, 1.0, 0.5], [0.0, 0.0, 0.2]]]])  # (1, 1, 2, 3)
    fixed = torch.tensor([[[[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]]])
    score = torch.tensor([[[[0.9, 0.2, 1.0], [0.5, 0.7, 0.3]]]])
    field = torch.zeros(1, 2, 2, 3)
    field[0, 1, 0, 2] = 0.5  # one vector: the regulariser sees it; the zero field warps nothing
    refiner = InstanceRefiner(lam=0.1)
    loss = refiner.pair_losses(torch.zeros(1, 2, 2, 3), field, moving, fixed, score, GradientL2Loss(loss_mult=2))
    # data: M excludes the two pixels that are 0 in both images; squared residuals weighted by S, mean over 6
    data = (0.2 * 0.25 + 1.0 * 0.0 + 0.5 * 1.0 + 0.3 * 0.04) / 6
    # smoothness: loss_mult 2 x mean over the two axes of the mean squared forward differences of the field
    diffs_axis0 = (0.5 ** 2) / (2 * 1 * 3)  # channel 1, column 2: rows 0 -> 1 differ by -0.5 (2 channels x 1 x 3)
    diffs_axis1 = (0.5 ** 2) / (2 * 2 * 2)  # channel 1, row 0: columns 1 -> 2 differ by 0.5 (2 channels x 2 x 2)
    expected = data + 0.1 * 2 * (diffs_axis0 + diffs_axis1) / 2
    assert loss.shape == (1,) and loss.item() == pytest.approx(expected, rel=1e-6)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="needs the scoring network"):
        InstanceRefiner(steps=5, score_weighted=True, scoring_network=None)
    with pytest.raises(ValueError, match="similarity must be one of"):
        InstanceRefiner(similarity="ncc")


@pytest.mark.parametrize("steps", [0, 3])
def test_evaluation_config_refines_only_when_asked(steps, tmp_path):
    """evaluate.yaml: refine_steps 0 (default) leaves the evaluator as it was; > 0 refines with the shipped scoring."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs/train.yaml"), str(BUNDLE / "configs/evaluate.yaml")], workflow_type="train",
        bundle_root=str(BUNDLE), logging_file=False, output_dir=str(tmp_path), num_test_pairs=2,
        image_size=[64, 64], refine_steps=steps,
    )
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert (evaluator.refiner is None) == (steps == 0)
    if steps:
        assert evaluator.refiner.steps == 3 and evaluator.refiner.scoring_network is not None
        assert evaluator.refiner.lam == workflow.parser.get_parsed_content("lam")
    evaluator.run()
    assert 0 < evaluator.state.metrics["val_mean_dice"] <= 1


def test_folder_inference_refines_and_says_when_the_folding_limit_stopped_a_pair(tmp_path):
    """inference.yaml: refine_steps > 0 changes the written field; a pair stopped by the folding limit is named in
    summary.csv's notes (a one-way network whose displacement folds at once with a huge step)."""
    import nibabel as nib

    from scripts.inference_engine import register_folder

    data = tmp_path / "pairs"
    for case, index in (("a", 200000), ("b", 200001)):
        pair = cardiac_phantom_pair(index, size=64)
        data.mkdir(exist_ok=True)
        for frame, key in (("ED", "moving"), ("ES", "fixed")):
            nib.save(nib.Nifti1Image(pair[key][0], np.eye(4)), str(data / f"{case}_{frame}.nii.gz"))
    plain = register_folder(data, tmp_path / "plain", None, BUNDLE / "models" / "model.pt", write_itk=False)
    refined = register_folder(data, tmp_path / "refined", None, BUNDLE / "models" / "model.pt", write_itk=False,
                              refine_steps=5)
    assert [r["status"] for r in plain + refined] == ["ok"] * 4 and not any(r["notes"] for r in refined)
    before = nib.load(str(tmp_path / "plain" / "a_ddf.nii.gz")).get_fdata()
    after = nib.load(str(tmp_path / "refined" / "a_ddf.nii.gz")).get_fdata()
    assert before.shape == after.shape and not np.allclose(before, after, atol=1e-3)
    stopped = register_folder(data, tmp_path / "stopped", ZeroDisplacement(), None, write_itk=False, refine_steps=10,
                              refine_learning_rate=5.0, refine_score_weighted=False, refine_max_folding_pct=0.0)
    for row in stopped:
        assert row["status"] == "ok" and float(row["folding_pct"]) == 0.0
        assert "refinement stopped after" in row["notes"] and "folding would exceed 0.00 %" in row["notes"]
