"""Bad hyper-parameters and inputs: every algorithm refuses them with a message that names the
call and the argument."""

from __future__ import annotations

import pytest
import torch
from helpers import class_tasks

from metafunc import conv4, mlp
from metafunc.algorithms import ANIL, IMAML, MAML, Baseline, MAMLPlusPlus, ProtoNet, Reptile


def test_bad_hyper_parameters():
    with pytest.raises(ValueError, match=r"MAML\(inner_lr\): must be a float >= 0"):
        MAML(conv4(), inner_lr=-0.1)
    with pytest.raises(ValueError, match=r"MAML\(inner_steps\): must be an int >= 1"):
        MAML(conv4(), inner_steps=0)
    with pytest.raises(ValueError, match=r"MAML\(loss\): 'hinge' .* or pass your own loss"):
        MAML(conv4(), loss="hinge")
    # a callable loss where the algorithm needs a named one: the choices are named
    with pytest.raises(ValueError, match=r"Baseline\(loss\): .* pass 'cross_entropy' or 'mse'"):
        Baseline(conv4(), loss=torch.nn.functional.cross_entropy)
    with pytest.raises(ValueError, match=r"ProtoNet\(loss\)"):
        ProtoNet(conv4(None), loss=torch.nn.functional.cross_entropy)
    with pytest.raises(ValueError, match=r"MAML\(strategy\)"):
        MAML(conv4(), strategy="processes")
    with pytest.raises(ValueError, match=r"MAML\(trainable\): 'classifier' selects no leaf"):
        MAML(conv4(), trainable="classifier").init()
    with pytest.raises(ValueError, match=r"MAMLPlusPlus\(msl_iterations\)"):
        MAMLPlusPlus(conv4(), msl_iterations=-1)
    with pytest.raises(ValueError, match=r"ANIL\(model\)"):
        ANIL(conv4(None))


SINE = mlp((1, 4, 1))


EMBED = conv4(None, hidden=4)


BAD = [
    (lambda: Reptile(SINE, inner_lr=-0.1), r"Reptile\(inner_lr\): must be a float >= 0"),
    (lambda: Reptile(SINE, inner_steps=0), r"Reptile\(inner_steps\): must be an int >= 1"),
    (lambda: Reptile(SINE, inner_optimizer="rmsprop"), r"Reptile\(inner_optimizer\)"),
    (lambda: Reptile(SINE, inner_b1=1.0), r"Reptile\(inner_b1\): must be in \[0, 1\)"),
    (lambda: Reptile(SINE).outer_optimizer(-1.0, 10), r"Reptile.outer_optimizer\(lr\)"),
    (lambda: IMAML(SINE, lam=0.0), r"IMAML\(lam\): must be a float > 0.*try lam=2.0"),
    (lambda: IMAML(SINE, lam=-1.0), r"IMAML\(lam\): must be a float > 0"),
    (lambda: IMAML(SINE, cg_steps=0), r"IMAML\(cg_steps\): must be an int >= 1"),
    (lambda: IMAML(SINE, inner_steps=0), r"IMAML\(inner_steps\): must be an int >= 1"),
    (lambda: IMAML(SINE, inner_lr=-1e-3), r"IMAML\(inner_lr\): must be a float >= 0"),
    (lambda: IMAML(SINE, cg_tol=-1.0), r"IMAML\(cg_tol\): must be a float >= 0"),
    (lambda: IMAML(SINE, lam_damping=-1.0), r"IMAML\(lam_damping\): must be a float >= 0"),
    (lambda: ProtoNet(EMBED), r"ProtoNet\(ways, shots\).*ProtoNet\(model, shots=5\)"),
    (lambda: ProtoNet(EMBED, shots=0), r"ProtoNet\(shots\): must be a positive int"),
    (lambda: ProtoNet(conv4(5), shots=1), r"ProtoNet\(model\).*conv4\(None\)"),
    (lambda: ProtoNet(EMBED, shots=1, loss="mse"), r"ProtoNet\(loss\)"),
    (
        lambda: Baseline(EMBED, shots=1, inner_lr=-1.0),
        r"Baseline\(inner_lr\): must be a float >= 0",
    ),
    (
        lambda: Baseline(EMBED, shots=1, inner_steps=0),
        r"Baseline\(inner_steps\): must be an int >= 1",
    ),
    (lambda: Baseline(EMBED, shots=1, finetune="body"), r"Baseline\(finetune\)"),
    (lambda: Baseline(EMBED, shots=1, head_init="random"), r"Baseline\(head_init\)"),
    (
        lambda: Baseline(EMBED, num_train_classes=64, shots=1),
        r"Baseline\(feature_dim\).*feature_dim=64",
    ),
    (
        lambda: Baseline(EMBED, num_train_classes=0, feature_dim=4, shots=1),
        r"Baseline\(num_train_classes\)",
    ),
    (lambda: Baseline(conv4(5), shots=1), r"Baseline\(model\).*conv4\(None\)"),
    (lambda: Baseline(SINE, loss="mse", num_train_classes=3), r"Baseline\(num_train_classes\)"),
    (lambda: Baseline(EMBED), r"Baseline\(ways, shots\)"),
]


@pytest.mark.parametrize(
    "make, message", BAD, ids=[m.split(":")[0].replace("\\", "") for _, m in BAD]
)
def test_bad_hyper_parameters_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_protonet_ways_from_shots_is_checked(gen):
    alg = ProtoNet(conv4(None, hidden=4), shots=2, ways=3)
    batch = class_tasks(gen, tasks=1, ways=2, shots=2, queries=1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"2 classes x 2 shots, but ways=3"):
        alg.meta_loss(alg.init(gen), batch)
