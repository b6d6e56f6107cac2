"""Fine-tuning levers of the training module: how timesteps are drawn, and the base's learning rate
against the pose branch's."""

from functools import partial

import lightning as L
import pytest
import torch

from dynamictrl.errors import UserError
from dynamictrl.train.module import DynamiCtrlModule, draw_timesteps, latent_mask
from test_train import module_and_batch


def optimizer_of(module):
    module.trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False)
    return module.configure_optimizers()["optimizer"]


def test_uniform_timesteps_are_the_official_draw_and_logit_normal_favours_high_noise():
    uniform = draw_timesteps(4000, 1000, "uniform", 0.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(3)))
    high = draw_timesteps(4000, 1000, "logit_normal", 1.5, 1.0, torch.Generator().manual_seed(3))
    centred = draw_timesteps(4000, 1000, "logit_normal", 0.0, 1.0, torch.Generator().manual_seed(3))
    assert high.dtype == torch.long and int(high.min()) >= 0 and int(high.max()) <= 999
    assert 780 < float(high.float().median()) < 850  # sigmoid(1.5) = 0.82
    assert 450 < float(centred.float().median()) < 550
    assert float((high >= 750).float().mean()) > 2 * float((uniform >= 750).float().mean())


def test_the_loss_draws_its_timesteps_as_the_module_says(tiny_model, shards, tmp_path):
    drawn = {}
    for name, extra in (("uniform", []), ("high", ["module.timesteps=logit_normal", "module.timestep_mean=3.0",
                                                   "module.timestep_std=0.1"])):  # fmt: skip
        module, batch = module_and_batch(tiny_model, shards, tmp_path / name, *extra)
        add_noise = module.pipe.scheduler.add_noise
        seen = []
        module.pipe.scheduler.add_noise = lambda x, n, t, seen=seen, add_noise=add_noise: seen.append(t) or add_noise(x, n, t)
        for i in range(4):
            module.loss(batch, generator=torch.Generator().manual_seed(i))
        drawn[name] = torch.cat(seen)
    assert int(drawn["high"].min()) >= 900  # sigmoid(3 - 8 * 0.1) = 0.90
    assert int(drawn["uniform"].min()) < 900


def test_base_lr_scale_trains_the_pose_branch_at_the_full_rate_and_the_base_slower(tiny_model, shards, tmp_path):
    module, _ = module_and_batch(tiny_model, shards, tmp_path, "module.base_lr_scale=0.0", "module.optimizer.lr=0.01",
                                 "module.lr_scheduler.num_warmup_steps=0")
    opt = optimizer_of(module)
    pose_group, base_group = opt.param_groups
    assert (pose_group["lr"], base_group["lr"]) == (0.01, 0.0)
    branch = tuple(f"{n}." for n in module.transformer.new_modules())
    named = dict(module.trainable())
    assert {id(p) for p in pose_group["params"]} == {id(p) for n, p in named.items() if n.startswith(branch)}
    assert len(pose_group["params"]) + len(base_group["params"]) == len(named)
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.ones_like(p)
    opt.step()
    moved = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert moved == {n for n in named if n.startswith(branch)} and moved


def test_one_group_by_default(tiny_model, shards, tmp_path):
    module, _ = module_and_batch(tiny_model, shards, tmp_path)
    (group,) = optimizer_of(module).param_groups
    assert len(group["params"]) == len(module.trainable())


@pytest.mark.parametrize("kwargs, says", [({"timesteps": "cosine"}, "module.timesteps=cosine"),
                                          ({"timestep_std": 0.0}, "module.timestep_std=0.0"),
                                          ({"base_lr_scale": -1.0}, "module.base_lr_scale=-1.0"),
                                          ({"figure_weight": -0.5}, "module.figure_weight=-0.5")])  # fmt: skip
def test_bad_lever_values_are_named(kwargs, says):
    with pytest.raises(UserError, match=says.replace(".", r"\.")):
        DynamiCtrlModule("unused", optimizer=partial(torch.optim.AdamW, lr=1e-3), **kwargs)


def test_latent_mask_marks_the_latent_positions_a_person_pixel_falls_in():
    mask = torch.zeros(1, 9, 96, 64, dtype=torch.bool)
    mask[0, 3, 10, 5] = True  # frame 3 -> latent frame 1 + (3 - 1) // 2 = 2 (2x time), pixel -> (10 // 4, 5 // 4)
    mask[0, 0, 95, 63] = True  # frame 0 is latent frame 0 alone
    m = latent_mask(mask, (5, 24, 16))
    assert m.shape == (1, 5, 24, 16) and m.sum() == 2
    assert m[0, 2, 2, 1] == 1 and m[0, 0, 23, 15] == 1
    m4 = latent_mask(mask, (3, 24, 16))  # 4x time: frames 1-4 -> latent frame 1
    assert m4[0, 1, 2, 1] == 1 and m4.sum() == 2
    with pytest.raises(ValueError, match="do not map onto a latent grid"):
        latent_mask(mask, (4, 24, 16))


def test_figure_weight_weighs_the_figure_s_positions_up_and_nothing_else(tiny_model, shards, tmp_path):
    module, batch = module_and_batch(tiny_model, shards, tmp_path, "module.figure_weight=4.0", "module.ref_drop=0")

    def loss(mask):
        return module.loss(batch | {"mask": mask}, generator=torch.Generator().manual_seed(0))

    none, everywhere = torch.zeros_like(batch["mask"], dtype=torch.bool), torch.ones_like(batch["mask"], dtype=torch.bool)
    module.hparams.figure_weight = 0.0
    plain = loss(batch["mask"])
    module.hparams.figure_weight = 4.0
    # Equal weights everywhere (no person, or a person everywhere) normalise to the plain loss.
    assert torch.allclose(loss(none), plain) and torch.allclose(loss(everywhere), plain)
    left = none.clone()
    left[..., : left.shape[-1] // 2] = True
    right = ~left
    # The weighted loss is the mix of the plain loss's two halves: a half weighed up pulls it its way.
    to_left, to_right = loss(left), loss(right)
    assert not torch.allclose(to_left, to_right) and min(to_left, to_right) < plain < max(to_left, to_right)
    with pytest.raises(UserError, match="module.figure_weight=4.0 needs the clips' person masks"):
        module.loss({k: v for k, v in batch.items() if k != "mask"}, generator=torch.Generator().manual_seed(0))
