"""TrajectoryInfluence: the facade over a real (tiny) proxy trajectory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.data.pairs import load_pairs
from pipeline.data.shards import expand_shards
from pipeline.influence.embeddings import EmbeddingSettings
from pipeline.influence.forward import CheckpointScorer
from pipeline.influence.objective import CLIPBankObjective, forward_mode_safe
from pipeline.influence.unrolled import UnrolledSettings
from pipeline.model.scorer import InfluenceSettings, TrajectoryInfluence, adam_preconditioner
from pipeline.model.train import train_proxy
from pipeline.model.trajectory import load_checkpoint_state

SETTINGS = InfluenceSettings(bank_size=7, batch_size=8, proxy_batch_size=8, adam=True,
                              unrolled=UnrolledSettings(lanczos_steps=4),
                              embeddings=EmbeddingSettings(pool_pairs=24, pools=3, pool_size=9, clusters=3))


@pytest.fixture(scope="module")
def setup(tiny_corpus: Path, tmp_path_factory):
    table = load_pairs(expand_shards(str(tiny_corpus / "*.tar")), 32)
    train, target = table.subset(range(0, 32)), table.subset(range(32, 48))
    cfg = TrainConfig(model="tiny-clip-32", steps=6, batch_size=8, warmup=2, save_steps=[2, 4, 6], seed=0)
    traj = train_proxy(train, cfg, tmp_path_factory.mktemp("traj") / "t")
    influence = TrajectoryInfluence(traj, SETTINGS)
    prepared = influence.prepare(target, train)
    influence.load_prepared(prepared)
    return traj, train, target, influence, prepared


def test_shapes_and_identity(setup) -> None:
    traj, train, _, influence, _ = setup
    out = influence.score_table(train.subset(range(12)))
    assert out["a"].shape == out["b"].shape == out["c"].shape == out["d"].shape == (3, 12)
    for key in ("diffin_unrolled", "diffin_unrolled_adam", "diffin", "diffin_eq9", "tracin", "tracin_adam",
                "clip_score", "loss"):
        assert out[key].shape == (12,) and out[key].dtype == torch.float64 and torch.isfinite(out[key]).all()
    assert torch.allclose(out["diffin"], out["tracin"] + traj.total_steps * out["diffin_eq9"], rtol=1e-9, atol=0)
    assert (out["clip_score"].abs() <= 1 + 1e-6).all()


def test_scores_independent_of_batch_and_order(setup) -> None:
    _, train, _, influence, _ = setup
    forward = influence.score_table(train.subset(range(16)))
    backward = influence.score_table(train.subset(list(reversed(range(16)))))
    for key in ("diffin_unrolled", "diffin", "tracin", "a", "b", "c", "d", "neg_clip_loss", "norm_sim_2",
                "norm_sim_inf"):
        assert torch.allclose(forward[key], backward[key].flip(-1), rtol=1e-4, atol=1e-12), key
    assert torch.equal(forward["cluster"], backward["cluster"].flip(-1))


def test_embedding_columns_match_a_brute_force_computation(setup) -> None:
    """neg_clip_loss / norm_sim_* / cluster of the scoring pass against loops over the
    prepared reference sets, from embeddings taken with a plain forward pass."""
    import math

    from pipeline.model.scorer import split_bank

    _, train, target, influence, prepared = setup
    ref = prepared.embeddings
    assert ref.pools.shape == (SETTINGS.embeddings.pools, min(SETTINGS.embeddings.pool_size, len(train)))
    _, v_idx = split_bank(target, SETTINGS.bank_size, SETTINGS.seed)
    assert ref.target_img.shape[0] == len(v_idx)
    tau = math.exp(-float(influence.params[-1]["logit_scale"]))
    assert ref.temperature == pytest.approx(tau, rel=1e-6)  # the learned temperature by default
    out = influence.score_table(train.subset(range(10)))
    img, txt = influence.embed(train, range(10))
    sample_pos = {u: i for i, u in enumerate(ref.sample_uids)}
    for i in range(10):
        x, y = img[i].double(), txt[i].double()
        per_pool = []
        for pool in ref.pools.tolist():
            negs = [j for j in pool if j != sample_pos.get(train.uids[i])]
            s_ii = float(x @ y)
            row = math.log(math.exp(s_ii / tau) + sum(math.exp(float(x @ ref.sample_txt[j].double()) / tau) for j in negs))
            col = math.log(math.exp(s_ii / tau) + sum(math.exp(float(ref.sample_img[j].double() @ y) / tau) for j in negs))
            per_pool.append(s_ii - 0.5 * tau * (row + col))
        assert float(out["neg_clip_loss"][i]) == pytest.approx(sum(per_pool) / len(per_pool), rel=1e-4, abs=1e-6)
        sims = [abs(float(x @ v.double())) for v in ref.target_img]
        assert float(out["norm_sim_2"][i]) == pytest.approx(math.sqrt(sum(s * s for s in sims)), rel=1e-4)
        assert float(out["norm_sim_inf"][i]) == pytest.approx(max(sims), rel=1e-4)
        cos = [float(torch.nn.functional.cosine_similarity(x, c.double(), dim=0)) for c in ref.centroids]
        assert int(out["cluster"][i]) == max(range(len(cos)), key=lambda k: (cos[k], -k))


def test_matches_the_influence_api_directly(setup) -> None:
    _, train, _, influence, prepared = setup
    images, tokens = influence.inputs(train.images[:8], train.captions[:8])
    objective = CLIPBankObjective(influence.model, *influence.inputs(prepared.bank_images, prepared.bank_captions))
    p = prepared.prepared[1]
    with forward_mode_safe():
        direct = CheckpointScorer(objective, influence.params[1], p.u, p.g, p.w, "fd", 1e-3)((images, tokens))
    out = influence.score_inputs(images, tokens)
    assert torch.allclose(out["a"][1], direct.a.double(), rtol=1e-6)
    assert torch.allclose(out["c"][1], direct.c.double(), rtol=1e-5)
    assert len(prepared.bank_uids) == 7 and not set(prepared.bank_uids) & set(train.uids)


def test_adam_preconditioner_from_optimizer_state(setup) -> None:
    traj, *_ , influence, _ = setup
    state = load_checkpoint_state(traj.checkpoint_path(2))["optimizer"]
    precond = adam_preconditioner(state, influence.model, (0.9, 0.98), 1e-6, torch.float32, "cpu")
    # open_clip's groups: gains/biases/logit_scale first; logit_scale is the first parameter.
    entry = state["state"][0]
    v_hat = entry["exp_avg_sq"] / (1 - 0.98 ** float(entry["step"]))
    assert torch.allclose(precond["logit_scale"], 1 / (v_hat.sqrt() + 1e-6))
    assert set(precond) == set(influence.params[0])


def test_unrolled_directions_follow_the_schedule_and_the_adam_metric(setup) -> None:
    traj, *_, prepared = setup
    unrolled = prepared.unrolled
    assert unrolled.diagnostics["segment_updates"] == [2, 2, 2]  # 6 updates, checkpoints after 2, 4, 6
    assert len(unrolled.directions) == len(unrolled.adam_directions) == 3
    for plain, adam in zip(unrolled.directions, unrolled.adam_directions):
        assert set(plain) == set(adam) and all(torch.isfinite(v).all() for v in plain.values())
        assert any(not torch.allclose(plain[k], adam[k]) for k in plain)


def test_a_trajectory_without_schedule_cannot_give_the_unrolled_score(setup) -> None:
    from dataclasses import replace

    from pipeline.errors import UsageError
    from pipeline.model.scorer import segment_lrs

    traj, *_ = setup
    with pytest.raises(UsageError, match="schedule"):
        segment_lrs(replace(traj, schedule={}), [2, 4, 6])
    lrs = segment_lrs(traj, [2, 4, 6])
    assert [len(x) for x in lrs] == [2, 2, 2] and lrs[0][0] < lrs[0][1]  # warmup of 2 steps


def test_a_bank_pair_is_never_its_own_negative(setup) -> None:
    from pipeline.influence.objective import per_sample_loss

    _, _, target, influence, prepared = setup
    where = {u: i for i, u in enumerate(target.uids)}
    rows = [where[u] for u in prepared.bank_uids[:2]]
    images, tokens = influence.inputs(target.images[rows], [target.captions[i] for i in rows])
    masked = influence.score_inputs(images, tokens, uids=prepared.bank_uids[:2])["loss"]
    unmasked = influence.score_inputs(images, tokens)["loss"]
    bank_images, bank_tokens = influence.inputs(prepared.bank_images, prepared.bank_captions)
    for j in range(2):
        keep = [i for i in range(len(prepared.bank_uids)) if i != j]
        without_self = CLIPBankObjective(influence.model, bank_images[keep], bank_tokens[keep])
        with forward_mode_safe(), torch.no_grad():
            expected = per_sample_loss(without_self, influence.params[-1], (images[j:j + 1], tokens[j:j + 1]))
        assert torch.allclose(masked[j], expected.double()[0], rtol=1e-5)
        assert not torch.allclose(unmasked[j], masked[j], rtol=1e-3)


def test_zero_shot_target_gives_the_zero_shot_loss_and_gradient(setup) -> None:
    """``zero_shot``: u_t and L_V are the zero-shot classifier's (ZeroShotObjective, brute-force
    tested in tests/influence/test_objective.py) on V's images and labels; the unrolled
    recursion starts from the same target; without labels it is refused in one line."""
    from dataclasses import replace

    from pipeline.errors import UsageError
    from pipeline.influence.objective import ZeroShotObjective
    from pipeline.influence.params import dot
    from pipeline.influence.prepare import mean_loss_grad, per_sample_loss
    from pipeline.model.scorer import ZeroShotTarget, split_bank

    traj, train, target, _, _ = setup
    classes = ["red", "green", "blue", "yellow"]
    prompts = tuple(t.format(c) for c in classes for t in ("a {} square", "a photo of {}"))
    settings = replace(SETTINGS, adam=False, components=("a", "d"), zero_shot=ZeroShotTarget(prompts, 2))
    labels = [classes.index(c.split()[1]) for c in target.captions]  # "a red square"
    labelled = replace(target, labels=labels)
    influence = TrajectoryInfluence(traj, settings)
    prepared, _ = influence.prepare_checkpoint(2, labelled, train)
    _, v_idx = split_bank(labelled, settings.bank_size, settings.seed)
    objective = ZeroShotObjective(influence.model, influence.tokenizer(list(prompts)), 2)
    images, _ = influence.inputs(labelled.images[v_idx], [labelled.captions[i] for i in v_idx])
    batch = (images, torch.tensor([labels[i] for i in v_idx]))
    with forward_mode_safe():
        u = mean_loss_grad(objective, influence.params[2], [batch])
        loss = float(per_sample_loss(objective, influence.params[2], batch).mean())
    assert prepared.target_loss == pytest.approx(loss, rel=1e-6)
    assert float(dot(prepared.u, u)) == pytest.approx(float(dot(u, u)), rel=1e-5)
    plain, _ = TrajectoryInfluence(traj, replace(settings, zero_shot=None)).prepare_checkpoint(2, labelled, train)
    assert plain.target_loss != pytest.approx(loss, rel=1e-3)  # a different L_V
    unrolled = influence.prepare_unrolled(labelled, train)
    assert all(torch.isfinite(v).all() for d in unrolled.directions for v in d.values())
    with pytest.raises(UsageError, match="without labels"):
        influence.prepare_checkpoint(2, target, train)
